"""The TopK training SAE of ``training/auxk.py`` against SAELens's own ``TopKTrainingSAE``: with the
decoder-norm rescaling folded into the weights, the same outputs, losses and gradients (float64)."""

from __future__ import annotations

import pytest
import torch
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput

from sae_vision_ext.training.auxk import AuxKTopKTrainingSAE, AuxKTopKTrainingSAEConfig


def _pair(norm: str, rescale: bool):
    kw = dict(d_in=24, d_sae=64, k=4, dtype="float64", normalize_activations=norm, rescale_acts_by_decoder_norm=rescale)
    torch.manual_seed(0)
    ours = AuxKTopKTrainingSAE(AuxKTopKTrainingSAEConfig(**kw))
    theirs = TopKTrainingSAE(TopKTrainingSAEConfig(**kw))
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)
        ours.W_dec.mul_(torch.rand(64, 1, dtype=torch.float64) * 2 + 0.2)  # rows of unequal norm
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _step(sae, x, dead):
    sae.zero_grad()
    out = sae.training_forward_pass(
        TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False)
    )
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in sae.named_parameters()}


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("norm", ["none", "expected_average_only_in"])
def test_folded_rescaling_equals_saelens(norm, rescale):
    ours, theirs = _pair(norm, rescale)
    x = torch.randn(32, 24, dtype=torch.float64) * 3 + 1
    dead = torch.zeros(64, dtype=torch.bool)  # AuxK off: SAELens's loss is then the same function
    (a, ga), (b, gb) = _step(ours, x, dead), _step(theirs, x, dead)
    torch.testing.assert_close(a.feature_acts, b.feature_acts, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.sae_out, b.sae_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-12, atol=1e-12)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)


def test_auxk_loss_with_folded_rescaling_equals_saelens_formula():
    """With dead latents, the AuxK term is SAELens's formula on the residual (normalisation none)."""
    ours, theirs = _pair("none", True)
    ours.cfg.k_aux = theirs.cfg.d_in // 2  # SAELens's fixed k_aux
    x = torch.randn(32, 24, dtype=torch.float64)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    (a, ga), (b, gb) = _step(ours, x, dead), _step(theirs, x, dead)
    aux = a.losses["auxiliary_reconstruction_loss"].detach()
    assert float(aux) > 0
    torch.testing.assert_close(aux, b.losses["auxiliary_reconstruction_loss"].detach(), rtol=1e-10, atol=1e-12)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-9, atol=1e-12, msg=name)
