"""The logit lens equals the frozen model's response to adding a feature's decoder direction at every
token (finite difference of an affine map: exact), for every SAE class and normalisation, on every
adapter family with an affine readout."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import ARCHS, FAMILIES, NORMS, images, rrm_with

from sae_vision_ext.circuits.evaluate.logit_lens import logit_lens, top_bottom
from sae_vision_ext.circuits.replacement.linearise import frozen_hooks, pre_capture_hooks, record
from sae_vision_ext.saes import affine


def frozen_response(model, sae, x, layer: int, feature: int, step: float = 0.5) -> torch.Tensor:
    """Demeaned logits after adding ``step`` units of ``feature`` at every token of ``layer``, minus
    before, per unit, with everything the lens freezes frozen at ``x``."""
    frozen = record(model, x)
    hooks = pre_capture_hooks(model) + frozen_hooks(model, frozen)
    with torch.no_grad():
        _, cache = model.run_with_cache(x, names_filter=[f"blocks.{layer}.hook_resid_post"], return_cache_object=False)
        resid = cache[f"blocks.{layer}.hook_resid_post"][0]
        norm = affine.frozen_norm(sae, resid)
        d = affine.decoder_directions(sae, torch.full((resid.shape[0],), feature), norm)

        def push(t, hook):
            return t + step * d

        with model.hooks(fwd_hooks=hooks):
            base = model(x)
        with model.hooks(fwd_hooks=[*hooks, (f"blocks.{layer}.hook_resid_post", push)]):
            moved = model(x)
    delta = (moved - base)[0] / step
    return delta - delta.mean()


@pytest.mark.parametrize(("arch", "norm"), list(itertools.product(ARCHS, NORMS[:3])))
def test_lens_equals_the_frozen_response_for_every_sae_configuration(arch, norm):
    rrm = rrm_with("timm_cls", arch, norm, True)
    x = images(1).double()
    lens = logit_lens(rrm.model, rrm.saes, x)
    for layer in (0, rrm.model.cfg.n_layers - 1):  # a middle path and the direct path of the last block
        sae = rrm.saes[layer]
        effect = lens[sae.cfg.metadata.hook_name]
        assert effect.shape == (sae.cfg.d_sae, 5)
        for f in (0, 7):
            torch.testing.assert_close(
                effect[f].double(), frozen_response(rrm.model, sae, x, layer, f), rtol=1e-4, atol=1e-5
            )


@pytest.mark.parametrize("variant", FAMILIES)
def test_lens_on_every_adapter_family_and_averaged_over_images(variant):
    rrm = rrm_with(variant, "topk", "none", True)
    x = images(2).double()
    both = logit_lens(rrm.model, rrm.saes[:2], x)
    one = [logit_lens(rrm.model, rrm.saes[:2], x[i : i + 1]) for i in range(2)]
    for hook, effect in both.items():
        torch.testing.assert_close(effect, (one[0][hook] + one[1][hook]) / 2)
        assert effect.abs().sum() > 0
    sae = rrm.saes[1]
    torch.testing.assert_close(
        one[0][sae.cfg.metadata.hook_name][3].double(),
        frozen_response(rrm.model, sae, x[:1], 1, 3),
        rtol=1e-4,
        atol=1e-5,
    )


def test_top_bottom_and_bad_input():
    effect = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]])
    assert top_bottom(effect, 0, ["a", "b", "c"], k=2) == (["c (+2)", "a (+0.5)"], ["b (-1)", "a (+0.5)"])
    rrm = rrm_with("timm_cls", "topk", "none", True)
    with pytest.raises(ValueError, match="empty batch"):
        logit_lens(rrm.model, rrm.saes[:1], images(1).double()[:0])
    sae = rrm.saes[0]
    sae.cfg.metadata.hook_name = "blocks.0.hook_mlp_out"
    with pytest.raises(ValueError, match="hook_resid_post"):
        logit_lens(rrm.model, [sae], images(1).double())


def test_directions_give_zero_shot_scores_for_embedding_models():
    """hf_clip outputs the image embedding: with text-like directions the lens is the frozen change of
    <embedding, direction> per unit of the feature."""
    rrm = rrm_with("hf_clip", "topk", "layer_norm", True)
    assert rrm.model.adapter.output_kind() == "embedding"
    x = images(1).double()
    with torch.no_grad():
        width = rrm.model(x).shape[-1]
    torch.manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(3, width, dtype=torch.float64), dim=-1)
    sae = rrm.saes[1]
    lens = logit_lens(rrm.model, [sae], x, directions=dirs)[sae.cfg.metadata.hook_name]
    assert lens.shape == (sae.cfg.d_sae, 3)
    frozen = record(rrm.model, x)
    hooks = pre_capture_hooks(rrm.model) + frozen_hooks(rrm.model, frozen)
    with torch.no_grad():
        _, cache = rrm.model.run_with_cache(x, names_filter=["blocks.1.hook_resid_post"], return_cache_object=False)
        norm = affine.frozen_norm(sae, cache["blocks.1.hook_resid_post"][0])
        d = affine.decoder_directions(sae, torch.full((cache["blocks.1.hook_resid_post"].shape[1],), 5), norm)
        with rrm.model.hooks(fwd_hooks=hooks):
            base = rrm.model(x)
        with rrm.model.hooks(fwd_hooks=[*hooks, ("blocks.1.hook_resid_post", lambda t, hook: t + d)]):
            moved = rrm.model(x)
    torch.testing.assert_close(lens[5].double(), ((moved - base)[0] @ dirs.T), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="directions must be"):
        logit_lens(rrm.model, [sae], x, directions=dirs[:, :3])
