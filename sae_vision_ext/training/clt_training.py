"""Training a cross-layer transcoder as one SAELens training SAE (architecture ``clt``).

The CLT's tensors live in a :class:`~..saes.clt.CrossLayerTranscoder` (``self.clt``: one home for its
math); this SAELens ``TrainingSAE`` adds the loss, so SAELens's trainer (Adam, schedulers, dead-feature
window, checkpoints, activation scaler) drives it unchanged. A training batch is one tensor
``[batch, n_layers·d_in + n_layers·d_out]``: every layer's input, then every layer's output, of the
same tokens (:mod:`.pairs`). The loss is ``Σ_j |ŷ_j − y_j|²`` (each layer's output reconstruction,
summed over layers) plus the sparsity term of ``activation``:

- ``topk``: none (``k`` per token and layer);
- ``relu``: ``l1_coefficient · Σ_l Σ_f a_lf · |W_dec[l][f]|`` (the feature's decoder norm over every
  layer it writes to);
- ``jumprelu``: ``l0_coefficient · Σ_l Σ_f H(pre_lf − θ_lf)`` with SAELens's straight-through step.

The trainer sees the features of all layers side by side (``d_sae = n_layers · d_sae_layer``), so
dead features and sparsity are counted per feature. ``save_inference_model`` writes circuit-tracer's
files (:func:`~..saes.clt.save_clt`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sae_lens.saes.jumprelu_sae import JumpReLU, Step
from sae_lens.saes.sae import TrainCoefficientConfig, TrainingSAE, TrainingSAEConfig, TrainStepInput, TrainStepOutput
from torch import nn

from ..saes.clt import CLTConfig, CrossLayerTranscoder, save_clt


@dataclass(kw_only=True)
class CLTTrainingSAEConfig(TrainingSAEConfig):
    """SAELens training config of a CLT; ``d_in`` is one layer's input width, ``d_sae`` all layers'
    features together (``n_layers · d_sae_layer``)."""

    n_layers: int = 1
    """Blocks of the model."""
    d_out: int = 768
    """One layer's output width."""
    activation: str = "topk"
    """``topk``, ``relu`` or ``jumprelu``."""
    k: int = 32
    """Active features per token and layer (``topk``)."""
    l1_coefficient: float = 1.0
    """Weight of the decoder-norm-weighted L1 term (``relu``)."""
    l0_coefficient: float = 1.0
    """Weight of the L0 term (``jumprelu``)."""
    jumprelu_init_threshold: float = 0.01
    """Initial threshold (``jumprelu``)."""
    jumprelu_bandwidth: float = 0.05
    """Straight-through estimator bandwidth (``jumprelu``)."""
    skip_connection: bool = False
    """Learn ``x_j @ W_skip[j]`` per layer."""
    hook_in: str = "ln2.hook_normalized"
    """What each layer's encoder reads (``blocks.{l}.<hook_in>``)."""
    apply_b_dec_to_input: bool = False
    """Always ``False`` (``b_dec`` is an output bias)."""

    @classmethod
    def architecture(cls) -> str:
        return "clt"

    def get_inference_config_class(self) -> type:
        from sae_lens.saes.transcoder import TranscoderConfig

        return TranscoderConfig  # for SAELens's metadata bookkeeping only; the CLT saves as circuit-tracer's

    @property
    def d_sae_layer(self) -> int:
        return self.d_sae // self.n_layers

    def clt_config(self) -> CLTConfig:
        return CLTConfig(
            d_in=self.d_in, d_sae=self.d_sae_layer, n_layers=self.n_layers, activation=self.activation,  # type: ignore[arg-type]
            k=self.k if self.activation == "topk" else None, hook_in=self.hook_in,  # type: ignore[arg-type]
            skip_connection=self.skip_connection, d_out=self.d_out, model_name=self.metadata.model_name,
            dtype=self.dtype, device=self.device,
        )  # fmt: skip


