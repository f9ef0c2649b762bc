"""Hook semantics: edits propagate downstream, stop_at_layer, pos_slice, gradients, cache helpers."""

from __future__ import annotations

import pytest
import torch
from helpers import build_native, images, one_per_adapter

from sae_vision_ext import HookedViT

EDITABLE = [
    "hook_embed", "hook_pos_embed", "blocks.0.hook_resid_pre", "blocks.0.ln1.hook_scale",
    "blocks.0.ln1.hook_normalized", "blocks.0.attn.hook_q", "blocks.0.attn.hook_k", "blocks.0.attn.hook_v",
    "blocks.0.attn.hook_attn_scores", "blocks.0.attn.hook_pattern", "blocks.0.attn.hook_z",
    "blocks.0.hook_attn_out", "blocks.0.hook_resid_mid", "blocks.0.ln2.hook_scale", "blocks.0.ln2.hook_normalized",
    "blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_post", "blocks.0.hook_mlp_out", "blocks.1.hook_resid_post",
    "ln_final.hook_normalized", "hook_pooled",
]  # fmt: skip


@pytest.fixture(params=one_per_adapter())
def hooked(request) -> HookedViT:
    return HookedViT.from_model(build_native(request.param))


@torch.no_grad()
@pytest.mark.parametrize("name", EDITABLE)
def test_edit_at_hook_changes_output(hooked, name):
    """An edit anywhere reaches the output. Compared with an identity hook at the same point (same
    code path, so an ignored edit would give a bitwise-identical output); the identity hook itself
    must leave the output equal to the clean one."""
    if name not in hooked.hook_dict:
        pytest.xfail(f"{hooked.cfg.source} has no {name}")
    if name == "hook_pos_embed" and hooked.cfg.positional_embedding_type == "rotary":
        pytest.xfail(f"{hooked.cfg.source} has no absolute position embedding (RoPE only): hook_pos_embed is zero")
    x = images()
    clean = hooked(x)

    def edit(act, hook):
        g = torch.Generator().manual_seed(0)
        return act * (1 + torch.rand(act.shape, generator=g))

    same = hooked.run_with_hooks(x, fwd_hooks=[(name, lambda act, hook: act)])
    edited = hooked.run_with_hooks(x, fwd_hooks=[(name, edit)])
    torch.testing.assert_close(same, clean, atol=1e-5, rtol=0)
    assert (edited - same).abs().max() > 1e-6, f"editing {name} must change the output"
    torch.testing.assert_close(hooked(x), clean)  # hooks are removed afterwards


