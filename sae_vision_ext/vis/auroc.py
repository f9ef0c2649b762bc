"""One-against-the-rest AUROCs of many scores at once, exact or streamed (``vis/analysis.py``).

A *sample* is what an attribute labels (an image, or one patch of an image); a score per sample and
feature; integer codes per sample (``-1``: unknown, left out). For code ``c`` the positives are the
samples with code ``c`` and the negatives every other sample with a known code.

- **Exact** (:func:`rank_auroc`): the Mann-Whitney statistic with ties counted one half,
  ``(Σ rank(positives) − n_pos·(n_pos + 1)/2) / (n_pos·n_neg)`` with mid-ranks among the known
  samples (a tie group shares the mean of its ranks). One sort per block of features serves every
  attribute of a level without unknown codes; twice the ranks and their sums are integers (int64,
  exact), the final ratio float64. No host round trip inside the loop (CUDA-ready).
- **Streamed** (:class:`AurocAccumulator` with ``exact=False``): histograms of the scores (bin 0:
  ``score <= 0``; then ``N_BINS - 1`` log-spaced bins over ``[1e-3, 1e2]``, see :func:`score_bins`)
  and :func:`auroc_from_histograms` (pairs in the same bin count one half). Only pairs sharing a bin
  can be misjudged, each by at most one half, so ``|AUROC_hist − AUROC_exact| <=
  Σ_b pos_b·neg_b / (2·n_pos·n_neg)`` (:func:`histogram_bound`), summed over every bin except bin 0
  when the feature never scored below zero (bin 0 then holds exact zeros: true ties).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

N_BINS = 64
"""Score bins: bin 0 is a score ``<= 0`` (an exact zero for non-negative activations), then
log-spaced bins over [1e-3, 1e2]."""
_EDGES = torch.logspace(-3, 2, N_BINS - 2)
WORK_BYTES = 64 << 20
"""Working memory of one feature block of :func:`rank_auroc` (about 64 bytes per sample and feature)."""
_BYTES_PER_ENTRY = 64


def score_bins(scores: Tensor) -> Tensor:
    """The histogram bin of each score (see the module docstring)."""
    b = torch.bucketize(scores.float().clamp_min(0), _EDGES.to(scores.device)) + 1
    return torch.where(scores > 0, b, torch.zeros_like(b))


def auroc_from_histograms(pos: Tensor, neg: Tensor) -> Tensor:
    """AUROC per row of ``[..., N_BINS]`` positive/negative histograms (ties within a bin: one half);
    NaN where a row has no positives or no negatives."""
    pos, neg = pos.double(), neg.double()
    below = neg.cumsum(-1) - neg
    n_pos, n_neg = pos.sum(-1), neg.sum(-1)
    area = (pos * (below + 0.5 * neg)).sum(-1)
    out = area / (n_pos * n_neg)
    return torch.where((n_pos > 0) & (n_neg > 0), out, torch.full_like(out, float("nan")))


def histogram_bound(pos: Tensor, neg: Tensor, zero_bin_tied: Tensor | bool = True) -> Tensor:
    """Upper bound on ``|auroc_from_histograms(pos, neg) − exact AUROC|`` per row (module docstring):
    ``Σ_b pos_b·neg_b / (2·n_pos·n_neg)``, bin 0 left out where ``zero_bin_tied`` (broadcast over the
    rows: bin 0 holds equal scores only)."""
    pos, neg = pos.double(), neg.double()
    shared = pos * neg
    tied = torch.as_tensor(zero_bin_tied, device=pos.device)
    shared[..., 0] = torch.where(tied, torch.zeros_like(shared[..., 0]), shared[..., 0])
    n_pos, n_neg = pos.sum(-1), neg.sum(-1)
    out = 0.5 * shared.sum(-1) / (n_pos * n_neg)
    return torch.where((n_pos > 0) & (n_neg > 0), out, torch.full_like(out, float("nan")))


def _mid_ranks(scores: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise sort of ``[B, m]`` scores: the permutation and twice each sorted entry's 1-based
    mid-rank, an integer (a tie group at 0-based positions ``left .. right - 1`` shares the mid-rank
    ``(left + 1 + right) / 2``)."""
    ordered, perm = torch.sort(scores, dim=1)
    left = torch.searchsorted(ordered, ordered, side="left")
    return perm, left.add_(torch.searchsorted(ordered, ordered, side="right")).add_(1)


