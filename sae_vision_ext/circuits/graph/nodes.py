"""One home for what a graph node is called: ids, feature codes, position labels and clerps.

Every exporter and viewer calls these; nothing else formats a node id. They follow circuit-tracer
0.5.0's graph schema (``circuit_tracer/frontend/graph_models.py``), so an exported graph opens in
its frontend:

- feature ``{layer}_{feature}_{pos}`` with ``feature`` field ``cantor_pair(layer, feature)`` (schema
  1's feature code; the frontend unpairs it to show ``L{layer}/{feature}`` and to fetch
  ``features/{code}.json``);
- error ``{layer}_-1_{pos}`` (circuit-tracer writes ``0_{layer}_{pos}``, which collides with feature
  ``{layer}`` of layer 0 at the same position; ours cannot);
- MLP leaf ``{layer}_mlp_{pos}``;
- input ``E_{pos}_{pos}`` (an image position is its own token);
- target ``{n_layers + 1}_{class}_{pos}`` at the read-out position (CLS, else the last patch).

Layers are block numbers (``blocks.{layer}``); positions are token indices (prefix tokens, then
patches row-major).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .graph import AttributionGraph

ERROR_FEATURE = -1
"""The ``feature`` field of error, MLP and target-less nodes."""


def cantor_pair(layer: int, feature: int) -> int:
    """circuit-tracer's feature code: the Cantor pairing of ``(layer, feature)``."""
    return (layer + feature) * (layer + feature + 1) // 2 + feature


def cantor_unpair(code: int) -> tuple[int, int]:
    """Inverse of :func:`cantor_pair`: ``(layer, feature)``."""
    w = (math.isqrt(8 * code + 1) - 1) // 2
    feature = code - w * (w + 1) // 2
    return w - feature, feature


def position_label(pos: int, n_prefix: int, has_cls: bool, grid_w: int) -> str:
    """``CLS``, ``reg{i}`` (registers or distillation tokens), or ``p(row,col)`` for patches."""
    if pos < n_prefix:
        if has_cls and pos == 0:
            return "CLS"
        return f"reg{pos - int(has_cls)}"
    r, c = divmod(pos - n_prefix, grid_w)
    return f"p({r},{c})"


def position_labels(graph: AttributionGraph) -> list[str]:
    """Labels of every position of ``graph`` (its input nodes, in order)."""
    n_pos = sum(k == "input" for k in graph.node_kind)
    return [position_label(p, graph.n_prefix, graph.has_cls, graph.grid[1]) for p in range(n_pos)]


def readout_position(graph: AttributionGraph) -> int:
    """Where target nodes sit: the CLS token, else the last position."""
    return 0 if graph.has_cls else sum(k == "input" for k in graph.node_kind) - 1


def target_code(graph: AttributionGraph, index: int) -> int:
    """A target's ``feature`` field: its class when targets are classes, else its index."""
    return int(graph.target_classes[index]) if index < len(graph.target_classes) else index


class _Node(NamedTuple):
    kind: str
    layer: int
    pos: int
    feature: int
    target: int
    """Index among the targets (``-1`` for other kinds)."""


def _nodes(graph: AttributionGraph, index: Sequence[int] | None = None) -> list[_Node]:
    """Each node's kind, layer, position, feature and target index, in node order (only the nodes
    ``index``, in that order, if given: exports of big graphs label only what they keep)."""
    first_target = graph.node_kind.index("target") if "target" in graph.node_kind else len(graph.node_kind)
    if index is None:
        index = range(len(graph.node_kind))
    sel = torch.as_tensor(list(index), dtype=torch.long)
    kinds = [graph.node_kind[i] for i in index]
    layers, poss, feats = (t[sel].tolist() for t in (graph.node_layer, graph.node_pos, graph.node_feature))
    rows = zip(index, kinds, layers, poss, feats, strict=True)
    return [_Node(k, lay, pos, f, i - first_target if k == "target" else -1) for i, k, lay, pos, f in rows]


def node_ids(graph: AttributionGraph, index: Sequence[int] | None = None) -> list[str]:
    """The id of every node of ``graph`` (or of the nodes ``index``), in node order (module docstring)."""
    readout = readout_position(graph)
    names = {
        "feature": lambda n: f"{n.layer}_{n.feature}_{n.pos}",
        "error": lambda n: f"{n.layer}_{ERROR_FEATURE}_{n.pos}",
        "mlp": lambda n: f"{n.layer}_mlp_{n.pos}",
        "input": lambda n: f"E_{n.pos}_{n.pos}",
        "target": lambda n: f"{n.layer + 1}_{target_code(graph, n.target)}_{readout}",
    }
    return [names[n.kind](n) for n in _nodes(graph, index)]


