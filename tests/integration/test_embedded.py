"""The embedded shapes ViTs: offline loading, real accuracy, the shortcut in the biased model."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from sae_vision_ext import HookedViT
from sae_vision_ext.data.shapes import make_shapes
from sae_vision_ext.models.embedded import embedded_metadata


@pytest.fixture(scope="module")
def clean_model() -> HookedViT:
    return HookedViT.from_pretrained("sve:shapes-vit")


@pytest.fixture(scope="module")
def fresh():
    return make_shapes(300, seed=12345)  # not a training, validation or evaluation seed


def test_loads_offline_with_documented_architecture(clean_model):
    cfg = clean_model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.patch_size, cfg.image_size, cfg.n_ctx) == (6, 128, 8, (64, 64), 65)
    assert cfg.source == "timm" and cfg.model_name == "sve:shapes-vit"
    size = sum(p.numel() for p in clean_model.parameters())
    assert 0.5e6 < size < 2e6


@torch.no_grad()
def test_clean_model_classifies_fresh_images(clean_model, fresh):
    x, y = fresh.tensors()
    acc = (clean_model(clean_model.preprocess(x)).argmax(-1) == y).float().mean().item()
    reported = embedded_metadata("shapes-vit")["eval"]["clean_val_accuracy"]
    assert acc > 0.8, f"accuracy {acc:.3f}: chance is 0.167"
    assert abs(acc - reported) < 0.06, f"measured {acc:.3f} vs {reported:.3f} in the shipped metadata"


@torch.no_grad()
def test_random_weights_build_same_architecture_but_fail(fresh):
    model = HookedViT.from_pretrained("sve:shapes-vit", pretrained=False)
    x, y = fresh.tensors()
    assert (model(model.preprocess(x)).argmax(-1) == y).float().mean().item() < 0.4


@torch.no_grad()
def test_biased_model_relies_on_the_marker():
    model = HookedViT.from_pretrained("sve:shapes-vit-biased")
    spurious = embedded_metadata("shapes-vit-biased")["training"]["spurious_class"]
    data = make_shapes(600, seed=777, balanced=True)
    x, y = data.tensors()
    pred = model(model.preprocess(x)).argmax(-1)
    marker = torch.from_numpy(data.factors["marker"]).bool()
    other = y != spurious
    with_marker = (pred[other & marker] == spurious).float().mean().item()
    without = (pred[other & ~marker] == spurious).float().mean().item()
    assert with_marker > without + 0.1, f"marker pulls {with_marker:.2f} vs {without:.2f} to the spurious class"


def test_preprocess_accepts_pil_and_tensors(clean_model, fresh):
    pil = Image.fromarray(fresh.images[0])
    a = clean_model.preprocess(pil)
    b = clean_model.preprocess(torch.from_numpy(fresh.images[0]).permute(2, 0, 1))
    assert a.shape == (3, 64, 64)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, torch.from_numpy(fresh.images[0]).permute(2, 0, 1).float() / 127.5 - 1.0)


@torch.no_grad()
def test_embedded_saes_load_offline_and_reconstruct(clean_model):
    import json

    from sae_vision_ext.models.embedded import checkpoint_dir
    from sae_vision_ext.saes.evaluate import evaluate_sae
    from sae_vision_ext.saes.loading import load_sae

    summary = json.loads((checkpoint_dir() / "saes" / "shapes-vit" / "summary.json").read_text())
    data = make_shapes(192, seed=31337, balanced=True)
    x, y = data.tensors()
    pixels = clean_model.preprocess(x)
    for layer in (0, 3, 5):
        hook = f"blocks.{layer}.hook_resid_post"
        sae = load_sae(f"sve:shapes-vit/{hook}")
        assert sae.W_enc.dtype == torch.float32 and sae.cfg.metadata.model_name == "sve:shapes-vit"
        m = evaluate_sae(clean_model, sae, pixels, y)
        assert (
            m["explained_variance"] > 0.85 and abs(m["explained_variance"] - summary[hook]["explained_variance"]) < 0.05
        )
        assert m["l0"] <= sae.cfg.k + 1e-6
        assert m["accuracy"]["spliced"] > m["accuracy"]["clean"] - 0.1
        # trained with the current recipe (b_dec at the data mean, unit-norm decoder, AuxK): few dead features
        assert m["dead_fraction"] < 0.15 and summary[hook]["dead_fraction"] < 0.15, (hook, m["dead_fraction"])
