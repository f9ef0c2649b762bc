"""Hugging Face DINOv3 (``DINOv3ViTModel``) and AIMv2 (``Aimv2VisionModel``): RoPE and gated-MLP hooks
mean what they say, other image sizes, the attention-pool head refused for attribution, and exact
attribution (float64) on random builds from their config classes.

Parity and the generic hook suite run on them through ``tests/helpers.py::VARIANTS``."""

from __future__ import annotations

import pytest
import torch
from helpers import build_native, check_exact, images, make_sae, rrm_with

from sae_vision_ext import HookedViT
from sae_vision_ext.circuits.engine.attribution import Attributor
from sae_vision_ext.circuits.models import ResidualReplacementModel


@torch.no_grad()
def test_dinov3_rotated_queries_are_hfs_and_score_the_pattern():
    native = build_native("hf_dinov3")
    model = HookedViT.from_model(native)
    seen = {}
    handle = native.model.layer[0].attention.register_forward_hook(lambda m, i, o: seen.__setitem__("w", o[1]))
    native.config._attn_implementation = "eager"  # HF returns its attention weights only in eager mode
    try:
        native(pixel_values=images())
    finally:
        handle.remove()
    _, cache = model.run_with_cache(images())
    q, rq, rk = (cache[f"blocks.0.attn.{k}"] for k in ("hook_q", "hook_rot_q", "hook_rot_k"))
    assert model.cfg.n_prefix_tokens == 3 and model.cfg.positional_embedding_type == "rotary"
    torch.testing.assert_close(rq[:, :3], q[:, :3])
    assert (rq[:, 3:] - q[:, 3:]).abs().max() > 1e-2
    torch.testing.assert_close(cache["blocks.0.attn.hook_pattern"], seen["w"])
    scores = torch.einsum("bqhd,bkhd->bhqk", rq, rk) * model.cfg.d_head**-0.5
    torch.testing.assert_close(scores, cache["blocks.0.attn.hook_attn_scores"])


@torch.no_grad()
@pytest.mark.parametrize("variant", ["hf_dinov3_gated", "hf_aimv2"])
def test_gated_mlp_hooks(variant):
    native = build_native(variant)
    model = HookedViT.from_model(native)
    layer = native.model.layer[0] if variant.startswith("hf_dinov3") else native.encoder.layers[0]
    mlp = layer.mlp if hasattr(layer, "mlp") else layer.ffn
    seen = {}
    handle = mlp.down_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("post", i[0]))
    try:
        native(pixel_values=images())
    finally:
        handle.remove()
    _, cache = model.run_with_cache(images())
    pre, lin, post = (cache[f"blocks.0.mlp.{k}"] for k in ("hook_pre", "hook_pre_linear", "hook_post"))
    torch.testing.assert_close(post, seen["post"])
    torch.testing.assert_close(post, torch.nn.functional.silu(pre) * lin)


@torch.no_grad()
@pytest.mark.parametrize("variant", ["hf_dinov3", "hf_aimv2_native_head"])
def test_other_image_sizes(variant):
    model = HookedViT.from_model(build_native(variant))
    assert model.cfg.dynamic_img_size
    x = images(size=48)
    torch.testing.assert_close(model(x), model.adapter.native_forward(x), atol=1e-5, rtol=0)
    _, cache = model.run_with_cache(x, names_filter="blocks.1.hook_resid_post")
    assert cache["blocks.1.hook_resid_post"].shape[1] == model.cfg.n_prefix_tokens + 36


def test_aimv2_attention_pool_head_is_refused_for_attribution():
    model = HookedViT.from_model(build_native("hf_aimv2_native_head")).double()
    saes = [make_sae("topk", "none", True, hook=f"blocks.{i}.hook_resid_post") for i in range(2)]
    with pytest.raises(ValueError, match="AIMv2 attention-pool head"):
        Attributor(ResidualReplacementModel(model, saes))


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["hf_dinov3", "hf_dinov3_gated", "hf_aimv2"])
def test_attribution_exact_and_closed_form_rows(variant):
    rrm = rrm_with(variant, "topk_rescale", "layer_norm", True)
    x = images(1).double()
    assert check_exact(rrm, x, n_sources=2) > 10
    a = Attributor(rrm, batch_size=5).attribute(x).adjacency.coalesce()
    b = Attributor(rrm, batch_size=5, engine="autograd").attribute(x).adjacency.coalesce()
    assert torch.equal(a.indices(), b.indices())
    torch.testing.assert_close(a.values(), b.values(), atol=1e-10, rtol=1e-8)
