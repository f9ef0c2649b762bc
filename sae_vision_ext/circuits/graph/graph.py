"""``AttributionGraph``: the graph type of ``circuits/engine/attribution.py``, with its pruning, scores,
export and token-aggregated view (the algorithms live in ``graph/ops.py``, the circuit-tracer files in
``graph/export.py``, node names in ``graph/nodes.py``).

Node order (rows and columns of ``adjacency``): inputs (one per position), then per SAE layer (its
block number in ``node_layer``) the MLP leaves (MLP-leaf mode), active features sorted by position
then feature, and one error node per position; then the targets. Transcoder graphs
(``engine/transcoder_attribution.py``) have the same order with a layer per block (features of the
block's transcoder, then its MLP error nodes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


@dataclass
class AttributionGraph:
    """Nodes (see the module docstring for their order) and the sparse adjacency ``A[target, source]``."""

    node_kind: list[str]
    """``input``, ``feature``, ``error`` or ``target`` per node."""
    node_layer: Tensor
    """Layer of each node (-1 for inputs, n_layers for targets)."""
    node_pos: Tensor
    """Token position (-1 for targets)."""
    node_feature: Tensor
    """SAE feature id (-1 for inputs, errors and targets)."""
    activation: Tensor
    """Feature activation; error-vector norm for errors; input-residual norm for inputs; value for targets."""
    adjacency: Tensor
    """Sparse COO ``[n_nodes, n_nodes]``: rows targets, columns sources (direct effects)."""
    value: Tensor
    """Pre-activation ``h_t`` of every node that was a target (features and targets), NaN otherwise."""
    constant: Tensor
    """Bias-only response of every node that was a target, NaN otherwise."""
    target_names: list[str] = field(default_factory=list)
    target_classes: list[int] = field(default_factory=list)
    """Class of each target when targets are (demeaned) class logits."""
    weights: Tensor | None = None
    """Target weights ``w`` for influence (softmax probability of each target's class, normalised)."""
    target_probs: Tensor | None = None
    """The model's softmax probability of each target's class (NaN for targets that are not classes)."""
    n_prefix: int = 1
    has_cls: bool = True
    grid: tuple[int, int] = (1, 1)
    node_mask: Tensor | None = None
    """Kept nodes after ``prune`` (``None``: unpruned)."""
    edge_mask: Tensor | None = None
    cumulative_influence: Tensor | None = None
    """After ``prune``: each node's cumulative influence share (circuit-tracer's exported ``influence``)."""
    pruning: tuple[float, float] | None = None
    """``(node_threshold, edge_threshold)`` of ``prune``."""
    transcoder_list: list[str] = field(default_factory=list)
    """circuit-tracer's ``metadata.transcoder_list``: a transcoder graph's transcoder input hooks; empty for
    a residual graph (the export names ``blocks.L.hook_resid_post`` of its SAE layers)."""

    @property
    def n_nodes(self) -> int:
        return len(self.node_kind)

    def dense(self) -> Tensor:
        return self.adjacency.to_dense()

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> AttributionGraph:
        """A copy with ``node_mask``/``edge_mask`` set (see ``graph/ops.py``: ``prune``)."""
        from dataclasses import replace

        from .ops import prune

        result = prune(self, node_threshold, edge_threshold)
        pruned = replace(
            self,
            node_mask=result.node_mask,
            edge_mask=result.edge_mask,
            cumulative_influence=result.cumulative_scores,
            pruning=(node_threshold, edge_threshold),
        )
        pruned.__dict__["_influence_cache"] = self.__dict__.get("_influence_cache", {})  # same adjacency
        return pruned

    def scores(self) -> dict[str, float]:
        """Replacement and completeness, unpruned and (if pruned) pruned."""
        from .ops import scores

        out = {f"{k}": v for k, v in scores(self).items()}
        if self.node_mask is not None:
            out |= {f"{k}_pruned": v for k, v in scores(self, self.node_mask).items()}
        return out

    def to_json(self, path: str | Path, **kwargs: Any) -> dict[str, Any]:
        """Write circuit-tracer's files for this graph and return the graph JSON: ``path`` is
        ``<dir>/<slug>.json`` (``graph-metadata.json`` and ``features/`` go beside it, as
        circuit-tracer's server reads them); keyword arguments as in ``export.write_circuit_tracer``."""
        from .export import write_circuit_tracer

        path = Path(path)
        if path.suffix != ".json":
            raise ValueError(f"to_json writes <dir>/<slug>.json; got {str(path)!r}. Pass a path ending in .json.")
        return write_circuit_tracer(self, path.parent, slug=path.stem, **kwargs)

    def aggregate_positions(self) -> tuple[list[tuple[str, int, int]], Tensor]:
        """Token-aggregated view (as the seed paper reports): nodes ``(kind, layer, feature)`` with
        edges summed over positions; returns the node keys and a dense matrix."""
        node_keys = [
            (k, int(layer), int(f))
            for k, layer, f in zip(self.node_kind, self.node_layer, self.node_feature, strict=True)
        ]
        keys = sorted(set(node_keys))
        index = {k: i for i, k in enumerate(keys)}
        node_to_key = torch.tensor([index[k] for k in node_keys])
        a = self.adjacency.coalesce()
        out = torch.zeros(len(keys), len(keys), dtype=a.values().dtype)
        out.index_put_((node_to_key[a.indices()[0]], node_to_key[a.indices()[1]]), a.values(), accumulate=True)
        return keys, out


__all__ = ["AttributionGraph"]


@dataclass
class AggregatedGraph:
    """The token-aggregated graph (module docstring). Per SAE layer ``i`` (block ``layers[i]``)."""

    layers: list[int]
    """Blocks with an SAE, ascending."""
    relevance: list[Tensor]
    """``[d_sae_i + 1]`` per layer: feature relevances, then the error node's."""
    edges: list[Tensor]
    """``edges[i]``: ``[d_sae_{i+1} + 1, d_sae_i + 1]`` (rows targets: the next layer's features then its
    error node; columns sources), and for the last layer ``[1, d_sae + 1]`` into the output."""
    target_class: int | None
    target_value: float
    """The target (demeaned logit) on the image."""
    leaf_errors: bool
    activation: list[Tensor] = field(default_factory=list)
    """``[d_sae_i]``: each feature's activation summed over tokens."""

    def to_json(self, path: str | Path | None = None, min_abs_edge: float = 0.0) -> dict[str, Any]:
        """Nodes ``{layer, feature (-1: error), relevance, activation}`` and links ``{source, target,
        weight}`` (ids ``"{layer}_{feature}"``, ``"{layer}_err"``, ``"output"``), edges with
        ``|weight| > min_abs_edge``; written to ``path`` if given."""
        nodes, links = [], []

        def node_id(i: int, f: int) -> str:
            return f"{self.layers[i]}_err" if f == len(self.relevance[i]) - 1 else f"{self.layers[i]}_{f}"

        for i, rel in enumerate(self.relevance):
            for f, r in enumerate(rel.tolist()):
                is_err = f == len(rel) - 1
                act = 0.0 if is_err else float(self.activation[i][f]) if self.activation else 0.0
                if r != 0 or act != 0:
                    nodes.append(
                        {
                            "id": node_id(i, f),
                            "layer": self.layers[i],
                            "feature": -1 if is_err else f,
                            "relevance": r,
                            "activation": act,
                        }
                    )
        nodes.append({"id": "output", "layer": None, "feature": self.target_class, "relevance": self.target_value})
        for i, e in enumerate(self.edges):
            rows, cols = (e.abs() > min_abs_edge).nonzero(as_tuple=True)
            for t, s in zip(rows.tolist(), cols.tolist(), strict=True):
                target = "output" if i == len(self.edges) - 1 else node_id(i + 1, t)
                links.append({"source": node_id(i, s), "target": target, "weight": float(e[t, s])})
        out = {
            "layers": self.layers,
            "target_class": self.target_class,
            "leaf_errors": self.leaf_errors,
            "nodes": nodes,
            "links": links,
        }
        if path is not None:
            Path(path).write_text(json.dumps(out))
        return out
