"""Parity with the wrapped model: output and every layer's residual stream, hooks off and on."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import build_native, images, one_per_adapter

from sae_vision_ext import HookedViT

ATOL = 1e-5  # float32, relative to the output's scale


def _close(actual: torch.Tensor, expected: torch.Tensor, scale_from: torch.Tensor | None = None) -> None:
    scale = max(1.0, float((scale_from if scale_from is not None else expected).abs().max()))
    torch.testing.assert_close(actual, expected, atol=ATOL * scale, rtol=0)


@torch.no_grad()
def test_output_parity_no_hooks(native_and_hooked):
    _native, hooked = native_and_hooked
    x = images()
    expected = hooked.adapter.native_forward(x)
    _close(hooked(x), expected)


@torch.no_grad()
def test_output_parity_with_every_hook_cached(native_and_hooked):
    _native, hooked = native_and_hooked
    x = images()
    out, cache = hooked.run_with_cache(x)
    _close(out, hooked.adapter.native_forward(x))
    assert set(cache.keys()) == set(hooked.hook_dict), "every hook point fires"
    _close(cache["hook_out"], out)


@torch.no_grad()
def test_residual_stream_parity_every_layer(native_and_hooked):
    """``blocks.{l}.hook_resid_post`` equals the wrapped block's own output, for every layer."""
    _native, hooked = native_and_hooked
    outputs: dict[int, torch.Tensor] = {}
    handles = [
        blk.parts.block.register_forward_hook(
            lambda m, i, o, layer=layer: outputs.__setitem__(layer, o[0] if isinstance(o, tuple) else o)
        )
        for layer, blk in enumerate(hooked.blocks)
    ]
    x = images()
    try:
        hooked.adapter.native_forward(x)
    finally:
        for h in handles:
            h.remove()
    _, cache = hooked.run_with_cache(x, names_filter=lambda n: n.endswith("hook_resid_post"))
    assert len(outputs) == hooked.cfg.n_layers
    for layer in range(hooked.cfg.n_layers):
        _close(cache[f"blocks.{layer}.hook_resid_post"], outputs[layer])


@torch.no_grad()
def test_residual_bookkeeping(native_and_hooked):
    """resid_mid = resid_pre + attn_out and resid_post = resid_mid + mlp_out (LayerScale included)."""
    _, hooked = native_and_hooked
    _, cache = hooked.run_with_cache(images())
    for layer in range(hooked.cfg.n_layers):
        pre, mid, post = (cache[f"blocks.{layer}.hook_resid_{k}"] for k in ("pre", "mid", "post"))
        _close(mid, pre + cache[f"blocks.{layer}.hook_attn_out"])
        _close(post, mid + cache[f"blocks.{layer}.hook_mlp_out"])
    n_pos = hooked.cfg.n_ctx
    assert cache["blocks.0.hook_resid_pre"].shape == (2, n_pos, hooked.cfg.d_model)
    assert cache["blocks.0.attn.hook_pattern"].shape == (2, hooked.cfg.n_heads, n_pos, n_pos)
    assert cache["blocks.0.attn.hook_q"].shape == (2, n_pos, hooked.cfg.n_heads, hooked.cfg.d_head)
    assert cache["blocks.0.mlp.hook_post"].shape == (2, n_pos, hooked.cfg.d_mlp)
    torch.testing.assert_close(cache["blocks.0.attn.hook_pattern"].sum(-1), torch.ones(2, hooked.cfg.n_heads, n_pos))


@pytest.mark.parametrize("variant", one_per_adapter())
def test_float64_parity_and_independent_deepcopy(variant):
    native = build_native(variant).double()
    hooked = HookedViT.from_model(native)
    x = images().double()
    with torch.no_grad():
        torch.testing.assert_close(hooked(x), hooked.adapter.native_forward(x), atol=1e-10, rtol=0)
    clone = copy.deepcopy(hooked)
    with torch.no_grad():
        for p in clone.wrapped.parameters():
            p.mul_(0.5)
        before = hooked(x)
        torch.testing.assert_close(before, hooked.adapter.native_forward(x), atol=1e-10, rtol=0)
        assert not torch.allclose(clone(x), before), "the copy reads its own (changed) weights"
        torch.testing.assert_close(clone(x), clone.adapter.native_forward(x), atol=1e-10, rtol=0)


@torch.no_grad()
def test_dynamic_image_size_timm():
    hooked = HookedViT.from_model(build_native("timm_dynamic_size"))
    x = images(size=48)
    torch.testing.assert_close(hooked(x), hooked.adapter.native_forward(x), atol=ATOL, rtol=0)
    _, cache = hooked.run_with_cache(x, names_filter="blocks.0.hook_resid_pre")
    assert cache["blocks.0.hook_resid_pre"].shape[1] == 1 + (48 // 8) ** 2
