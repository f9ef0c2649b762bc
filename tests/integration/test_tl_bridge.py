"""TransformerLens TransformerBridge on HF CLIP, SigLIP and DINOv2 through our architecture adapters."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from helpers import build_native, images

from sae_vision_ext import HookedViT

BRIDGED = ["hf_clip", "hf_clip_projection", "hf_siglip", "hf_dinov2", "hf_dinov2_registers"]


@pytest.mark.parametrize("variant", BRIDGED)
def test_bridge_matches_hf_and_our_hooks(variant):
    from sae_vision_ext.models.tl_bridge import boot_vision_bridge

    hf = build_native(variant)
    x = images()
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
        hooked = HookedViT.from_model(hf)
        _, ours = hooked.run_with_cache(x, names_filter=lambda n: n.endswith("hook_resid_post"))
        bridge = boot_vision_bridge(hf)
        out, cache = bridge.run_with_cache(x)
    # eager (bridge) vs sdpa (reference) attention differ by kernel rounding only
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    n_layers, n_pos = hooked.cfg.n_layers, hooked.cfg.n_ctx
    for layer in range(n_layers):
        assert cache[f"blocks.{layer}.attn.hook_pattern"].shape == (2, hooked.cfg.n_heads, n_pos, n_pos)
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_post"], ours[f"blocks.{layer}.hook_resid_post"],
                                   atol=1e-5, rtol=0)  # fmt: skip
    torch.testing.assert_close(cache["blocks.0.attn.hook_pattern"].sum(-1), torch.ones(2, hooked.cfg.n_heads, n_pos))


def test_registration_fills_static_table_and_entry_points_are_declared():
    from transformer_lens.factories import architecture_adapter_factory as factory

    from sae_vision_ext.models.tl_bridge import BRIDGE_ADAPTERS, register_tl_bridge_adapters

    names = register_tl_bridge_adapters()
    assert set(names) == set(BRIDGE_ADAPTERS)
    for name in names:
        assert factory.SUPPORTED_ARCHITECTURES[name] is BRIDGE_ADAPTERS[name]
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="transformer_lens.architectures")}
    for name, cls in BRIDGE_ADAPTERS.items():
        assert eps.get(name) == f"sae_vision_ext.models.tl_bridge:{cls.__name__}", "reinstall: pip install -e ."
