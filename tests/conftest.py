"""Shared fixtures: tiny seeded models of every supported variant, keyed by adapter.

``VARIANTS`` maps a variant id to ``(adapter name, builder)``; builders return the *native* module
in eval mode. Every registered adapter must have at least one variant (``test_registry`` checks),
so a newly registered family gets the whole parity suite by adding one builder here.
Shapes annotated with jaxtyping are checked at runtime in tests (beartype import hook).
"""

from __future__ import annotations

import os
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no machine here reaches a hub; fail fast, never retry
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from jaxtyping import install_import_hook

with install_import_hook("sae_vision_ext", "beartype.beartype"):  # imported under the hook so shapes are checked
    import sae_vision_ext.circuits.aggregated
    import sae_vision_ext.circuits.attribution
    import sae_vision_ext.circuits.debias
    import sae_vision_ext.circuits.evaluate
    import sae_vision_ext.circuits.logit_lens
    import sae_vision_ext.circuits.replacement
    import sae_vision_ext.circuits.seed_protocol
    import sae_vision_ext.models
    import sae_vision_ext.saes.affine  # noqa: F401

import pytest
import torch
from torch import nn

IMG, PATCH, D, HEADS, LAYERS = 32, 8, 32, 4, 2


def _timm(**kw) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    base = dict(img_size=IMG, patch_size=PATCH, embed_dim=D, depth=LAYERS, num_heads=HEADS, num_classes=5,
                qkv_bias=True)  # fmt: skip
    return VisionTransformer(**(base | kw))


def _timm_distilled() -> nn.Module:
    from timm.models.deit import VisionTransformerDistilled

    return VisionTransformerDistilled(img_size=IMG, patch_size=PATCH, embed_dim=D, depth=LAYERS, num_heads=HEADS,
                                      num_classes=5)  # fmt: skip


def _open_clip(**kw) -> nn.Module:
    from open_clip.model import QuickGELU
    from open_clip.transformer import VisionTransformer

    base = dict(image_size=IMG, patch_size=PATCH, width=D, layers=LAYERS, heads=HEADS, mlp_ratio=2.0,
                output_dim=16, act_layer=QuickGELU)  # fmt: skip
    return VisionTransformer(**(base | kw))


def _open_clip_timm() -> nn.Module:
    from open_clip.timm_model import TimmModel

    tower = TimmModel("vit_tiny_patch16_224", embed_dim=16, image_size=IMG, pool="", proj="linear")
    tower.trunk = _timm(class_token=False, global_pool="map", num_classes=0, no_embed_class=True)
    tower.head.proj = nn.Linear(D, 16, bias=False)
    return tower


def _open_clip_full_clip() -> nn.Module:
    from open_clip.model import CLIP

    vision = dict(image_size=IMG, patch_size=PATCH, width=D, layers=LAYERS, head_width=D // HEADS, mlp_ratio=2.0)
    text = dict(context_length=8, vocab_size=50, width=D, heads=HEADS, layers=1)
    return CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text, quick_gelu=True)


def _hf(kind: str) -> nn.Module:
    import transformers as tf

    common = dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, image_size=IMG,
                  patch_size=PATCH)  # fmt: skip
    if kind == "vit":
        return tf.ViTModel(tf.ViTConfig(intermediate_size=64, **common))
    if kind == "vit_cls":
        return tf.ViTForImageClassification(tf.ViTConfig(intermediate_size=64, num_labels=5, **common))
    if kind == "clip":
        return tf.CLIPVisionModel(tf.CLIPVisionConfig(intermediate_size=64, **common))
    if kind == "clip_proj":
        return tf.CLIPVisionModelWithProjection(tf.CLIPVisionConfig(intermediate_size=64, projection_dim=16, **common))
    if kind == "dinov2":
        return tf.Dinov2Model(tf.Dinov2Config(mlp_ratio=2, layerscale_value=0.5, **common))
    if kind == "dinov2_reg":
        cfg = tf.Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=3, layerscale_value=0.5, **common)
        return tf.Dinov2WithRegistersModel(cfg)
    if kind == "dinov2_cls":
        cfg = tf.Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=2, num_labels=5, **common)
        return tf.Dinov2WithRegistersForImageClassification(cfg)
    if kind == "siglip":
        return tf.SiglipVisionModel(tf.SiglipVisionConfig(intermediate_size=64, **common))
    raise ValueError(kind)


