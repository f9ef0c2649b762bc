"""The explored rows of an attribution graph, as dense blocks over each row's source set.

A row's sources are one layer's nodes (a target at SAE layer ``l`` reads the features and errors of
layer ``l − 1``, or the inputs, plus in MLP-leaf mode the MLP leaves of its own layer), so rows are
stored as blocks ``(targets [R], sources [S], weights [R, S])``: memory is bounded by the explored rows
(never ``N × N``; the magnitudes are kept beside the weights, so twice the explored rows), influence
is one matrix-vector product per block, and the sparse adjacency is built once, already in coalesced
order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class _Block:
    level: int
    targets: Tensor
    sources: Tensor
    weights: Tensor
    magnitude: Tensor
    inv_rowsum: Tensor


class RowStore:
    """Rows added batch by batch; ``level`` orders blocks for influence (a block's targets are sources
    only of blocks of a higher level: the SAE layer index, targets last)."""

    def __init__(self, n_nodes: int, target_weights: Tensor) -> None:
        self.n_nodes = n_nodes
        self.w = target_weights.double()
        self.blocks: list[_Block] = []
        self.n_edges = 0

    def add(self, level: int, targets: Tensor, sources: Tensor, weights: Tensor) -> None:
        """Rows ``targets`` (node ids ``[R]``) with edge weights ``weights [R, S]`` from ``sources`` (node ids
        ``[S]``, ascending)."""
        magnitude = weights.abs()  # kept: influence is recomputed while exploring
        inv = 1.0 / magnitude.sum(1).double().clamp_min(1e-30)
        self.blocks.append(_Block(level, targets, sources, weights, magnitude, inv))
        self.n_edges += weights.numel()

    def influence(self) -> Tensor:
        """``w (Â + Â² + …)`` over the stored rows (``graph/ops.py``: ``Â = |A| / rowsum|A|``): with the
        blocks taken from the highest level down, ``I[s] = Σ_t (w_t + I_t)·Â[t, s]`` is exact in one pass."""
        infl = torch.zeros(self.n_nodes, dtype=torch.float64, device=self.w.device)
        for block in sorted(self.blocks, key=lambda b: -b.level):
            mass = (self.w[block.targets] + infl[block.targets]) * block.inv_rowsum
            if not mass.any():
                continue
            contrib = mass.to(block.weights.dtype) @ block.magnitude
            infl.index_add_(0, block.sources, contrib.double())
        return infl

    def adjacency(self) -> Tensor:
        """The sparse ``[N, N]`` adjacency (``A[target, source]``), built in coalesced order: rows sorted by
        target (targets are unique across blocks; a level's rows all read one ascending source list)."""
        if not self.blocks:
            empty = torch.zeros(2, 0, dtype=torch.long)
            return torch.sparse_coo_tensor(empty, torch.zeros(0), (self.n_nodes, self.n_nodes)).coalesce()
        dev = self.blocks[0].weights.device
        indices = torch.empty(2, self.n_edges, dtype=torch.long, device=dev)
        values = torch.empty(self.n_edges, dtype=self.blocks[0].weights.dtype, device=dev)
        at = 0
        for level in sorted({b.level for b in self.blocks}):  # node ids grow with the level
            blocks = [b for b in self.blocks if b.level == level]
            sources = blocks[0].sources
            if any(not torch.equal(b.sources, sources) for b in blocks):
                raise ValueError(f"Rows of level {level} read different sources; they cannot share a block.")
            targets, order = torch.cat([b.targets for b in blocks]).sort()
            shape = (len(targets), len(sources))
            end = at + shape[0] * shape[1]
            indices[0, at:end].view(shape).copy_(targets[:, None].expand(shape))
            indices[1, at:end].view(shape).copy_(sources[None].expand(shape))
            weights = blocks[0].weights if len(blocks) == 1 else torch.cat([b.weights for b in blocks])
            torch.index_select(weights, 0, order, out=values[at:end].view(shape))
            at = end
        return torch.sparse_coo_tensor(
            indices, values, (self.n_nodes, self.n_nodes), is_coalesced=True, check_invariants=False
        )
