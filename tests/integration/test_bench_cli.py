"""``sae-vision bench``: ViSAEBench's metrics of a shipped SAE, offline, table on stdout and files in --out."""

from __future__ import annotations

import json

from sae_vision_ext.cli import main


def test_bench_command_writes_table_json_and_radar(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "--saes", "sve:shapes-vit/blocks.3.hook_resid_post", "--n-images", "96", "--out", str(out)]
    extra = ["--evaluator", "sve:shapes-vit-biased", "--ood", "sve:shapes-marker", "--ood-images", "48"]
    assert main([*argv, *extra]) == 0
    printed = capsys.readouterr().out
    assert "| M2 FVU ↓ | 0.0" in printed and "skipped" not in printed  # every metric ran offline
    rows = json.loads((out / "bench.json").read_text())[0]["rows"]
    assert [r["key"] for r in rows][:2] == ["localization", "fvu"]
    assert all(r["value"] is not None for r in rows)
    assert (out / "radar.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "bench.md").read_text().count("\n| M") == 7

    assert main([*argv, "--metrics", "fvu,monosemanticity,cross_domain"]) == 0  # no evaluator, no ood: skipped
    printed = capsys.readouterr().out
    assert "M5 monosemanticity skipped: needs a second backbone" in printed
    assert "M6 cross-domain skipped: needs out-of-domain image sets" in printed
    assert "no radar" in printed


def test_bench_refuses_unknown_metric_before_loading(capsys):
    assert main(["bench", "--metrics", "fvu,localisation"]) == 2
    assert "Did you mean 'localization'" in capsys.readouterr().err
