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
from typing import Any

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


def position_labels(graph: Any) -> list[str]:
    """Labels of every position of ``graph`` (its input nodes, in order)."""
    n_pos = sum(k == "input" for k in graph.node_kind)
    return [position_label(p, graph.n_prefix, graph.has_cls, graph.grid[1]) for p in range(n_pos)]


def readout_position(graph: Any) -> int:
    """Where target nodes sit: the CLS token, else the last position."""
    return 0 if graph.has_cls else sum(k == "input" for k in graph.node_kind) - 1


def target_code(graph: Any, index: int) -> int:
    """A target's ``feature`` field: its class when targets are classes, else its index."""
    return int(graph.target_classes[index]) if index < len(graph.target_classes) else index


def node_ids(graph: Any) -> list[str]:
    """The id of every node of ``graph``, in node order (see the module docstring)."""
    out: list[str] = []
    first_target = graph.node_kind.index("target") if "target" in graph.node_kind else len(graph.node_kind)
    readout = readout_position(graph)
    layers, poss, feats = graph.node_layer.tolist(), graph.node_pos.tolist(), graph.node_feature.tolist()
    for i, kind in enumerate(graph.node_kind):
        layer, pos, feat = layers[i], poss[i], feats[i]
        if kind == "feature":
            out.append(f"{layer}_{feat}_{pos}")
        elif kind == "error":
            out.append(f"{layer}_{ERROR_FEATURE}_{pos}")
        elif kind == "mlp":
            out.append(f"{layer}_mlp_{pos}")
        elif kind == "input":
            out.append(f"E_{pos}_{pos}")
        else:
            out.append(f"{layer + 1}_{target_code(graph, i - first_target)}_{readout}")
    return out


def feature_codes(graph: Any) -> list[int]:
    """circuit-tracer's ``feature`` field per node: the Cantor code for features, the position for
    inputs, the class (or target index) for targets, :data:`ERROR_FEATURE` for errors and MLP leaves."""
    first_target = graph.node_kind.index("target") if "target" in graph.node_kind else len(graph.node_kind)
    layers, poss, feats = graph.node_layer.tolist(), graph.node_pos.tolist(), graph.node_feature.tolist()
    out: list[int] = []
    for i, kind in enumerate(graph.node_kind):
        if kind == "feature":
            out.append(cantor_pair(layers[i], feats[i]))
        elif kind == "input":
            out.append(poss[i])
        elif kind == "target":
            out.append(target_code(graph, i - first_target))
        else:
            out.append(ERROR_FEATURE)
    return out


def js_node_ids(graph: Any) -> list[str]:
    """circuit-tracer's ``jsNodeId`` per node (its ``Node.*_node`` constructors' formulas)."""
    codes, ids = feature_codes(graph), node_ids(graph)
    readout = readout_position(graph)
    layers, poss, feats = graph.node_layer.tolist(), graph.node_pos.tolist(), graph.node_feature.tolist()
    out: list[str] = []
    for i, kind in enumerate(graph.node_kind):
        if kind == "feature":
            out.append(f"{layers[i]}_{feats[i]}-0")
        elif kind == "error":
            out.append(f"{layers[i]}_{poss[i]}-0")
        elif kind == "input":
            out.append(f"E_{codes[i]}-{poss[i]}")
        elif kind == "target":
            out.append(f"L_{codes[i]}-{readout}")
        else:
            out.append(ids[i])
    return out


def target_clerp(name: str, prob: float) -> str:
    """circuit-tracer's logit clerp, which its frontend parses: ``Output "<name>" (p=<prob>)``."""
    return f'Output "{name}" (p={prob:.3f})'


def clerps(
    graph: Any, feature_labels: Mapping[tuple[int, int], str] | None = None, probs: Sequence[float] | None = None
) -> list[str]:
    """A readable label per node: ``L5 #213 p(3,7)`` (plus ``: <label>`` from ``feature_labels``
    keyed ``(layer, feature)``), ``Err: L5 p(3,7)``, ``MLP L5 p(3,7)``, ``Emb: p(3,7)``, and the
    target clerp with its class name and probability (``probs``, default ``graph.target_probs``)."""
    labels = position_labels(graph)
    feature_labels = feature_labels or {}
    if probs is None:
        probs = graph.target_probs.tolist() if getattr(graph, "target_probs", None) is not None else []
    first_target = graph.node_kind.index("target") if "target" in graph.node_kind else len(graph.node_kind)
    layers, poss, feats = graph.node_layer.tolist(), graph.node_pos.tolist(), graph.node_feature.tolist()
    out: list[str] = []
    for i, kind in enumerate(graph.node_kind):
        layer, pos, feat = layers[i], poss[i], feats[i]
        where = labels[pos] if 0 <= pos < len(labels) else ""
        if kind == "feature":
            extra = feature_labels.get((layer, feat))
            out.append(f"L{layer} #{feat} {where}" + (f": {extra}" if extra else ""))
        elif kind == "error":
            out.append(f"Err: L{layer} {where}")
        elif kind == "mlp":
            out.append(f"MLP L{layer} {where}")
        elif kind == "input":
            out.append(f"Emb: {where}")
        else:
            t = i - first_target
            p = float(probs[t]) if t < len(probs) and probs[t] == probs[t] else 0.0
            out.append(target_clerp(graph.target_names[t], p))
    return out