VARIANTS: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "timm_cls": ("timm", lambda: _timm()),
    "timm_avg_no_cls": ("timm", lambda: _timm(class_token=False, global_pool="avg")),
    "timm_registers": ("timm", lambda: _timm(reg_tokens=3, no_embed_class=True)),
    "timm_layerscale_deit3": ("timm", lambda: _timm(init_values=0.3, no_embed_class=True)),
    "timm_pre_norm_clip": ("timm", lambda: _timm(pre_norm=True, act_layer="quick_gelu")),
    "timm_fc_norm_avg": ("timm", lambda: _timm(global_pool="avg", fc_norm=True)),
    "timm_map_siglip": ("timm", lambda: _timm(class_token=False, global_pool="map", no_embed_class=True)),
    "timm_qk_norm": ("timm", lambda: _timm(qk_norm=True)),
    "timm_distilled": ("timm", _timm_distilled),
    "timm_dynamic_size": ("timm", lambda: _timm(dynamic_img_size=True)),
    "open_clip_tok": ("open_clip", lambda: _open_clip()),
    "open_clip_avg_ln_after_pool_ls": (
        "open_clip",
        lambda: _open_clip(pool_type="avg", final_ln_after_pool=True, ls_init_value=0.3),
    ),
    "open_clip_no_ln_pre_gelu": ("open_clip", lambda: _open_clip(no_ln_pre=True, act_layer=nn.GELU)),
    "open_clip_full_clip": ("open_clip", _open_clip_full_clip),
    "open_clip_timm_siglip": ("open_clip_timm", _open_clip_timm),
    "hf_vit": ("hf_vit", lambda: _hf("vit")),
    "hf_vit_classifier": ("hf_vit", lambda: _hf("vit_cls")),
    "hf_clip": ("hf_clip", lambda: _hf("clip")),
    "hf_clip_projection": ("hf_clip", lambda: _hf("clip_proj")),
    "hf_dinov2": ("hf_dinov2", lambda: _hf("dinov2")),
    "hf_dinov2_registers": ("hf_dinov2", lambda: _hf("dinov2_reg")),
    "hf_dinov2_registers_classifier": ("hf_dinov2", lambda: _hf("dinov2_cls")),
    "hf_siglip": ("hf_siglip", lambda: _hf("siglip")),
}


def build_native(variant: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    module = VARIANTS[variant][1]().eval()
    with torch.no_grad():  # sharp attention and non-trivial tokens, biases and scales (inits are near-degenerate)
        for name, p in module.named_parameters():
            if p.ndim <= 1 or "token" in name or "embed" in name:
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.add_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return module


@pytest.fixture(params=list(VARIANTS))
def variant(request) -> str:
    return request.param


@pytest.fixture
def native_and_hooked(variant):
    from sae_vision_ext import HookedViT

    native = build_native(variant)
    hooked = HookedViT.from_model(native, model_name=variant)
    return native, hooked


def images(batch: int = 2, size: int = IMG, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g)


def one_per_adapter() -> list[str]:
    seen: dict[str, str] = {}
    for vid, (adapter, _) in VARIANTS.items():
        seen.setdefault(adapter, vid)
    return list(seen.values())


CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def rrm_for(variant: str):
    """A float64 residual replacement model: the variant with a random TopK SAE (d_sae 48, k 5) per layer."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    from sae_vision_ext import HookedViT
    from sae_vision_ext.circuits.replacement import ResidualReplacementModel

    model = HookedViT.from_model(build_native(variant)).double()
    saes = []
    for layer in range(model.cfg.n_layers):
        torch.manual_seed(layer)
        meta = SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_post")
        sae = TopKSAE(TopKSAEConfig(d_in=32, d_sae=48, k=5, dtype="float64", metadata=meta))
        with torch.no_grad():
            sae.W_enc.normal_(0, 0.4)
            sae.b_dec.normal_(0, 0.1)
        saes.append(sae.double())
    return ResidualReplacementModel(model, saes)


def launch_chromium(playwright):
    """Debian's chromium through Playwright; fails loudly (never skips) when it is not installed."""
    import shutil

    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail(
            "BROWSER TEST NOT RUN: Debian's chromium is not installed. Install it with "
            "`apt-get install -y chromium` (as .ci/run does) so pages are checked in a real browser."
        )
    return playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
