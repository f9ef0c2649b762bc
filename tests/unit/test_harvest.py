"""Harvesting: token selection, one forward per batch for all hooks, row alignment, shuffling."""

from __future__ import annotations

import pytest
import torch
from helpers import build_native, images

from sae_vision_ext import HookedViT
from sae_vision_ext.activations.harvest import ShuffleBuffer, harvest, resolve_hook_names, token_positions


def test_token_positions_per_selection():
    # CLS + 3 registers + 16 patches
    assert token_positions(4, True, 3, 20, "all").tolist() == list(range(20))
    assert token_positions(4, True, 3, 20, "patches").tolist() == list(range(4, 20))
    assert token_positions(4, True, 3, 20, "cls").tolist() == [0]
    assert token_positions(4, True, 3, 20, "prefix").tolist() == [0, 1, 2, 3]
    assert token_positions(4, True, 3, 20, "no_registers").tolist() == [0, *range(4, 20)]
    with pytest.raises(ValueError, match="needs a model with a CLS token"):
        token_positions(0, False, 0, 16, "cls")
    with pytest.raises(ValueError, match="Unknown token_selection 'patch'"):
        token_positions(1, True, 0, 17, "patch")


def test_resolve_hook_names():
    assert resolve_hook_names("all_resid_post", 3) == [f"blocks.{i}.hook_resid_post" for i in range(3)]
    assert resolve_hook_names("all_mlp_out", 6, layers=[1, 4]) == ["blocks.1.hook_mlp_out", "blocks.4.hook_mlp_out"]
    with pytest.raises(ValueError, match="Unknown hook group 'all_resid'"):
        resolve_hook_names("all_resid", 3)
    with pytest.raises(ValueError, match=r"Layers \[7\] out of range"):
        resolve_hook_names("all_resid_post", 3, layers=[7])


@torch.no_grad()
def test_harvest_rows_match_cache_with_one_forward_and_early_stop():
    model = HookedViT.from_model(build_native("timm_registers"))  # CLS + 3 registers + 16 patches
    hooks = ["blocks.0.hook_resid_post", "blocks.0.hook_mlp_out"]
    batches = [images(3, seed=s) for s in range(2)]
    calls = {"embed": 0, "block1": 0}
    model.add_hook("hook_embed", lambda a, hook: calls.__setitem__("embed", calls["embed"] + 1))
    model.add_hook("blocks.1.hook_resid_pre", lambda a, hook: calls.__setitem__("block1", calls["block1"] + 1))
    try:
        out = list(harvest(model, batches, hooks, token_selection="no_registers"))
    finally:
        model.reset_hooks()
    assert calls == {"embed": 2, "block1": 0}, "one forward per batch, stopped after the deepest hook's block"
    _, cache = model.run_with_cache(batches[1], names_filter=hooks)
    keep = [0, *range(4, 20)]
    for h in hooks:
        assert out[1][h].shape == (3 * 17, 32)
        torch.testing.assert_close(out[1][h], cache[h][:, keep].flatten(0, 1))


@torch.no_grad()
def test_patch_subsampling_keeps_prefix_and_k_distinct_patches():
    model = HookedViT.from_model(build_native("timm_cls"))
    g = torch.Generator().manual_seed(0)
    (out,) = harvest(model, [images(2)], ["blocks.0.hook_resid_pre"], "all", patches_per_image=4, generator=g)
    _, cache = model.run_with_cache(images(2), names_filter="blocks.0.hook_resid_pre")
    full = cache["blocks.0.hook_resid_pre"]
    rows = out["blocks.0.hook_resid_pre"].reshape(2, 5, -1)
    torch.testing.assert_close(rows[:, 0], full[:, 0])  # CLS kept
    for b in range(2):
        matches = [int((full[b] - r).abs().sum(-1).argmin()) for r in rows[b, 1:]]
        assert len(set(matches)) == 4 and min(matches) >= 1


def test_shuffle_buffer_mixes_images_conserves_rows_and_aligns_hooks():
    chunks = [{"a": torch.full((10, 1), float(i)), "b": torch.full((10, 1), float(-i))} for i in range(8)]
    g = torch.Generator().manual_seed(0)
    batches = list(ShuffleBuffer(capacity=40, batch_size=8, generator=g)(iter(chunks)))
    a = torch.cat([b["a"] for b in batches]).squeeze(1)
    torch.testing.assert_close(torch.cat([b["b"] for b in batches]).squeeze(1), -a)
    assert len(a) == 80 and sorted(a.tolist()) == sorted(float(i) for i in range(8) for _ in range(10))
    assert max(len(set(b["a"].squeeze(1).tolist())) for b in batches) >= 3, "a batch mixes several images"
    with pytest.raises(ValueError, match="at least twice"):
        ShuffleBuffer(capacity=10, batch_size=8)
