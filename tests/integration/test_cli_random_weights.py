"""``--random-weights``: the CLI builds a 2026 backbone by id with random (seeded) weights and downloads
nothing (the tests run with HF_HUB_OFFLINE=1): ``hooks`` lists the RoPE and SwiGLU hooks, ``trace``
writes a graph of a timm EVA-02 with an SAE made for it."""

from __future__ import annotations

import json
import re

import torch
from sae_lens import TopKSAE, TopKSAEConfig
from sae_lens.saes.sae import SAEMetadata

from sae_vision_ext.cli import main
from sae_vision_ext.cli._shared import load_model


def test_hooks_of_a_random_eva02_by_id(capsys):
    assert main(["hooks", "timm:eva02_tiny_patch14_224", "--random-weights"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"blocks\.11\.attn\.hook_rot_q\s+\[1, 257, 3, 64\]", out)
    assert re.search(r"blocks\.0\.mlp\.hook_pre_linear\s+\[1, 257, 512\]", out)


def test_random_weights_are_the_same_every_run():
    a, b = (load_model("timm:eva02_tiny_patch14_224", random_weights=True) for _ in range(2))
    assert all(torch.equal(p, q) for p, q in zip(a.wrapped.parameters(), b.wrapped.parameters(), strict=True))


def test_trace_a_random_eva02(tmp_path, capsys):
    hook = "blocks.11.hook_resid_post"
    sae = TopKSAE(TopKSAEConfig(d_in=192, d_sae=64, k=4, metadata=SAEMetadata(hook_name=hook)))
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.3)
    sae.save_model(tmp_path / "sae")
    args = ["trace", "--model", "timm:eva02_tiny_patch14_224", "--random-weights", "--saes", str(tmp_path / "sae"),
            "--max-feature-nodes", "8", "--reference-images", "0", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(args) == 0
    graph = json.loads((tmp_path / "out" / "circuit-tracer" / "shapes-0.json").read_text())
    kinds = {n["feature_type"] for n in graph["nodes"]}
    assert {"cross layer transcoder", "logit", "embedding"} <= kinds  # features of the L11 SAE, a logit target
    assert (tmp_path / "out" / "graph.html").exists()
