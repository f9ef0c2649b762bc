"""Clear errors for bad input, unknown names and unsupported modules."""

from __future__ import annotations

import pytest
import torch
from helpers import build_native, images
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


def _nan_image():
    x = images()
    x[1, 0, 2, 3] = float("nan")
    return x


BAD_INPUTS = [
    ("nan", _nan_image, {}, r"Images \[1\] of the batch contain NaN or inf.*check_finite_inputs = False"),
    ("uint8", lambda: (images() * 50).clamp(0, 255).to(torch.uint8), {}, r"Images are torch\.uint8: raw pixel values"),
    ("channels_last", lambda: images().permute(0, 2, 3, 1).contiguous(), {}, r"channels-last.*permute\(0, 3, 1, 2\)"),
    ("empty", lambda: images()[:0], {}, r"empty batch \(0 images\)"),
    ("stop_at_layer", images, {"stop_at_layer": 99}, r"stop_at_layer=99 is out of range .*valid: -2\.\.2"),
]


@pytest.mark.parametrize(("name", "make", "kwargs", "message"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_are_refused_with_the_fix(hooked, name, make, kwargs, message):
    with pytest.raises(ValueError, match=message):
        hooked(make(), **kwargs)


def test_nan_check_can_be_turned_off_and_float64_is_cast(hooked):
    x = images()
    torch.testing.assert_close(hooked(x.double()), hooked(x))
    hooked.check_finite_inputs = False
    try:
        assert torch.isnan(hooked(_nan_image())).any()  # the one flag turns the check off
    finally:
        hooked.check_finite_inputs = True


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


def test_a_half_precision_sae_splices_into_a_float32_model(hooked):
    sae = sve.load_sae("sve:shapes-vit/blocks.1.hook_resid_post")
    model = HookedViT.from_pretrained("sve:shapes-vit")
    x = model.preprocess(sve.make_shapes(4, seed=3).tensors()[0])
    with torch.no_grad():
        full = model.run_with_saes(x, saes=[sae])
        half = sae.to(torch.float16)
        out = model.run_with_saes(x, saes=[half])
        cached, _ = model.run_with_cache_with_saes(x, saes=[half])
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # the SAE rounds to float16 (eps 2**-10): tolerances follow that dtype, not float32's (whose 1e-5 made the
    # comparison depend on the CPU's float16 kernels)
    tol = torch.finfo(torch.float16).eps * float(full.abs().max())
    torch.testing.assert_close(out, cached, atol=tol, rtol=0)
    torch.testing.assert_close(out, full, atol=4 * tol, rtol=0)  # float16 rounding, not a different SAE


def test_sae_of_another_model_and_inactive_or_out_of_range_interventions_are_named():
    from sae_vision_ext.circuits.models import ResidualReplacementModel

    model = HookedViT.from_pretrained("sve:shapes-vit")
    saes = [sve.load_sae(f"sve:shapes-vit/blocks.{layer}.hook_resid_post") for layer in (1, 2)]
    x = model.preprocess(sve.make_shapes(1, seed=5).tensors()[0])
    rrm = ResidualReplacementModel(model, saes)
    with pytest.raises(ValueError, match=r"position 999 is outside the 65 tokens"):
        rrm.intervene(x, [(1, 999, 0, 1.0)])
    acts = rrm.feature_acts(x)[0][0]
    silent = int((acts == 0).all(0).nonzero()[0])
    with pytest.warns(UserWarning, match=rf"Feature {silent} of layer 1 is inactive on every token"):
        rrm.intervene(x, [(1, None, silent, 2.0)])
    other = sve.load_sae("sve:shapes-vit/blocks.1.hook_resid_post")
    other.cfg.metadata.model_name = "timm:vit_base_patch16_224"
    with pytest.warns(UserWarning, match=r"trained on 'timm:vit_base_patch16_224', but this model is 'sve:shapes-vit'"):
        ResidualReplacementModel(model, [other])
    with pytest.warns(UserWarning, match="trained on 'timm:vit_base_patch16_224'"):
        sve.collect_feature_stats(model, other, x, progress=False)
    biased = r"was trained on 'sve:shapes-vit-biased', but this model is 'sve:shapes-vit'"
    with pytest.warns(UserWarning, match=r"The CrossLayerTranscoder " + biased):  # a CLT's cfg.model_name
        sve.TranscoderReplacementModel(model, sve.load_sae("sve:shapes-vit-biased/clt"))
    with pytest.warns(UserWarning, match=r"The SAE on blocks.0.ln2.hook_normalized " + biased):
        sve.TranscoderReplacementModel(model, sve.load_sae("sve:shapes-vit-biased/transcoders")[:1])
