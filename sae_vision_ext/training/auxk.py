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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.saes.topk_sae import act_times_W_dec, calculate_topk_aux_acts

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
    """TopK training SAE whose AuxK residual lives in the SAE's own (standardised) space."""

    cfg: AuxKTopKTrainingSAEConfig

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
        recons = act_times_W_dec(auxk_acts, self.W_dec, self.cfg.rescale_acts_by_decoder_norm)
        return self.cfg.aux_loss_coefficient * scale * (recons - residual).pow(2).sum(dim=-1).mean()