def _rank_auroc_known(
    scores: Tensor, codes: Sequence[Tensor], n_values: Sequence[int], work_bytes: int
) -> list[Tensor]:
    """:func:`rank_auroc` for code vectors without unknowns (one sort per feature block serves all)."""
    m, n_feat = scores.shape
    dev = scores.device
    out = [torch.empty(n_feat, k, dtype=torch.float64, device=dev) for k in n_values]
    n_pos = [torch.bincount(c, minlength=k).double()[None, :k] for c, k in zip(codes, n_values, strict=True)]
    block = max(1, min(n_feat, work_bytes // max(1, m * _BYTES_PER_ENTRY)))
    for f0 in range(0, n_feat, block):
        perm, mid2 = _mid_ranks(scores[:, f0 : f0 + block].T.contiguous())  # [B, m]
        for k, c in enumerate(codes):
            sums2 = torch.zeros(len(mid2), n_values[k], dtype=torch.long, device=dev)
            sums2.scatter_add_(1, c[perm], mid2)  # twice the rank sum of each value's samples (exact)
            p = n_pos[k]
            q = m - p
            auc = (sums2.double() / 2 - p * (p + 1) / 2) / (p * q)
            out[k][f0 : f0 + block] = torch.where((p > 0) & (q > 0), auc, torch.full_like(auc, float("nan")))
    return out


def rank_auroc(
    scores: Tensor, codes: Sequence[Tensor], n_values: Sequence[int], *, work_bytes: int = WORK_BYTES
) -> list[Tensor]:
    """Exact AUROC (module docstring) of every column of ``scores`` ``[m, F]`` for every value of every
    code vector (``codes[k]``: ``[m]`` integers, ``-1`` unknown; values ``0 .. n_values[k] - 1``).
    Returns per code vector ``[F, n_values[k]]`` float64, NaN for a value without a positive or a
    negative. Features are sorted in blocks of about ``work_bytes`` of working memory; the code vectors
    without unknowns share one sort, one with unknowns is ranked among its known samples."""
    codes = [c.to(scores.device).long().flatten() for c in codes]
    known = [bool((c >= 0).all()) for c in codes]
    out: list[Tensor | None] = [None] * len(codes)
    full = [k for k, ok in enumerate(known) if ok]
    if full:
        res = _rank_auroc_known(scores, [codes[k] for k in full], [n_values[k] for k in full], work_bytes)
        for k, r in zip(full, res, strict=True):
            out[k] = r
    for k, ok in enumerate(known):
        if not ok:
            keep = codes[k] >= 0
            out[k] = _rank_auroc_known(scores[keep], [codes[k][keep]], [n_values[k]], work_bytes)[0]
    return out  # type: ignore[return-value]


class AurocAccumulator:
    """The scores of one SAE at one level, batch by batch: kept whole for :func:`rank_auroc`
    (``exact=True``), else binned into per-code histograms (module docstring)."""

    def __init__(
        self,
        d_sae: int,
        n_samples: int,
        codes: Sequence[Tensor],
        n_values: Sequence[int],
        *,
        exact: bool,
        device: torch.device,
    ) -> None:
        self.d, self.exact, self.n_values = d_sae, exact, list(n_values)
        self.codes = [c.to(device).long().flatten() for c in codes]
        if exact:
            self.scores = torch.empty(n_samples, d_sae, dtype=torch.float32, device=device)
        else:
            self.hist = [torch.zeros(k * d_sae * N_BINS, dtype=torch.long, device=device) for k in self.n_values]
            self.negative = torch.zeros(d_sae, dtype=torch.bool, device=device)
        self.feats = torch.arange(d_sae, device=device)

    def add(self, start: int, scores: Tensor) -> None:
        """Scores ``[b, d_sae]`` of samples ``start .. start + b - 1``."""
        if self.exact:
            self.scores[start : start + len(scores)] = scores
            return
        bins = score_bins(scores)
        self.negative |= (scores < 0).any(0)
        for k, c in enumerate(self.codes):
            v = c[start : start + len(scores)]
            idx = ((v[:, None] * self.d + self.feats) * N_BINS + bins)[v >= 0]
            self.hist[k] += torch.bincount(idx.flatten(), minlength=len(self.hist[k]))

    def result(self) -> tuple[list[Tensor], list[Tensor]]:
        """Per code vector the AUROCs ``[d_sae, n_values]`` (float64) and their error bounds (zero
        when exact)."""
        if self.exact:
            aurocs = rank_auroc(self.scores, self.codes, self.n_values)
            return aurocs, [torch.zeros_like(a) for a in aurocs]
        aurocs, bounds = [], []
        for k, h in zip(self.n_values, self.hist, strict=True):
            p = h.view(k, self.d, N_BINS).transpose(0, 1)  # [d, n_values, bins]
            neg = p.sum(1, keepdim=True) - p  # every sample with a known code, per bin, minus the positives
            aurocs.append(auroc_from_histograms(p, neg))
            bounds.append(histogram_bound(p, neg, ~self.negative[:, None]))
        return aurocs, bounds
