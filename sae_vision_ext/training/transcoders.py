"""Training transcoders with SAELens's training SAEs: each transcoder is SAELens's TopK (this package's
AuxK subclass), standard (ReLU + L1) or JumpReLU training SAE, extended through its own extension
points (``initialize_weights``, ``process_sae_in``, ``training_forward_pass``) to map an input hook to
an output hook instead of reconstructing its input. No SAELens code is copied.

A training batch is one tensor ``[batch, d_in + d_out]``, the input and the target side by side (what
:mod:`.pairs` builds from one harvest), so SAELens's ``MultiSAETrainer``, its Adam, schedulers,
dead-feature window, checkpoints and activation scaler (one factor for both halves, folded into the
weights at the end as for any SAE: ``f(c·x)/c``) drive it unchanged. The loss is
``|ŷ − y|²`` summed over the output plus the architecture's sparsity term (AuxK's residual is
``y − ŷ``). Registered with SAELens's training registry (:func:`ensure_training_registered`):

============================  ============  ===================================
training architecture         activation    saved as (SAELens inference class)
============================  ============  ===================================
``topk_transcoder``           TopK + AuxK   ``topk_transcoder`` (saes/transcoders.py)
``topk_skip_transcoder``      TopK + AuxK   ``topk_skip_transcoder``
``transcoder``                ReLU + L1     ``transcoder``
``skip_transcoder``           ReLU + L1     ``skip_transcoder``
``jumprelu_transcoder``       JumpReLU, L0  ``jumprelu_transcoder``
``jumprelu_skip_transcoder``  JumpReLU, L0  ``jumprelu_skip_transcoder``
============================  ============  ===================================

``skip`` variants learn ``x @ W_skip.T`` (``[d_out, d_in]``, zero at the start) beside the features.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from sae_lens import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from torch import nn

from .auxk import AuxKTopKTrainingSAE, AuxKTopKTrainingSAEConfig


class _TranscoderTraining:
    """What turns a SAELens training SAE into a training transcoder (module docstring)."""

    cfg: Any
    W_enc: nn.Parameter
    W_dec: nn.Parameter
    b_dec: nn.Parameter
    W_skip: nn.Parameter | None

    def initialize_weights(self) -> None:
        super().initialize_weights()  # type: ignore[misc]
        d_out, d_in = self.cfg.d_out, self.cfg.d_in
        if d_out != d_in:  # SAELens sized the decoder for d_in: give it d_out rows, as its Transcoder does
            w = torch.empty(self.cfg.d_sae, d_out, dtype=self.W_enc.dtype, device=self.W_enc.device)
            nn.init.kaiming_uniform_(w)
            if self.cfg.decoder_init_norm is not None:
                w = w / w.norm(dim=-1, keepdim=True) * self.cfg.decoder_init_norm
            self.W_dec = nn.Parameter(w)
            self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=self.W_enc.dtype, device=self.W_enc.device))
        skip = self.cfg.skip_connection
        self.W_skip = (
            nn.Parameter(torch.zeros(d_out, d_in, dtype=self.W_enc.dtype, device=self.W_enc.device)) if skip else None
        )

    def process_sae_in(self, sae_in: torch.Tensor) -> torch.Tensor:
        """SAELens's ``Transcoder.process_sae_in``: no ``b_dec`` (an output-space bias) subtracted."""
        sae_in = self.hook_sae_input(sae_in.to(self.W_enc.dtype))  # type: ignore[attr-defined]
        return self.run_time_activation_norm_fn_in(sae_in)  # type: ignore[attr-defined]

    def split(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input, target)`` halves of a training batch ``[..., d_in + d_out]``."""
        return batch[..., : self.cfg.d_in], batch[..., self.cfg.d_in :]

    def decoder_targets(self, batch: torch.Tensor) -> torch.Tensor:
        """What ``b_dec`` lives in: the target half (``trainer.initial_b_dec``)."""
        return self.split(batch)[1]

    def transcode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(output, feature_acts, hidden_pre)`` for inputs ``x``."""
        acts, hidden_pre = self.encode_with_hidden_pre(x)  # type: ignore[attr-defined]
        out = self.decode(acts)  # type: ignore[attr-defined]
        if self.W_skip is not None:
            out = out + x.to(self.W_skip.dtype) @ self.W_skip.T
        return out, acts, hidden_pre

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        threshold = getattr(self, "threshold", None)
        if threshold is not None:  # JumpReLU: SAELens keeps the threshold non-negative the same way
            with torch.no_grad():
                threshold.data.clamp_(min=0.0)
        x, y = self.split(step_input.sae_in)
        y = y.to(self.W_enc.dtype)
        out, acts, hidden_pre = self.transcode(x)
        mse_loss = self.mse_loss_fn(out, y).sum(dim=-1).mean()  # type: ignore[attr-defined]
        target_input = dataclasses.replace(step_input, sae_in=y)  # AuxK explains y − ŷ
        aux = self.calculate_aux_loss(target_input, acts, hidden_pre, out)  # type: ignore[attr-defined]
        losses = {"mse_loss": mse_loss, **(aux if isinstance(aux, dict) else {"aux_loss": aux})}
        return TrainStepOutput(
            sae_in=y, sae_out=out, feature_acts=acts, hidden_pre=hidden_pre, loss=sum(losses.values()), losses=losses
        )


