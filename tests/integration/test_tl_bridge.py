"""TransformerLens TransformerBridge on HF CLIP, SigLIP, DINOv2, DINOv3, AIMv2, SigLIP 2 through our adapters."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
from helpers import PATCH, build_native, images

from sae_vision_ext import HookedViT

BRIDGED = ["hf_clip", "hf_clip_projection", "hf_siglip", "hf_dinov2", "hf_dinov2_registers", "hf_dinov3",
           "hf_dinov3_gated", "hf_aimv2", "hf_siglip2", "hf_siglip2_mean"]  # fmt: skip
# hooks whose values the bridge and HookedViT share (ln.hook_normalized and, but for DINOv3, attn.hook_attn_scores
# differ by convention: the bridge's are before the norm's weight and bias, and a copy of the pattern)
SHARED = ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "attn.hook_q",
          "attn.hook_k", "attn.hook_v", "attn.hook_z", "attn.hook_pattern", "mlp.hook_pre", "mlp.hook_post",
          "mlp.hook_pre_linear", "attn.hook_rot_q", "attn.hook_rot_k"]  # fmt: skip


def _hf_inputs(variant: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the HF model takes: pixels, or for SigLIP 2 its patchified pixels, mask and spatial shapes."""
    if not variant.startswith("hf_siglip2"):
        return {"pixel_values": x}
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

    patches = torch.stack([convert_image_to_patches(img, PATCH) for img in x])
    grid = [x.shape[-2] // PATCH, x.shape[-1] // PATCH]
    mask = torch.ones(patches.shape[:2], dtype=torch.long)
    return {"pixel_values": patches, "pixel_attention_mask": mask, "spatial_shapes": torch.tensor([grid] * len(x))}


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """float32, 1e-5 relative to the tensor's scale."""
    torch.testing.assert_close(actual, expected, atol=1e-5 * max(1.0, float(expected.abs().max())), rtol=0)


@pytest.mark.parametrize("variant", BRIDGED)
def test_bridge_matches_hf_and_our_hooks(variant):
    from sae_vision_ext.models.tl_bridge import boot_vision_bridge

    hf = build_native(variant)
    x = images()
    inputs = _hf_inputs(variant, x)
    with torch.no_grad():
        ref = hf(**inputs).last_hidden_state
        hooked = HookedViT.from_model(hf)
        _, ours = hooked.run_with_cache(x)
        bridge = boot_vision_bridge(hf)
        out, cache = bridge.run_with_cache(inputs.pop("pixel_values"), **inputs)
    # eager (bridge) vs sdpa (reference) attention differ by kernel rounding only
    _close(out, ref)
    n_layers, n_pos = hooked.cfg.n_layers, hooked.cfg.n_ctx
    assert ref.shape[1] == n_pos
    for layer in range(n_layers):
        assert cache[f"blocks.{layer}.attn.hook_pattern"].shape == (2, hooked.cfg.n_heads, n_pos, n_pos)
        shared = [f"blocks.{layer}.{h}" for h in SHARED if f"blocks.{layer}.{h}" in ours]
        assert len(shared) >= 12, shared  # + mlp.hook_pre_linear (gated MLP), attn.hook_rot_q/k (RoPE)
        for name in shared:
            _close(cache[name], ours[name])
        for ln in ["ln1", "ln2"]:  # ours is after the norm's affine weights, TL's before them
            _close(cache[f"blocks.{layer}.{ln}.hook_out"], ours[f"blocks.{layer}.{ln}.hook_normalized"])
    torch.testing.assert_close(cache["blocks.0.attn.hook_pattern"].sum(-1), torch.ones(2, hooked.cfg.n_heads, n_pos))


@pytest.mark.parametrize("variant", ["hf_dinov3", "hf_dinov3_gated"])
def test_bridge_rope_hooks_equal_ours(variant):
    """DINOv3's RoPE in the bridge (PrefixRopeAttentionBridge): rotated queries/keys and pre-softmax
    scores equal HookedViT's; the rotation is real on patch tokens and the identity on CLS/registers."""
    from sae_vision_ext.models.tl_bridge import boot_vision_bridge

    hf = build_native(variant)
    x = images(size=24)  # a size other than the config's: the RoPE grid follows the input
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
        hooked = HookedViT.from_model(hf)
        _, ours = hooked.run_with_cache(x)
        out, cache = boot_vision_bridge(hf).run_with_cache(x)
    _close(out, ref)
    n_prefix = 1 + hf.config.num_register_tokens
    for layer in range(hooked.cfg.n_layers):
        for hook in ["attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_attn_scores"]:
            _close(cache[f"blocks.{layer}.{hook}"], ours[f"blocks.{layer}.{hook}"])
        q, rot_q = cache[f"blocks.{layer}.attn.hook_q"], cache[f"blocks.{layer}.attn.hook_rot_q"]
        torch.testing.assert_close(rot_q[:, :n_prefix], q[:, :n_prefix], atol=0, rtol=0)
        assert float((rot_q[:, n_prefix:] - q[:, n_prefix:]).abs().max()) > 0.1


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


def test_bridge_on_siglip2_mixed_sizes_matches_hf_on_valid_tokens():
    """A padded NaFlex batch (grids 4x4, 2x5, 3x1) through the bridge: HF's mask reaches the attention."""
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches, pad_along_first_dim

    from sae_vision_ext.models.tl_bridge import boot_vision_bridge

    hf = build_native("hf_siglip2_mean")
    g = torch.Generator().manual_seed(3)
    imgs = [torch.randn(3, h, w, generator=g) for h, w in [(32, 32), (16, 40), (24, 8)]]
    padded = [pad_along_first_dim(convert_image_to_patches(t, PATCH), 16) for t in imgs]
    pixels = torch.stack([p for p, _ in padded])
    mask = torch.stack([m for _, m in padded])
    shapes = torch.tensor([(t.shape[1] // PATCH, t.shape[2] // PATCH) for t in imgs])
    with torch.no_grad():
        ref = hf(pixel_values=pixels, pixel_attention_mask=mask, spatial_shapes=shapes).last_hidden_state
        out, cache = boot_vision_bridge(hf).run_with_cache(pixels, pixel_attention_mask=mask, spatial_shapes=shapes)
    valid = mask.bool()
    assert valid.sum(1).tolist() == [16, 10, 3]
    _close(out[valid], ref[valid])
    pattern = cache["blocks.0.attn.hook_pattern"]
    assert float(pattern[1, :, :, 10:].abs().max()) == 0.0 and float(pattern[2, :, :, 3:].abs().max()) == 0.0
    torch.testing.assert_close(pattern[1, :, :10, :10].sum(-1), torch.ones(pattern.shape[1], 10))
