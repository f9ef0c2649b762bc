"""Stability across seeds: how many features two SAEs trained alike share.

Two runs are compared by their decoder rows (``W_dec [d_sae, d_in]``, each row scaled to unit
norm): the Hungarian matching (``scipy.optimize.linear_sum_assignment``) pairs every row of one run
with one row of the other so that the summed cosine is largest, and the **share matched** is the
fraction of pairs whose cosine is at least ``threshold`` (default 0.7, a common choice in the
literature on SAE consistency). Over ``N`` runs every one of the ``N (N - 1) / 2`` pairs is matched;
:class:`Stability` gives the shares, their mean and standard deviation (the spread), min and max,
and the mean matched cosine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

if TYPE_CHECKING:
    from sae_lens import SAE

DEFAULT_THRESHOLD = 0.7
"""Cosine a matched pair of decoder rows needs to count as the same feature."""


def matched_cosines(w_a: Float[Tensor, "d_sae_a d_in"], w_b: Float[Tensor, "d_sae_b d_in"]) -> Float[Tensor, " m"]:
    """Cosines of the Hungarian matching of the rows of ``w_a`` and ``w_b`` (largest total cosine),
    ``m = min(d_sae_a, d_sae_b)`` values, in the row order of the smaller side's matched rows."""
    from scipy.optimize import linear_sum_assignment

    if w_a.ndim != 2 or w_b.ndim != 2 or w_a.shape[1] != w_b.shape[1]:
        raise ValueError(f"decoders must be [d_sae, d_in] of one d_in; got {tuple(w_a.shape)} and {tuple(w_b.shape)}.")
    a = torch.nn.functional.normalize(w_a.detach().double().cpu(), dim=1)
    b = torch.nn.functional.normalize(w_b.detach().double().cpu(), dim=1)
    cos = (a @ b.T).numpy()
    rows, cols = linear_sum_assignment(cos, maximize=True)
    return torch.from_numpy(cos[rows, cols])


@dataclass
class Stability:
    """Share of features matched across runs (module docstring)."""

    threshold: float
    shares: list[float]
    """One per pair of runs, in ``itertools.combinations`` order."""
    mean_cosine: float
    """Mean matched cosine over all pairs."""

    @property
    def mean(self) -> float:
        return float(np.mean(self.shares))

    @property
    def std(self) -> float:
        """The spread: standard deviation of the pair shares (0 for a single pair)."""
        return float(np.std(self.shares))

    @property
    def min(self) -> float:
        return float(np.min(self.shares))

    @property
    def max(self) -> float:
        return float(np.max(self.shares))

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "shares": self.shares,
            "mean": self.mean,
            "std": self.std,
            "min": self.min,
            "max": self.max,
            "mean_cosine": self.mean_cosine,
        }


def decoder_of(sae: SAE | Tensor) -> Float[Tensor, "d_sae d_in"]:
    """``W_dec`` of a SAELens SAE (``[d_sae, d_in]``), or a tensor passed as is."""
    return sae if isinstance(sae, Tensor) else sae.W_dec


def stability(saes: Sequence[SAE | Tensor], threshold: float = DEFAULT_THRESHOLD) -> Stability:
    """Share of decoder rows matched at cosine ``>= threshold`` for every pair of ``saes`` (SAELens
    SAEs or decoders ``[d_sae, d_in]``) trained alike with different seeds."""
    if len(saes) < 2:
        raise ValueError(f"stability needs at least 2 runs; got {len(saes)}.")
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold={threshold} must be a cosine in [-1, 1].")
    decoders = [decoder_of(s) for s in saes]
    shares, cosines = [], []
    for a, b in combinations(decoders, 2):
        c = matched_cosines(a, b)
        shares.append(float((c >= threshold).double().mean()))
        cosines.append(float(c.mean()))
    return Stability(threshold, shares, float(np.mean(cosines)))