@dataclass
class _TranscoderFields:
    d_out: int = 768
    """Width of the output hook (``blocks.{l}.hook_mlp_out``)."""
    skip_connection: bool = False
    """Learn a linear skip ``x @ W_skip.T`` beside the features."""
    apply_b_dec_to_input: bool = False
    """Always ``False``: ``b_dec`` is an output-space bias (SAELens's transcoders refuse ``True``)."""


@dataclass(kw_only=True)
class TopKTranscoderTrainingSAEConfig(_TranscoderFields, AuxKTopKTrainingSAEConfig):
    @classmethod
    def architecture(cls) -> str:
        return "topk_skip_transcoder" if cls is TopKSkipTranscoderTrainingSAEConfig else "topk_transcoder"


@dataclass(kw_only=True)
class TopKSkipTranscoderTrainingSAEConfig(TopKTranscoderTrainingSAEConfig):
    skip_connection: bool = True


@dataclass(kw_only=True)
class ReLUTranscoderTrainingSAEConfig(_TranscoderFields, StandardTrainingSAEConfig):
    @classmethod
    def architecture(cls) -> str:
        return "skip_transcoder" if cls is ReLUSkipTranscoderTrainingSAEConfig else "transcoder"


@dataclass(kw_only=True)
class ReLUSkipTranscoderTrainingSAEConfig(ReLUTranscoderTrainingSAEConfig):
    skip_connection: bool = True


@dataclass(kw_only=True)
class JumpReLUTranscoderTrainingSAEConfig(_TranscoderFields, JumpReLUTrainingSAEConfig):
    @classmethod
    def architecture(cls) -> str:
        return "jumprelu_skip_transcoder" if cls is JumpReLUSkipTranscoderTrainingSAEConfig else "jumprelu_transcoder"


@dataclass(kw_only=True)
class JumpReLUSkipTranscoderTrainingSAEConfig(JumpReLUTranscoderTrainingSAEConfig):
    skip_connection: bool = True


class TopKTranscoderTrainingSAE(_TranscoderTraining, AuxKTopKTrainingSAE):
    """TopK + AuxK training transcoder."""


class ReLUTranscoderTrainingSAE(_TranscoderTraining, StandardTrainingSAE):
    """ReLU + L1 training transcoder."""


class JumpReLUTranscoderTrainingSAE(_TranscoderTraining, JumpReLUTrainingSAE):
    """JumpReLU (L0 with a straight-through estimator) training transcoder."""


TRAINING_TRANSCODERS: dict[str, tuple[type, type]] = {
    "topk_transcoder": (TopKTranscoderTrainingSAE, TopKTranscoderTrainingSAEConfig),
    "topk_skip_transcoder": (TopKTranscoderTrainingSAE, TopKSkipTranscoderTrainingSAEConfig),
    "transcoder": (ReLUTranscoderTrainingSAE, ReLUTranscoderTrainingSAEConfig),
    "skip_transcoder": (ReLUTranscoderTrainingSAE, ReLUSkipTranscoderTrainingSAEConfig),
    "jumprelu_transcoder": (JumpReLUTranscoderTrainingSAE, JumpReLUTranscoderTrainingSAEConfig),
    "jumprelu_skip_transcoder": (JumpReLUTranscoderTrainingSAE, JumpReLUSkipTranscoderTrainingSAEConfig),
}
"""Training architecture -> (training SAE class, its config class)."""


def training_transcoder_architecture(architecture: str, activation: str) -> str:
    """The registered training architecture for ``architecture`` (``transcoder``/``skip_transcoder``, or
    one of :data:`TRAINING_TRANSCODERS`) with ``activation`` (``topk``, ``relu``, ``jumprelu``)."""
    if architecture in ("transcoder", "skip_transcoder"):
        return {"topk": "topk_", "relu": "", "jumprelu": "jumprelu_"}[activation] + architecture
    return architecture


def ensure_training_registered() -> None:
    """Register the training transcoders (and the CLT, :mod:`.clt_training`) with SAELens (once)."""
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY, register_sae_training_class

    from ..saes.transcoders import ensure_registered
    from .clt_training import CLTTrainingSAE, CLTTrainingSAEConfig

    ensure_registered()  # the inference classes the topk ones save as
    for name, (sae_cls, cfg_cls) in {**TRAINING_TRANSCODERS, "clt": (CLTTrainingSAE, CLTTrainingSAEConfig)}.items():
        if name not in SAE_TRAINING_CLASS_REGISTRY:
            register_sae_training_class(name, sae_cls, cfg_cls)


ensure_training_registered()  # SAELens is loaded (imported above): register now, whoever imported SAELens first
