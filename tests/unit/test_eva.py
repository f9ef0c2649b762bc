"""timm ``Eva`` (EVA-02, EVA-CLIP, DINOv3, PE-core): the new hook points mean what they say, the
parts the adapter cannot express are refused by name, and attribution is exact under the frozen
linearisation (RoPE only enters Q·K, the SwiGLU gate and the sub-LN scale are held), float64.

Parity and the generic hook suite run on these models through ``tests/helpers.py::VARIANTS``."""

from __future__ import annotations

import pytest
import torch
from helpers import _timm_eva, build_native, check_exact, images, make_sae, rrm_with

from sae_vision_ext import HookedViT
from sae_vision_ext.circuits.engine.attribution import Attributor
from sae_vision_ext.circuits.models import ResidualReplacementModel

EVA_VARIANTS = ["timm_eva02_clip_subln", "timm_eva02_swiglu", "timm_dinov3"]


def _native_outputs(module: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inputs/outputs of the wrapped block-0 submodules during the native forward."""
    seen: dict[str, torch.Tensor] = {}
    mlp = module.blocks[0].mlp
    handles = [mlp.fc2.register_forward_hook(lambda m, i, o: seen.__setitem__("fc2_in", i[0]))]
    if hasattr(mlp, "norm") and not isinstance(mlp.norm, torch.nn.Identity):
        handles.append(mlp.norm.register_forward_hook(lambda m, i, o: seen.__setitem__("sub_ln_in", i[0])))
    fc1 = mlp.fc1 if hasattr(mlp, "fc1") else mlp.fc1_g
    handles.append(fc1.register_forward_hook(lambda m, i, o: seen.__setitem__("fc1_out", o)))
    try:
        with torch.no_grad():
            module(x)
    finally:
        for h in handles:
            h.remove()
    return seen


@torch.no_grad()
@pytest.mark.parametrize("variant", ["timm_eva02_swiglu", "timm_eva02_clip_subln"])
def test_swiglu_hooks_are_the_gate_linear_branch_and_product(variant):
    native = build_native(variant)
    model = HookedViT.from_model(native)
    x = images()
    _, cache = model.run_with_cache(x)
    pre, lin, post = (cache[f"blocks.0.mlp.{k}"] for k in ("hook_pre", "hook_pre_linear", "hook_post"))
    torch.testing.assert_close(post, torch.nn.functional.silu(pre) * lin)
    seen = _native_outputs(native, x)
    if variant == "timm_eva02_swiglu":  # packed fc1: [gate | linear] (gate_last=False)
        h = pre.shape[-1]
        torch.testing.assert_close(pre, seen["fc1_out"][..., :h])
        torch.testing.assert_close(lin, seen["fc1_out"][..., h:])
        torch.testing.assert_close(post, seen["fc2_in"])
    else:  # separate gate and linear projections; sub-LN between the product and fc2
        torch.testing.assert_close(pre, seen["fc1_out"])
        torch.testing.assert_close(post, seen["sub_ln_in"])
        torch.testing.assert_close(cache["blocks.0.mlp.ln.hook_normalized"], seen["fc2_in"])
        assert "blocks.0.attn.ln.hook_scale" in cache
    assert model.cfg.d_mlp == pre.shape[-1] and model.cfg.act_fn == "silu"


@torch.no_grad()
@pytest.mark.parametrize("variant", ["timm_eva02_swiglu", "timm_dinov3", "timm_pe_core"])
def test_rotated_queries_and_keys_score_the_pattern(variant):
    """hook_rot_q/k: the patch tokens rotated, the prefix tokens untouched, their scaled dot product
    the scores; the rotation is position-dependent (two patches with the same q differ after it)."""
    model = HookedViT.from_model(build_native(variant))
    _, cache = model.run_with_cache(images())
    npt = model.cfg.n_prefix_tokens
    q, rq, rk = (cache[f"blocks.0.attn.{k}"] for k in ("hook_q", "hook_rot_q", "hook_rot_k"))
    torch.testing.assert_close(rq[:, :npt], q[:, :npt])
    assert (rq[:, npt:] - q[:, npt:]).abs().max() > 1e-2
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))  # a rotation keeps lengths
    scores = torch.einsum("bqhd,bkhd->bhqk", rq, rk) * model.cfg.d_head**-0.5
    torch.testing.assert_close(scores, cache["blocks.0.attn.hook_attn_scores"])
    ones = torch.ones(1, 1, 1, model.cfg.d_head)
    rotated = model.blocks[0].parts.rotary(ones.expand(1, npt + model.cfg.n_patches, 1, -1).clone())
    assert not torch.allclose(rotated[0, npt], rotated[0, npt + 1])


@torch.no_grad()
@pytest.mark.parametrize("name", ["attn.hook_rot_q", "attn.hook_rot_k", "mlp.hook_pre_linear", "mlp.ln.hook_scale"])
def test_edits_at_the_new_hooks_reach_the_output(name):
    model = HookedViT.from_model(build_native("timm_eva02_clip_subln"))
    x = images()
    same = model.run_with_hooks(x, fwd_hooks=[(f"blocks.0.{name}", lambda t, hook: t.clone())])
    # a per-channel change (a uniform scale of the linear branch would be undone by the sub-LN)
    moved = model.run_with_hooks(
        x, fwd_hooks=[(f"blocks.0.{name}", lambda t, hook: t * torch.linspace(0.5, 2, t.shape[-1]))]
    )
    torch.testing.assert_close(same, model.adapter.native_forward(x), atol=1e-5, rtol=0)
    assert (moved - same).abs().max() > 1e-3


@torch.no_grad()
def test_pos_slice_keeps_positions_of_rotated_hooks():
    model = HookedViT.from_model(build_native("timm_dinov3"))
    _, cache = model.run_with_cache(images(), pos_slice=[0, 3], names_filter=lambda n: "rot" in n)
    assert cache["blocks.1.attn.hook_rot_q"].shape == (2, 2, model.cfg.n_heads, model.cfg.d_head)


@torch.no_grad()
def test_dinov3_registers_layerscale_and_other_image_sizes():
    native = build_native("timm_dinov3")
    model = HookedViT.from_model(native)
    assert (model.cfg.n_registers, model.cfg.n_prefix_tokens, model.cfg.dynamic_img_size) == (2, 3, True)
    assert model.blocks[0].parts.ls1 is not None and model.blocks[0].parts.ls2 is not None
    x = images(size=48)
    torch.testing.assert_close(model(x), native(x), atol=1e-5, rtol=0)
    _, cache = model.run_with_cache(x, names_filter="blocks.1.attn.hook_rot_k")
    assert cache["blocks.1.attn.hook_rot_k"].shape[1] == 3 + 6 * 6


@torch.no_grad()
def test_mixed_rope_uses_each_blocks_own_frequencies():
    torch.manual_seed(0)
    native = _timm_eva("vit_base_patch16_rope_mixed_224").eval()
    model = HookedViT.from_model(native)
    x = images()
    torch.testing.assert_close(model(x), native(x), atol=1e-5, rtol=0)
    assert model.adapter.rope_table.shape[0] == model.cfg.n_layers


@pytest.mark.parametrize(
    ("kwargs", "part"),
    [
        ({"use_post_norm": True}, "post-norm"),
        ({"gated": True}, "Gated attention"),
        ({"attn_type": "rope", "qkv_fused": False, "num_kv_heads": 2}, "Grouped-query attention"),
    ],
)
def test_unsupported_eva_parts_are_refused_by_name(kwargs, part):
    gated = kwargs.pop("gated", False)
    native = _timm_eva("eva02_tiny_patch14_224", **kwargs)
    if gated:  # EvaAttention(gated=True), which Eva's constructor does not expose
        native.blocks[1].attn.gate = torch.nn.Linear(32, 32)
    with pytest.raises(ValueError, match=part):
        HookedViT.from_model(native)


def test_attention_pool_head_of_pe_core_is_refused_for_attribution():
    model = HookedViT.from_model(build_native("timm_pe_core")).double()
    saes = [make_sae("topk", "none", True, hook=f"blocks.{i}.hook_resid_post") for i in range(2)]
    with pytest.raises(ValueError, match="attention-pool head"):
        Attributor(ResidualReplacementModel(model, saes))


@pytest.mark.slow
@pytest.mark.parametrize("variant", [*EVA_VARIANTS, "timm_pe_core_avg"])
def test_attribution_exact_on_eva_families(variant):
    """Sum rule, frozen interventions = Δ/a·edge on the next layer and the logit, second derivatives
    zero (``check_exact``), with the seed paper's SAEs (per-token layer_norm TopK, rescaled rows)."""
    if variant == "timm_pe_core_avg":  # PE-core's trunk with a mean-of-patches readout
        from helpers import VARIANTS

        VARIANTS[variant] = ("timm_eva", lambda: _timm_eva("vit_pe_core_tiny_patch16_384", global_pool="avg"))
        try:
            rrm = rrm_with(variant, "topk_rescale", "layer_norm", True)
        finally:
            del VARIANTS[variant]
    else:
        rrm = rrm_with(variant, "topk_rescale", "layer_norm", True)
    assert check_exact(rrm, images(1).double(), n_sources=2) > 10


@pytest.mark.parametrize("variant", EVA_VARIANTS)
def test_closed_form_rows_equal_autograd_rows_on_eva(variant):
    """rows.py's closed form (gated MLP weight, sub-LN and attention-output norm backward) against plain
    VJPs through the frozen block."""
    model = HookedViT.from_model(build_native(variant)).double()
    saes = [make_sae("topk_rescale", "layer_norm", True, seed=i, hook=f"blocks.{i}.hook_resid_post") for i in range(2)]
    rrm = ResidualReplacementModel(model, saes)
    x = images(1).double()
    staged = Attributor(rrm, batch_size=5).attribute(x)
    plain = Attributor(rrm, batch_size=5, engine="autograd").attribute(x)
    a, b = staged.adjacency.coalesce(), plain.adjacency.coalesce()
    assert torch.equal(a.indices(), b.indices()) and a.values().abs().max() > 1e-3
    torch.testing.assert_close(a.values(), b.values(), atol=1e-10, rtol=1e-8)


@pytest.mark.slow
def test_attribution_exact_on_an_open_clip_tower_with_an_eva_trunk():
    rrm = rrm_with("open_clip_timm_eva02", "topk_rescale", "layer_norm", True)
    assert type(rrm.model.adapter).__name__ == "OpenClipTimmEvaAdapter"
    assert check_exact(rrm, images(1).double(), n_sources=2) > 10