class CLTTrainingSAE(TrainingSAE[CLTTrainingSAEConfig]):
    """A CLT with SAELens's training interface (module docstring)."""

    clt: CrossLayerTranscoder

    def initialize_weights(self) -> None:
        """Encoders uniform in ``±1/√d_in``; each decoder row at norm ``decoder_init_norm`` (default 0.1)
        spread over the layers it writes to; ``W_enc[l]`` starts as the transpose of layer ``l``'s own
        decoder when ``d_in = d_out`` (SAELens's tied initialisation)."""
        cfg = self.cfg
        self.clt = CrossLayerTranscoder(cfg.clt_config())
        norm = 0.1 if cfg.decoder_init_norm is None else cfg.decoder_init_norm
        with torch.no_grad():
            for i, w in enumerate(self.clt.W_dec):
                nn.init.normal_(w)
                w.mul_(norm / w.norm(dim=-1, keepdim=True) / math.sqrt(cfg.n_layers - i))
            bound = 1 / math.sqrt(cfg.d_in)
            nn.init.uniform_(self.clt.W_enc, -bound, bound)
            if cfg.d_in == cfg.d_out:
                for layer in range(cfg.n_layers):
                    w0 = self.clt.W_dec[layer][:, 0]
                    self.clt.W_enc[layer].copy_(w0 / w0.norm(dim=-1, keepdim=True) * norm)
            if self.clt.threshold is not None:
                self.clt.threshold.fill_(cfg.jumprelu_init_threshold)

    @property
    def W_enc(self) -> nn.Parameter:  # type: ignore[override]
        return self.clt.W_enc

    @property
    def b_dec(self) -> nn.Parameter:  # type: ignore[override]
        return self.clt.b_dec

    def split(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs [n_layers, batch, d_in], targets [n_layers, batch, d_out])`` of a training batch."""
        n, d_in, d_out = self.cfg.n_layers, self.cfg.d_in, self.cfg.d_out
        x = batch[..., : n * d_in].reshape(*batch.shape[:-1], n, d_in).movedim(-2, 0)
        y = batch[..., n * d_in :].reshape(*batch.shape[:-1], n, d_out).movedim(-2, 0)
        return x.to(self.clt.W_enc.dtype), y.to(self.clt.W_enc.dtype)

    def decoder_targets(self, batch: torch.Tensor) -> torch.Tensor:
        """What ``b_dec`` lives in: ``[batch, n_layers, d_out]`` (``trainer.initial_b_dec``)."""
        return self.split(batch)[1].movedim(0, -2)

    def _acts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = torch.stack([self.clt.pre_acts_layer(x[layer], layer) for layer in range(self.cfg.n_layers)])
        if self.cfg.activation != "jumprelu":
            acts = torch.stack([self.clt.activate(pre[layer], layer) for layer in range(self.cfg.n_layers)])
            return acts, pre
        assert self.clt.threshold is not None
        bw = self.cfg.jumprelu_bandwidth
        acts = torch.stack([JumpReLU.apply(pre[i], self.clt.threshold[i], bw, False) for i in range(len(pre))])
        return acts, pre

    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``[batch, n_layers·d_sae_layer]`` of a training batch (layers side by side)."""
        acts, pre = self._acts(self.split(x)[0])
        return _flat(acts), _flat(pre)

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("A CLT decodes per layer: use sae.clt.decode(acts, inputs).")

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        if self.clt.threshold is not None:
            with torch.no_grad():
                self.clt.threshold.data.clamp_(min=0.0)
        x, y = self.split(step_input.sae_in)
        acts, pre = self._acts(x)
        out = self.clt.decode(acts, x)
        losses = {"mse_loss": (out - y).pow(2).sum(dim=-1).mean(dim=-1).sum()}
        coefficient = step_input.coefficients
        if self.cfg.activation == "relu":
            norms = torch.stack([w.norm(dim=-1).pow(2).sum(-1).sqrt() for w in self.clt.W_dec])  # [n, d_sae]
            losses["l1_loss"] = coefficient["l1"] * (acts * norms[:, None]).sum(dim=(0, -1)).mean()
        elif self.cfg.activation == "jumprelu":
            assert self.clt.threshold is not None
            bw = self.cfg.jumprelu_bandwidth
            l0 = sum(Step.apply(pre[i], self.clt.threshold[i], bw, False).sum(-1) for i in range(len(pre)))
            losses["l0_loss"] = coefficient["l0"] * l0.mean()  # type: ignore[union-attr]
        return TrainStepOutput(
            sae_in=_flat(y), sae_out=_flat(out), feature_acts=_flat(acts), hidden_pre=_flat(pre),
            loss=sum(losses.values()), losses=losses,  # type: ignore[arg-type]
        )  # fmt: skip

    def calculate_aux_loss(
        self, step_input: TrainStepInput, feature_acts: torch.Tensor, hidden_pre: torch.Tensor, sae_out: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return {}

    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return {"relu": {"l1": self.cfg.l1_coefficient}, "jumprelu": {"l0": self.cfg.l0_coefficient}}.get(
            self.cfg.activation, {}
        )

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        """Trained on ``(c·x, c·y)``: ``f(c·x)/c`` has ``c·W_enc`` and ``W_dec/c``, ``b_dec/c`` (skip and
        thresholds unchanged)."""
        self.clt.W_enc.mul_(scaling_factor)
        for w in self.clt.W_dec:
            w.div_(scaling_factor)
        self.clt.b_dec.div_(scaling_factor)
        self.cfg.normalize_activations = "none"

    def log_histograms(self) -> dict[str, Any]:
        return {}

    def inference_clt(self) -> CrossLayerTranscoder:
        """A detached copy as the inference :class:`CrossLayerTranscoder` (``model_name`` from the metadata)."""
        cfg = self.cfg.clt_config()
        clt = CrossLayerTranscoder(cfg)
        clt.load_state_dict(self.clt.state_dict())
        return clt.eval()

    def save_inference_model(self, path: str | Path) -> tuple[Path, Path]:
        folder = save_clt(self.inference_clt(), path)
        return folder / "W_enc_0.safetensors", folder / "clt_config.json"


def _flat(t: torch.Tensor) -> torch.Tensor:
    """``[n_layers, batch, d]`` -> ``[batch, n_layers·d]``."""
    return t.movedim(0, -2).reshape(*t.shape[1:-1], -1)
