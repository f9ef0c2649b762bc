"""SAELens's TopK training SAE with AuxK made configurable and correct under ``layer_norm``.

SAELens's ``TopKTrainingSAE`` fixes ``k_aux`` at ``d_in / 2`` and refuses AuxK with
``normalize_activations="layer_norm"`` ("the aux loss reconstruction would be in normalized space
while the residual is in the original space"). The seed paper (Kim et al. 2025) trains exactly that
combination: per-token standardisation plus AuxK (``k_aux`` 256, coefficient 1/32). This subclass
computes the residual in the standardised space, where the SAE reconstructs::

    x̃ = (x − μ) / (σ + ε)        the SAE's input (SAELens's layer_norm, μ, σ per token)
    ŷ = (y − μ) / σ              the SAE's output before SAELens de-standardises it
    e = x̃ − ŷ                    the residual the dead latents are asked to explain

and uses ``k_aux`` from the config (``None``: SAELens's ``d_in / 2``). Its architecture is ``topk``:
the inference SAE it saves is a stock SAELens ``TopKSAE`` (plain SAELens loads it).

With ``rescale_acts_by_decoder_norm`` (SAELens's default for TopK training), SAELens multiplies the
``[batch, d_sae]`` pre-activations by the decoder row norms ``n`` and divides the activations by
them again before decoding; here the same factors are folded into the weights instead
(``x @ (W_enc·n) + b_enc·n``, ``z @ (W_dec / n)``): the same function and gradients (tested against
SAELens's class in float64) for two ``[d_in, d_sae]`` products in place of two ``[batch, d_sae]`` ones
each way, a fifth of a training step on a CPU. ``hook_sae_acts_pre`` sees the rescaled
pre-activations (SAELens hooks them before the rescaling; no training code reads that hook).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.saes.topk_sae import calculate_topk_aux_acts

_LN_EPS = 1e-5  # SAELens's layer_norm epsilon (run_time_activation_ln_in)


@dataclass
class AuxKTopKTrainingSAEConfig(TopKTrainingSAEConfig):
    """``TopKTrainingSAEConfig`` plus ``k_aux`` (dead latents used by AuxK per token)."""

    k_aux: int | None = None
    """Top dead latents per token in the AuxK loss (``None``: ``d_in // 2``, SAELens's heuristic)."""

    @classmethod
    def architecture(cls) -> str:
        return "topk"


class AuxKTopKTrainingSAE(TopKTrainingSAE):
    """TopK training SAE whose AuxK residual lives in the SAE's own (standardised) space, with the
    decoder-norm rescaling folded into the weights (module docstring)."""

    cfg: AuxKTopKTrainingSAEConfig

    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.cfg.rescale_acts_by_decoder_norm:
            return super().encode_with_hidden_pre(x)
        sae_in = self.process_sae_in(x)
        norms = self.W_dec.norm(dim=-1)
        hidden_pre = self.hook_sae_acts_pre(sae_in @ (self.W_enc * norms) + self.b_enc * norms)
        return self.hook_sae_acts_post(self.activation_fn(hidden_pre)), hidden_pre

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        if not self.cfg.rescale_acts_by_decoder_norm or feature_acts.is_sparse:
            return super().decode(feature_acts)
        sae_out_pre = self.hook_sae_recons(feature_acts @ _unit_rows(self.W_dec) + self.b_dec)
        return self.reshape_fn_out(self.run_time_activation_norm_fn_out(sae_out_pre), self.d_head)

    def calculate_topk_aux_loss(
        self,
        sae_in: torch.Tensor,
        sae_out: torch.Tensor,
        hidden_pre: torch.Tensor,
        dead_neuron_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        if dead_neuron_mask is None or (num_dead := int(dead_neuron_mask.sum())) == 0:
            return sae_out.new_tensor(0.0)
        norm = self.cfg.normalize_activations
        if norm == "layer_norm":
            mu = sae_in.mean(dim=-1, keepdim=True)  # the statistics SAELens's layer_norm used in this step
            std = (sae_in - mu).std(dim=-1, keepdim=True)
            residual = ((sae_in - mu) / (std + _LN_EPS) - (sae_out - mu) / std).detach()
        elif norm in ("none", "expected_average_only_in"):  # the scaler acts before sae_in
            residual = (sae_in - sae_out).detach()
        else:
            raise ValueError(
                f"AuxK with normalize_activations={norm!r} is not supported; use layer_norm, "
                "expected_average_only_in or none, or set aux_coefficient=0."
            )
        k_aux = self.cfg.k_aux or sae_in.shape[-1] // 2
        scale = min(num_dead / k_aux, 1.0)
        auxk_acts = calculate_topk_aux_acts(
            k_aux=min(k_aux, num_dead), hidden_pre=hidden_pre, dead_neuron_mask=dead_neuron_mask
        )
        w_dec = _unit_rows(self.W_dec) if self.cfg.rescale_acts_by_decoder_norm else self.W_dec
        recons = auxk_acts @ w_dec
        return self.cfg.aux_loss_coefficient * scale * (recons - residual).pow(2).sum(dim=-1).mean()


def _unit_rows(w_dec: torch.Tensor) -> torch.Tensor:
    """``W_dec`` with rows of norm one: SAELens's ``act_times_W_dec`` rescaling, applied to the weights."""
    return w_dec / w_dec.norm(dim=-1, keepdim=True)
