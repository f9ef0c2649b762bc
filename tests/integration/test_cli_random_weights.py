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


def test_cache_and_train_a_random_model_by_id(tmp_path, capsys):
    """``cache`` and ``train`` take --random-weights: a random timm EVA-02, nothing downloaded; the cache is
    keyed apart from the pretrained model's, and train refuses to share a cache."""
    common = ["--model", "timm:eva02_tiny_patch14_224", "--random-weights", "--dataset", "sve:shapes",
              "--n-images", "4", "--hook-names", "blocks.0.hook_resid_post", "--image-batch-size", "2"]  # fmt: skip
    assert main(["cache", *common, "--cache-dir", str(tmp_path / "cache"), "--images-per-shard", "2"]) == 0
    (meta,) = (tmp_path / "cache").rglob("metadata.json")
    meta = json.loads(meta.read_text())
    assert meta["complete"] and meta["n_tokens"] == 4 * 257
    assert meta["settings"]["model_name"] == "timm:eva02_tiny_patch14_224@random-weights-seed0"
    train = ["train", *common, "--training-tokens", "1024", "--train-batch-size", "256", "--expansion-factor", "2",
             "--output-dir", str(tmp_path / "run"), "--yes"]  # fmt: skip
    assert main([*train, "--cache-dir", str(tmp_path / "cache")]) != 0
    assert "must not share the pretrained model's cache key" in capsys.readouterr().err
    assert main(train) == 0
    assert (tmp_path / "run" / "blocks.0.hook_resid_post" / "cfg.json").exists()
