"""TopK transcoders, which SAELens 6.54 lacks beside its ``transcoder``, ``skip_transcoder``,
``jumprelu_transcoder`` and ``jumprelu_skip_transcoder``.

``topk_transcoder`` and ``topk_skip_transcoder`` are SAELens's ``Transcoder`` and ``SkipTranscoder``
with SAELens's own ``TopK`` activation (the ``k`` largest pre-activations, ReLU'd) and a ``k`` in the
config; they register with SAELens's registry (:func:`ensure_registered`, idempotent, run by
``import sae_vision_ext`` in either import order), so plain ``sae_lens.SAE.load_from_disk`` reads
their ``cfg.json``. Every transcoder this package trains records its input hook as
``cfg.metadata.hook_name`` (``blocks.{l}.ln2.hook_normalized`` or ``blocks.{l}.hook_resid_mid``) and
its output as ``cfg.metadata.hook_name_out`` (``blocks.{l}.hook_mlp_out``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from sae_lens.saes.topk_sae import TopK
from sae_lens.saes.transcoder import SkipTranscoder, SkipTranscoderConfig, Transcoder, TranscoderConfig

TRANSCODER_ARCHITECTURES = (
    "transcoder",
    "skip_transcoder",
    "jumprelu_transcoder",
    "jumprelu_skip_transcoder",
    "topk_transcoder",
    "topk_skip_transcoder",
)
"""SAELens inference architectures that are transcoders (input hook -> MLP output)."""


@dataclass
class TopKTranscoderConfig(TranscoderConfig):
    """``TranscoderConfig`` plus ``k``."""

    k: int = 100
    """Active features per token (the ``k`` largest pre-activations)."""

    @classmethod
    def architecture(cls) -> str:
        return "topk_transcoder"


@dataclass
class TopKSkipTranscoderConfig(TopKTranscoderConfig):
    """``TopKTranscoderConfig`` of a transcoder with a linear skip ``x @ W_skip.T``."""

    @classmethod
    def architecture(cls) -> str:
        return "topk_skip_transcoder"


class TopKTranscoder(Transcoder):
    """SAELens's ``Transcoder`` with a TopK activation."""

    cfg: TopKTranscoderConfig  # type: ignore[assignment]

    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return TopK(self.cfg.k)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> TopKTranscoder:
        return cls(TopKTranscoderConfig.from_dict(config_dict))


class TopKSkipTranscoder(SkipTranscoder):
    """SAELens's ``SkipTranscoder`` with a TopK activation."""

    cfg: TopKSkipTranscoderConfig  # type: ignore[assignment]

    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return TopK(self.cfg.k)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> TopKSkipTranscoder:
        return cls(TopKSkipTranscoderConfig.from_dict(config_dict))


def ensure_registered() -> None:
    """Register ``topk_transcoder`` and ``topk_skip_transcoder`` with SAELens (once)."""
    from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class

    for name, sae_cls, cfg_cls in (
        ("topk_transcoder", TopKTranscoder, TopKTranscoderConfig),
        ("topk_skip_transcoder", TopKSkipTranscoder, TopKSkipTranscoderConfig),
    ):
        if name not in SAE_CLASS_REGISTRY:
            register_sae_class(name, sae_cls, cfg_cls)


__all__ = [
    "TRANSCODER_ARCHITECTURES",
    "SkipTranscoderConfig",
    "TopKSkipTranscoder",
    "TopKSkipTranscoderConfig",
    "TopKTranscoder",
    "TopKTranscoderConfig",
    "ensure_registered",
]

ensure_registered()  # SAELens is loaded (imported above): register now, whichever module imported SAELens first