@torch.no_grad()
def test_pattern_edit_matches_manual_recomputation(hooked):
    """Uniform attention in layer 0 gives z = mean of v over keys (checks the pattern is what z reads)."""
    x = images()

    def uniform(pattern, hook):
        return torch.full_like(pattern, 1.0 / pattern.shape[-1])

    with hooked.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", uniform)]):
        _, cache = hooked.run_with_cache(x, names_filter=["blocks.0.attn.hook_v", "blocks.0.attn.hook_z"])
    v, z = cache["blocks.0.attn.hook_v"], cache["blocks.0.attn.hook_z"]
    torch.testing.assert_close(z, v.mean(dim=1, keepdim=True).expand_as(z), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_stop_at_layer_returns_resid_and_skips_later_blocks(hooked):
    x = images()
    fired = []
    hooked.add_hook(lambda n: n.startswith("blocks.1."), lambda a, hook: fired.append(hook.name))
    try:
        resid = hooked(x, stop_at_layer=1)
    finally:
        hooked.reset_hooks()
    assert fired == [], "no block after stop_at_layer runs"
    _, cache = hooked.run_with_cache(x, names_filter="blocks.1.hook_resid_pre")
    torch.testing.assert_close(resid, cache["blocks.1.hook_resid_pre"])
    torch.testing.assert_close(hooked(x, stop_at_layer=-1), resid)  # negative counts from the end (2 layers)
    _, partial = hooked.run_with_cache(x, stop_at_layer=1)
    assert "blocks.0.hook_resid_post" in partial and "blocks.1.hook_resid_pre" not in partial


@torch.no_grad()
def test_pos_slice(hooked):
    x = images()
    _, full = hooked.run_with_cache(x)
    _, cls_only = hooked.run_with_cache(x, pos_slice=0)
    _, tail = hooked.run_with_cache(x, pos_slice=slice(-4, None))
    torch.testing.assert_close(cls_only["blocks.0.hook_resid_post"], full["blocks.0.hook_resid_post"][:, :1])
    torch.testing.assert_close(tail["blocks.1.attn.hook_q"], full["blocks.1.attn.hook_q"][:, -4:])
    torch.testing.assert_close(tail["blocks.1.attn.hook_pattern"], full["blocks.1.attn.hook_pattern"][:, :, -4:])
    torch.testing.assert_close(tail["hook_pooled"], full["hook_pooled"])  # no position dim: untouched


def test_gradients_flow_to_input_and_backward_hooks(hooked):
    x = images().requires_grad_(True)
    grads = {}
    bwd = [("blocks.1.hook_resid_post", lambda g, hook: grads.__setitem__(hook.name, g.detach().clone()))]
    with hooked.hooks(bwd_hooks=bwd):
        resid_holder = {}
        hooked.add_hook("blocks.1.hook_resid_post", lambda a, hook: resid_holder.setdefault("a", a))
        out = hooked(x)
        out.pow(2).sum().backward()
    hooked.reset_hooks()
    assert x.grad is not None and x.grad.abs().sum() > 0
    expected = torch.autograd.grad(hooked(x).pow(2).sum(), x)[0]
    torch.testing.assert_close(x.grad, expected)
    resid = resid_holder["a"]
    assert grads["blocks.1.hook_resid_post"].shape == resid.shape
    assert grads["blocks.1.hook_resid_post"].abs().sum() > 0


@torch.no_grad()
def test_activation_cache_helpers(hooked):
    x = images()
    _, cache = hooked.run_with_cache(x)
    n = hooked.cfg.n_layers
    acc = cache.accumulated_resid()
    assert acc.shape[0] == n + 1
    torch.testing.assert_close(acc[-1], cache[f"blocks.{n - 1}.hook_resid_post"])
    stacked = cache.stack_activation("resid_post")
    assert stacked.shape == (n, *cache["blocks.0.hook_resid_post"].shape)
    if hooked.ln_pre is None:  # with ln_pre the first residual is a normalised sum, not embed + pos
        parts = cache.decompose_resid()
        torch.testing.assert_close(parts.sum(0), cache[f"blocks.{n - 1}.hook_resid_post"], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_names_filter_list_and_return_dict(hooked):
    x = images()
    _out, cache = hooked.run_with_cache(x, names_filter=["hook_embed", "hook_pooled"], return_cache_object=False)
    assert isinstance(cache, dict) and set(cache) == {"hook_embed", "hook_pooled"}


def test_run_with_cache_incl_bwd(hooked):
    """As TransformerLens: backward from a scalar output caches every gradient as ``<name>_grad``."""
    x = images()
    with hooked.hooks(fwd_hooks=[("hook_out", lambda out, hook: out.pow(2).sum())]):
        out, cache = hooked.run_with_cache(x, incl_bwd=True, names_filter=lambda n: n.endswith("hook_resid_post"))
    name = f"blocks.{hooked.cfg.n_layers - 1}.hook_resid_post"
    assert out.ndim == 0 and cache[name + "_grad"].shape == cache[name].shape
    resid = cache[name].clone().requires_grad_(True)
    expected = torch.autograd.grad(
        hooked.run_with_hooks(x, fwd_hooks=[(name, lambda a, hook: resid)]).pow(2).sum(), resid
    )[0]
    torch.testing.assert_close(cache[name + "_grad"], expected, atol=1e-5, rtol=1e-4)
