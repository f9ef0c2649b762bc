"""The sae-vision command line."""

from __future__ import annotations

import json
import re

import pytest

from sae_vision_ext.cli import main


def test_models_lists_adapters_sources_and_embedded(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for word in ("timm", "open_clip", "hf_clip", "sve:shapes-vit-biased", "hf, timm, open_clip, sve"):
        assert word in out


def test_hooks_prints_names_with_shapes(capsys):
    assert main(["hooks", "sve:shapes-vit"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"blocks\.5\.hook_resid_post\s+\[1, 65, 128\]", out)
    assert re.search(r"blocks\.0\.attn\.hook_pattern\s+\[1, 4, 65, 65\]", out)
    assert "108 hook points" in out


def test_demo_runs_and_reports_accuracy(capsys, tmp_path):
    assert main(["demo", "--n-images", "64", "--batch-size", "32", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    acc = float(out.split("classes): ")[1].split()[0])
    assert acc > 0.7
    assert "explained var" in out and (tmp_path / "dashboard" / "index.html").exists()
    assert f"Dashboard (open from disk, no server needed): {(tmp_path / 'dashboard' / 'index.html').resolve()}" in out
    assert "Residual replacement model" in out and (tmp_path / "circuit-tracer" / "shapes-demo.json").exists()
    kinds = {
        m[0]: [float(x) for x in m[1:]]
        for m in re.findall(
            r"^(residual SAEs|per-layer transcoders|cross-layer transcoder)\s+[\d,]+\s+([\d.]+)\s+([\d.]+)", out, re.M
        )
    }
    assert set(kinds) == {"residual SAEs", "per-layer transcoders", "cross-layer transcoder"}, out
    assert all(0.3 < rep <= 1 and 0.5 < comp <= 1 for rep, comp in kinds.values()), kinds
    assert (
        json.loads((tmp_path / "circuit-tracer" / "graph-metadata.json").read_text())["graphs"][0]["slug"]
        == "shapes-demo"
    )
    assert (tmp_path / "graph.html").exists()
    assert "associated with 'circle'" in out and "debiased" in out


def test_dashboard_command(capsys, tmp_path):
    args = ["dashboard", "--model", "sve:shapes-vit", "--saes", "sve", "--out", str(tmp_path)]
    assert main([*args, "--n-images", "32", "--feature-pages", "1", "--image-pages", "1"]) == 0
    assert "dashboard written" in capsys.readouterr().out
    assert len(list(tmp_path.glob("blocks.*/f*.html"))) == 6


def test_dashboard_from_a_folder_of_trained_saes(capsys, tmp_path):
    from sae_vision_ext.saes.loading import load_sae

    for layer in (2, 5):  # a training output folder holds one SAELens folder per hook
        load_sae(f"sve:shapes-vit/blocks.{layer}.hook_resid_post").save_model(
            tmp_path / "run" / f"blocks.{layer}.hook_resid_post"
        )
    small = ["--n-images", "32", "--feature-pages", "1", "--image-pages", "1"]
    out = str(tmp_path / "dash")
    assert main(["dashboard", "--model", "sve:shapes-vit", "--saes", str(tmp_path / "run"), "--out", out, *small]) == 0
    assert sorted(p.name for p in (tmp_path / "dash").glob("blocks.*")) == [
        "blocks.2.hook_resid_post",
        "blocks.5.hook_resid_post",
    ]
    assert (
        main(
            [
                "dashboard",
                "--model",
                "sve:shapes-vit",
                "--saes",
                str(tmp_path / "dash" / "images"),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "No SAE folders" in capsys.readouterr().err


def test_saes_lists_releases(capsys):
    assert main(["saes"]) == 0
    out = capsys.readouterr().out
    assert "prisma-clip-b32-topk64-cls-layer9-resid_post" in out and "osunlp/SAE_DINOv2_24K_ViT-B-14_IN1K" in out


def test_errors_exit_2_with_message(capsys):
    assert main(["hooks", "nosuch:model"]) == 2
    assert "Unknown model source 'nosuch'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "cmd",
    [
        [],
        ["models"],
        ["hooks"],
        ["saes"],
        ["demo"],
        ["dashboard"],
        ["eval"],
        ["train"],
        ["cache"],
        ["faithfulness"],
        ["trace"],
    ],
)
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    assert "usage: sae-vision" in capsys.readouterr().out


def test_faithfulness_and_trace_commands(capsys, tmp_path):
    import json

    assert main(["faithfulness", "--model", "sve:shapes-vit", "--saes", "sve", "--n-images", "48"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("layers spliced") and len(lines) == 7
    assert (
        main(["trace", "--model", "sve:shapes-vit", "--saes", "sve", "--shapes-index", "3", "--out", str(tmp_path)])
        == 0
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    out = capsys.readouterr().out.splitlines()  # the one-screen summary: counts, scores, top 5 features
    printed = out[next(i for i, x in enumerate(out) if x.startswith("traced ")) :]
    assert f"kept {summary['kept_nodes']} nodes, {summary['kept_edges']} edges" in printed[0]
    top = printed[printed.index(next(x for x in printed if x.startswith("top 5 features"))) + 1 :][:5]
    assert [x.split()[:2] for x in top] == [[f"L{t['layer']}", f"#{t['feature']}"] for t in summary["top_features"][:5]]
    assert len(printed) <= 25 and printed[1].startswith("scores: replacement")
    assert 0 < summary["scores"]["replacement"] <= 1 and 0 < summary["scores"]["completeness_pruned"] <= 1
    assert summary["kept_nodes"] < summary["n_nodes"] and len(summary["top_features"]) == 10
    graph = json.loads((tmp_path / "circuit-tracer" / "shapes-3.json").read_text())
    assert len(graph["nodes"]) == summary["kept_nodes"] and len(graph["links"]) == summary["kept_edges"]
    assert graph["metadata"]["scan"] == "./data/features"
    codes = {n["feature"] for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"}
    assert {int(f.stem) for f in (tmp_path / "circuit-tracer" / "features").glob("*.json")} == codes
    html = (tmp_path / "graph.html").read_text()
    data = json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', html, re.S)[1])
    assert len(data["nodes"]) == summary["kept_nodes"]
    features = {f"{n['l']}_{n['f']}" for n in data["nodes"] if n["k"] == "feature"}
    assert data["tops"] and set(data["tops"]) == features and set(data["maps"]) == features
    assert data["aggregated"]["cards"]  # the token-aggregated tab is filled from the CLI too
    assert {f.stem for f in (tmp_path / "circuit-tracer" / "features").glob("*.png")} == {str(c) for c in codes}
    # by default: supernodes (each feature's positions) in qParams, valid for circuit-tracer's own models,
    # and the attention report beside the graph, also in the viewer
    from helpers import _circuit_tracer

    model = _circuit_tracer()[0].Model.model_validate(graph)
    groups = graph["qParams"]["supernodes"]
    assert groups and model.qParams.supernodes == groups and data["supernodes"] == groups
    assert all(len({tuple(i.split("_")[:2]) for i in g[1:]}) == 1 < len(g) - 1 for g in groups)
    att = json.loads((tmp_path / "circuit-tracer" / "shapes-3.attention.json").read_text())
    assert len(att["edges"]) == 50 and len(att["entries"]) == 20 and data["attention"]["edges"] == att["edges"]
    assert any(x.startswith("attention: 50 edges split over heads") for x in printed)


def test_trace_with_budget_and_mlp_leaves(tmp_path, capsys):
    import json

    args = ["trace", "--model", "sve:shapes-vit", "--saes", "sve", "--out", str(tmp_path)]
    assert main([*args, "--max-feature-nodes", "128", "--mlp-leaves"]) == 0
    printed = capsys.readouterr().out
    assert "near 0 by construction here: read mlp_share" in printed  # why replacement reads 0.000
    assert "circuit_tracer.frontend.local_server import serve" in printed
    graph = json.loads((tmp_path / "circuit-tracer" / "shapes-0.json").read_text())
    kinds = {n["feature_type"] for n in graph["nodes"]}
    assert "mlp output" in kinds and "cross layer transcoder" in kinds
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 0 < summary["scores"]["mlp_share"] < 1
    assert not (tmp_path / "circuit-tracer" / "shapes-0.attention.json").exists()  # MLP leaves: no head split


def test_train_without_a_config_shows_the_defaults_and_asks_for_yes(capsys):
    assert main(["train"]) == 2
    out = capsys.readouterr().out
    assert '"n_images": 20000' in out and "sae-vision train --yes" in out


def test_analyse_writes_labels_that_dashboard_and_trace_show(capsys, tmp_path):
    assert main(["analyse", "--model", "sve:shapes-vit", "--out", str(tmp_path / "an"), "--n-images", "128"]) == 0
    out = capsys.readouterr().out
    assert "| blocks.5.hook_resid_post |" in out and (tmp_path / "an" / "type_evolution.png").exists()
    labels = json.loads((tmp_path / "an" / "labels.json").read_text())
    hook, feats = next((h, fs) for h, fs in labels.items() if fs)
    feature, label = next(iter(feats.items()))
    assert f"layer {hook.split('.')[1]}, AUROC" in label
    assert f"{hook} #{feature}" in (tmp_path / "an" / "analysis.md").read_text()
    labels_path = str(tmp_path / "an" / "labels.json")
    dash = ["dashboard", "--model", "sve:shapes-vit", "--saes", "sve", "--out", str(tmp_path / "d"), "--n-images", "32"]
    assert main([*dash, "--feature-pages", "1", "--image-pages", "0", "--labels", labels_path]) == 0
    table = (tmp_path / "d" / hook / "index.html").read_text()
    assert label in table
    assert (
        main(
            [
                "trace",
                "--model",
                "sve:shapes-vit",
                "--saes",
                "sve",
                "--out",
                str(tmp_path / "t"),
                "--reference-images",
                "0",
                "--labels",
                labels_path,
            ]
        )
        == 0
    )
    graph = json.loads((tmp_path / "t" / "circuit-tracer" / "shapes-0.json").read_text())
    labelled = [
        n["clerp"] for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder" and ": " in n["clerp"]
    ]
    assert labelled and all(c.split(": ", 1)[1] in {v for fs in labels.values() for v in fs.values()} for c in labelled)
    capsys.readouterr()
    assert main(["analyse", "--model", "timm:vit_tiny_patch16_224", "--saes", "a", "--out", str(tmp_path / "x")]) == 2
    assert "analyse knows the ground truth of the embedded shapes models" in capsys.readouterr().err
