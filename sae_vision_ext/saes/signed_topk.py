"""``signed_topk``: TopK that keeps the k largest pre-activations even when negative (saev's TopK).

SAELens's ``TopKSAE`` applies a ReLU after selecting the top k, so it differs from saev whenever
fewer than k pre-activations are positive. This class reproduces saev exactly and registers with
SAELens under the architecture name ``signed_topk`` (:func:`ensure_registered`, idempotent), so
``SAE.load_from_disk`` reads its ``cfg.json`` once this package has registered it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sae_lens import TopKSAE, TopKSAEConfig
from torch import nn


class SignedTopK(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values, indices = torch.topk(x, k=self.k, dim=-1, sorted=False)
        return torch.zeros_like(x).scatter_(-1, indices, values)


@dataclass
class SignedTopKSAEConfig(TopKSAEConfig):
    @classmethod
    def architecture(cls) -> str:
        return "signed_topk"


class SignedTopKSAE(TopKSAE):
    cfg: SignedTopKSAEConfig

    def get_activation_fn(self) -> SignedTopK:
        return SignedTopK(self.cfg.k)


def ensure_registered() -> None:
    from sae_lens.registry import SAE_CLASS_REGISTRY, register_sae_class

    if "signed_topk" not in SAE_CLASS_REGISTRY:
        register_sae_class("signed_topk", SignedTopKSAE, SignedTopKSAEConfig)


ensure_registered()  # SAELens is loaded (imported above): register now, whichever module imported SAELens first
