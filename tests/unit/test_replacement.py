"""Residual replacement model: error terms restore the clean model, faithfulness cross-checks,
reference values, validation."""

from __future__ import annotations

import pytest
import torch
from helpers import build_native, identity_sae, images

import sae_vision_ext as sve
from sae_vision_ext.circuits.models import ResidualReplacementModel


@pytest.fixture(scope="module")
def shapes():
    model = sve.HookedViT.from_pretrained("sve:shapes-vit")
    rrm = ResidualReplacementModel(
        model, [sve.load_sae(f"sve:shapes-vit/blocks.{i}.hook_resid_post") for i in range(6)]
    )
    data = sve.make_shapes(96, seed=606, balanced=True)
    x, y = data.tensors()
    return model, rrm, model.preprocess(x), y


@torch.no_grad()
def test_all_error_terms_give_the_clean_model(shapes):
    model, rrm, pixels, _ = shapes
    clean = model(pixels)
    with rrm.spliced(keep_errors=True):
        torch.testing.assert_close(model(pixels), clean, atol=1e-4, rtol=1e-4)
        assert len(model.acts_to_saes()) == 6
    assert model.acts_to_saes() == {}, "the context detaches every SAE"
    with rrm.spliced(layers=[1, 3], keep_errors=[3]):
        assert set(model.acts_to_saes()) == {"blocks.1.hook_resid_post", "blocks.3.hook_resid_post"}
        assert not torch.allclose(model(pixels), clean)


@torch.no_grad()
def test_faithfulness_first_row_matches_evaluate_sae(shapes):
    model, rrm, pixels, labels = shapes
    rows = rrm.faithfulness(pixels, labels, batch_size=40)
    assert [r["n_spliced"] for r in rows] == list(range(1, 7))
    m = sve.evaluate_sae(model, rrm.saes[0], pixels, labels)
    assert abs(rows[0]["kl"] - m["kl_spliced"]) < 1e-5
    assert abs(rows[0]["top1_agreement"] - m["top1_agreement_spliced"]) < 1e-6
    assert abs(rows[0]["accuracy"] - m["accuracy"]["spliced"]) < 1e-6
    assert rows[-1]["kl"] > rows[0]["kl"], "errors compound as more layers are replaced"


@torch.no_grad()
def test_perfect_saes_are_perfectly_faithful():
    model = sve.HookedViT.from_model(build_native("timm_cls"))
    rrm = ResidualReplacementModel(model, [identity_sae(32, f"blocks.{i}.hook_resid_post") for i in range(2)])
    for row in rrm.faithfulness(images(6)):
        assert row["top1_agreement"] == 1.0 and row["kl"] < 1e-8 and abs(row["cosine"] - 1) < 1e-6


@torch.no_grad()
def test_reference_values(shapes):
    _, rrm, pixels, _ = shapes
    acts = rrm.feature_acts(pixels)
    med = rrm.reference_values(pixels, "median", batch_size=40)
    mean = rrm.reference_values(pixels, "mean", batch_size=40)
    zero = rrm.reference_values(pixels, "zero")
    for layer in (0, 5):
        assert med[layer].shape == (65, 512)
        torch.testing.assert_close(med[layer], acts[layer].median(0).values)
        torch.testing.assert_close(mean[layer], acts[layer].mean(0), atol=1e-5, rtol=1e-5)
        assert not zero[layer].any()
    with pytest.raises(ValueError, match="Unknown reference 'mode'"):
        rrm.reference_values(pixels, "mode")


def test_validation():
    model = sve.HookedViT.from_model(build_native("timm_cls"))
    assert ResidualReplacementModel(model, [identity_sae(32, "blocks.1.hook_resid_post")]).layers == [1]  # subsets
    with pytest.raises(ValueError, match="at least one SAE"):
        ResidualReplacementModel(model, [])
    with pytest.raises(ValueError, match="Two SAEs for layer 0"):
        ResidualReplacementModel(model, [identity_sae(32, "blocks.0.hook_resid_post")] * 2)
    with pytest.raises(ValueError, match="past the model's 2 blocks"):
        ResidualReplacementModel(model, [identity_sae(32, "blocks.2.hook_resid_post")])
    with pytest.raises(ValueError, match=r"needs SAEs on blocks\.L\.hook_resid_post; got 'blocks\.0\.hook_mlp_out'"):
        ResidualReplacementModel(model, [identity_sae(32, "blocks.0.hook_mlp_out")])
    with pytest.raises(ValueError, match="d_in=16, the model's d_model is 32"):
        ResidualReplacementModel(model, [identity_sae(16, f"blocks.{i}.hook_resid_post") for i in range(2)])


@torch.no_grad()
def test_error_terms_replaced_by_reference_values(shapes):
    model, rrm, pixels, _ = shapes
    x = pixels[:1]
    own = [e[0] for e in rrm.errors(x)]  # this image's errors as "references": the clean model again
    with rrm.spliced(error_values=dict(enumerate(own))):
        torch.testing.assert_close(model(x), model.run_with_hooks(x), atol=1e-4, rtol=1e-4)
    zeros = {layer: torch.zeros_like(e) for layer, e in enumerate(own)}  # zero errors: the pure replacement model
    with rrm.spliced(error_values=zeros):
        dropped = model(x)
    with rrm.spliced():
        torch.testing.assert_close(dropped, model(x))
    mean = rrm.reference_values(pixels[:32], "mean", of="errors")
    assert len(mean) == 6 and mean[0].shape == (65, 128)
    errs = rrm.errors(pixels[:32])
    torch.testing.assert_close(mean[2], errs[2].mean(0))
    with rrm.spliced(error_values={2: mean[2]}):  # a reference error moves the output
        assert not torch.allclose(model(x), dropped)
    with pytest.raises(ValueError, match="not spliced"), rrm.spliced(layers=[0], error_values={3: mean[3]}):
        pass
    with pytest.raises(ValueError, match="reference target"):
        rrm.reference_values(pixels[:4], "mean", of="weights")