def feature_codes(graph: AttributionGraph, index: Sequence[int] | None = None) -> list[int]:
    """circuit-tracer's ``feature`` field per node: the Cantor code for features, the position for
    inputs, the class (or target index) for targets, :data:`ERROR_FEATURE` for errors and MLP leaves."""
    codes = {
        "feature": lambda n: cantor_pair(n.layer, n.feature),
        "input": lambda n: n.pos,
        "target": lambda n: target_code(graph, n.target),
    }
    return [codes.get(n.kind, lambda n: ERROR_FEATURE)(n) for n in _nodes(graph, index)]


def js_node_ids(graph: AttributionGraph, index: Sequence[int] | None = None) -> list[str]:
    """circuit-tracer's ``jsNodeId`` per node (its ``Node.*_node`` constructors' formulas; MLP leaves,
    which it has no constructor for, keep their node id)."""
    readout = readout_position(graph)
    formats = {
        "feature": lambda n, code, nid: f"{n.layer}_{n.feature}-0",
        "error": lambda n, code, nid: f"{n.layer}_{n.pos}-0",
        "input": lambda n, code, nid: f"E_{code}-{n.pos}",
        "target": lambda n, code, nid: f"L_{code}-{readout}",
        "mlp": lambda n, code, nid: nid,
    }
    rows = zip(_nodes(graph, index), feature_codes(graph, index), node_ids(graph, index), strict=True)
    return [formats[n.kind](n, code, nid) for n, code, nid in rows]


def target_clerp(name: str, prob: float) -> str:
    """circuit-tracer's logit clerp, which its frontend parses: ``Output "<name>" (p=<prob>)``."""
    return f'Output "{name}" (p={prob:.3f})'


def clerps(
    graph: AttributionGraph,
    feature_labels: Mapping[tuple[int, int], str] | None = None,
    probs: Sequence[float] | None = None,
    index: Sequence[int] | None = None,
) -> list[str]:
    """A readable label per node: ``L5 #213 p(3,7)`` (plus ``: <label>`` from ``feature_labels``
    keyed ``(layer, feature)``), ``Err: L5 p(3,7)``, ``MLP L5 p(3,7)``, ``Emb: p(3,7)``, and the
    target clerp with its class name and probability (``probs``, default ``graph.target_probs``)."""
    labels = position_labels(graph)
    feature_labels = feature_labels or {}
    if probs is None:
        probs = graph.target_probs.tolist() if getattr(graph, "target_probs", None) is not None else []

    def where(n: _Node) -> str:
        return labels[n.pos] if 0 <= n.pos < len(labels) else ""

    def target(n: _Node) -> str:
        p = float(probs[n.target]) if n.target < len(probs) and probs[n.target] == probs[n.target] else 0.0
        return target_clerp(graph.target_names[n.target], p)

    def feature(n: _Node) -> str:
        extra = feature_labels.get((n.layer, n.feature))
        return f"L{n.layer} #{n.feature} {where(n)}" + (f": {extra}" if extra else "")

    texts = {
        "feature": feature,
        "error": lambda n: f"Err: L{n.layer} {where(n)}",
        "mlp": lambda n: f"MLP L{n.layer} {where(n)}",
        "input": lambda n: f"Emb: {where(n)}",
        "target": target,
    }
    return [texts[n.kind](n) for n in _nodes(graph, index)]


class NodeTable:
    """A graph's node attributes in node order (kind, block, position, feature, activation), built by
    appending one group of nodes at a time; ``add`` returns the new nodes' indices. The attributor
    appends in the order its module docstring states (inputs; per SAE layer [MLP leaves], features,
    errors; targets), so the index of a node is its row and column in the adjacency."""

    def __init__(self) -> None:
        self.kinds: list[str] = []
        self.layers: list[int] = []
        self.positions: list[int] = []
        self.features: list[int] = []
        self.values: list[float] = []

    def __len__(self) -> int:
        return len(self.kinds)

    def add(self, kind: str, layer: int, positions: list[int], features: list[int], values: list[float]) -> Tensor:
        """Append ``len(positions)`` nodes of ``kind`` at block ``layer``; their indices."""
        first = len(self.kinds)
        self.kinds += [kind] * len(positions)
        self.layers += [layer] * len(positions)
        self.positions += positions
        self.features += features
        self.values += values
        return torch.arange(first, len(self.kinds))
