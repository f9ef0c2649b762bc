"""Checkpoints written by the other projects' OWN code load exactly, or are refused with a reason.

Every ``tests/fixtures/<format>/<case>/case.json`` was written by ``tests/fixtures/<format>/generate.py``
running that project's code at a named version; ``reference.safetensors`` holds that code's own
``feature_acts`` and ``sae_out`` on ``x``. Only this package's loaders run here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from sae_vision_ext.saes.formats import FORMATS, detect_format
from sae_vision_ext.saes.loading import load_sae

FIXTURES = Path(__file__).parents[1] / "fixtures"
CASES = sorted(FIXTURES.glob("*/*/case.json"))
EXACT = [c for c in CASES if json.loads(c.read_text())["expect"] == "exact"]
STOCK = {"standard", "topk", "jumprelu", "gated", "transcoder", "skip_transcoder"}
"""SAELens's own architectures: a converted SAE of these reloads in plain SAELens."""


def _id(case: Path) -> str:
    return f"{case.parent.parent.name}/{case.parent.name}"


def _load(case: Path):
    meta = json.loads(case.read_text())
    return meta, load_sae(case.parent / meta.get("path", ""), cfg_overrides=meta.get("cfg_overrides"))


def _forward(sae, x: torch.Tensor) -> torch.Tensor:
    return sae(x)


def test_every_format_has_owner_written_fixtures():
    owners = {c.parent.parent.name for c in CASES}
    assert {"saev", "prisma", "sparsify", "dictionary_learning", "overcomplete", "rrm"} <= owners
    assert len(EXACT) >= 25 and len(CASES) > len(EXACT)  # exact cases and refusals


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_owner_written_checkpoint_matches_its_owner_or_is_refused(case):
    meta = json.loads(case.read_text())
    ref = load_file(case.parent / "reference.safetensors")
    assert detect_format(case.parent / meta.get("path", "")) == case.parent.parent.name
    if meta["expect"] == "refused":
        with pytest.raises(ValueError, match=meta["refusal"]):
            _load(case)
        return
    _, sae = _load(case)
    x = ref["x"]
    with torch.no_grad():
        feature_acts = sae.encode(x)
        assert_close(feature_acts, ref["feature_acts"], atol=1e-5, rtol=1e-5)
        assert_close(_forward(sae, x), ref["sae_out"], atol=1e-5, rtol=1e-5)
    active = (ref["feature_acts"] != 0).sum(-1).float().mean()
    assert 0 < active < sae.cfg.d_sae  # the reference is sparse and not empty: the comparison means something


@pytest.mark.slow
def test_converted_saes_round_trip_through_save_and_a_fresh_process(tmp_path):
    """``save_model`` then a new interpreter: plain SAELens (this package never imported) for the stock
    architectures; plain ``SAE.load_from_disk`` after ``import sae_vision_ext`` and ``sve.load_sae`` for
    all (``signed_topk`` included)."""
    saved = []
    for i, case in enumerate(EXACT):
        _, sae = _load(case)
        folder = tmp_path / f"sae{i}"
        sae.save_model(folder)
        saved.append((str(folder), str(case.parent / "reference.safetensors"), sae.cfg.architecture() in STOCK))
    script = tmp_path / "reload.py"
    script.write_text(
        "import json, sys, torch\n"
        "from safetensors.torch import load_file\n"
        "mode = sys.argv[1]\n"
        "if mode == 'imported':\n    import sae_vision_ext\n"  # before SAELens: the hook registers signed_topk
        "from sae_lens import SAE\n"
        "if mode == 'sve':\n    import sae_vision_ext as sve\n"
        "worst, n = 0.0, 0\n"
        "for folder, ref, stock in json.load(open(sys.argv[2])):\n"
        "    if mode == 'plain' and not stock:\n        continue\n"
        "    sae = sve.load_sae(folder) if mode == 'sve' else SAE.load_from_disk(folder)\n"
        "    r, n = load_file(ref), n + 1\n"
        "    with torch.no_grad():\n"
        "        worst = max(worst, (sae.encode(r['x']) - r['feature_acts']).abs().max().item(),\n"
        "                    (sae(r['x']) - r['sae_out']).abs().max().item())\n"
        "assert mode != 'plain' or 'sae_vision_ext' not in sys.modules\n"
        "print(n, worst)\n"
    )
    listing = tmp_path / "saved.json"
    listing.write_text(json.dumps(saved))
    n_stock = sum(stock for *_, stock in saved)
    assert 0 < n_stock < len(saved)  # both stock classes and signed_topk are exercised
    for mode, expected in (("plain", n_stock), ("imported", len(saved)), ("sve", len(saved))):
        out = subprocess.run([sys.executable, str(script), mode, str(listing)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
        n, worst = out.stdout.split()
        assert int(n) == expected and float(worst) < 1e-5, mode


def test_detection_lists_what_a_folder_holds(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"Cannot tell the SAE format .*notes\.txt.*Known formats: .*sparsify"):
        detect_format(tmp_path)
    both = tmp_path / "both"
    both.mkdir()
    for name in ("cfg.json", "sae.safetensors", "sae_weights.safetensors"):
        (both / name).write_text("{}")
    with pytest.raises(ValueError, match=r"several SAE formats \(saelens, sparsify\).*format="):
        detect_format(both)
    assert set(FORMATS.names()) >= {"saelens", "saev", "prisma", "sparsify", "dictionary_learning", "overcomplete"}


@pytest.mark.parametrize(
    ("case", "file"),
    [
        ("prisma/standard-topk-layer_norm", "n_images_1300000.pt"),
        ("saev/schema5-3d73f1f-topk", "sae.pt"),
        ("dictionary_learning/topk", "trainer_0/ae.pt"),
        ("sparsify/topk-expansion", "layers.3/sae.safetensors"),
        ("overcomplete/topk-linear", "sae.pt"),
    ],
)
def test_a_truncated_file_is_called_corrupt_and_named_never_sent_to_allow_pickle(tmp_path, case, file):
    import shutil

    meta = json.loads((FIXTURES / case / "case.json").read_text())
    shutil.copytree(FIXTURES / case, tmp_path / "copy")
    damaged = tmp_path / "copy" / file
    damaged.write_bytes(damaged.read_bytes()[:-300])
    path = tmp_path / "copy" / meta.get("path", "")
    fmt = case.split("/")[0]
    with pytest.raises(ValueError, match="corrupt or truncated") as err:
        load_sae(path, format=fmt, cfg_overrides=meta.get("cfg_overrides"))
    assert "allow_pickle" not in str(err.value) and damaged.name in str(err.value)
