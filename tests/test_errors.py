"""Clear errors for bad input, unknown names and unsupported modules."""

from __future__ import annotations

import pytest
import torch
from conftest import build_native, images
from torch import nn

import sae_vision_ext as sve
from sae_vision_ext import HookedViT


@pytest.fixture(scope="module")
def hooked():
    return HookedViT.from_model(build_native("timm_cls"))


def test_wrong_image_size(hooked):
    with pytest.raises(ValueError, match=r"48x48 does not match the model's 32x32.*preprocess"):
        hooked(images(size=48))


def test_wrong_channels_and_rank(hooked):
    with pytest.raises(ValueError, match="Expected 3 channels, got 1"):
        hooked(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\[batch, channels, height, width\]"):
        hooked(torch.zeros(3, 32, 32))


def test_non_finite_input_when_asked(hooked):
    x = images()
    x[0, 0, 0, 0] = float("nan")
    hooked(x)  # not checked by default
    with pytest.raises(ValueError, match="NaN or inf"):
        hooked(x, check_finite=True)


def test_unknown_hook_name_suggests_close_names(hooked):
    with pytest.raises(
        ValueError, match=r"Unknown hook name 'blocks\.0\.hook_resid_psot'.*'blocks\.0\.hook_resid_post'"
    ):
        hooked.run_with_hooks(images(), fwd_hooks=[("blocks.0.hook_resid_psot", lambda a, hook: a)])
    with pytest.raises(ValueError, match="Unknown hook name"):
        hooked.run_with_cache(images(), names_filter=["blocks.9.hook_resid_post"])
    with pytest.raises(ValueError, match="Unknown hook name"):
        hooked.add_hook("blocks.0.attn.hook_patern", lambda a, hook: a)


def test_unknown_source_prefix_and_missing_prefix():
    with pytest.raises(ValueError, match=r"Unknown model source 'tim'.*Did you mean 'timm'"):
        HookedViT.from_pretrained("tim:vit_base_patch16_224", pretrained=False)
    with pytest.raises(ValueError, match="has no source prefix"):
        HookedViT.from_pretrained("vit_base_patch16_224")


def test_unknown_embedded_name():
    with pytest.raises(ValueError, match=r"Unknown embedded model 'shapes-vt'.*'shapes-vit'"):
        HookedViT.from_pretrained("sve:shapes-vt")


def test_unsupported_module_lists_supported_types():
    with pytest.raises(ValueError, match=r"No adapter wraps a .*Linear.*timm\.models\.VisionTransformer"):
        HookedViT.from_model(nn.Linear(3, 3))


def test_unsupported_timm_block_is_named():
    from timm.models.vision_transformer import ResPostBlock, VisionTransformer

    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4, block_fn=ResPostBlock)
    with pytest.raises(ValueError, match="timm block type ResPostBlock is not supported"):
        HookedViT.from_model(m)


def test_lazy_package_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'NotAThing'"):
        sve.NotAThing


def test_hooked_vit_config_validation_and_round_trip():
    from sae_vision_ext.models.config import HookedViTConfig

    good = dict(n_layers=2, d_model=8, n_heads=2, d_head=4, d_mlp=16, patch_size=4, image_size=(8, 8))
    cfg = HookedViTConfig(**good)
    assert HookedViTConfig.from_dict(cfg.to_dict()) == cfg and cfg.n_ctx == 5 and cfg.grid_size == (2, 2)
    with pytest.raises(ValueError, match="n_layers must be a positive int, got 0"):
        HookedViTConfig(**(good | {"n_layers": 0}))
    with pytest.raises(ValueError, match="n_prefix_tokens=1 is fewer than CLS"):
        HookedViTConfig(**(good | {"n_registers": 2}))
    with pytest.raises(ValueError, match=r"Unknown HookedViTConfig keys \['depth'\]"):
        HookedViTConfig.from_dict(good | {"depth": 3})
