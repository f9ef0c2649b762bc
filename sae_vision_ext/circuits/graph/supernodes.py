"""Automatic supernodes: a graph's feature nodes grouped so that one feature firing on many patches reads as one node.

Three rules (``group_nodes(graph, by=...)``), each a partition of the feature nodes (a node belongs to at most
one group; errors, embeddings and targets stay single):

- ``"feature"``: every position of one ``(layer, feature)``: the seed paper's token-aggregated node;
- ``"spatial"``: the positions of one ``(layer, feature)`` split into connected regions of the patch grid
  (4-neighbourhood, row-major patches after the prefix tokens); each prefix token (CLS, registers) is a region
  of its own. A feature firing on two objects gives two supernodes;
- ``"label"``: every feature of one layer with the same label (``{(layer, feature): label}``, e.g. from
  ``analyse_features``); unlabelled features fall back to ``"feature"``.

:func:`supernode_graph` sums the edges between groups (``P A Pᵀ`` with ``P`` the membership matrix): the
token-aggregated view of the graph, exact in the sense that each group's incoming edges plus its members'
constants still sum to the members' summed values. :func:`influence_coverage` counts the nodes (or groups)
needed for a share of the feature influence; :func:`to_circuit_tracer` writes groups as circuit-tracer's
``qParams.supernodes`` (``[[name, node_id, ...]]``), which ``write_circuit_tracer(..., supernodes=...)`` takes;
:func:`exported_supernodes` does both for what the export writes (``sae-vision trace`` and the demo, by
feature: the grouping that needs the fewest nodes for 80% of the influence, docs/circuits.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .graph import AttributionGraph

GroupBy = Literal["feature", "spatial", "label"]
_RULES = ("feature", "spatial", "label")


@dataclass
class Supernode:
    """A group of a graph's nodes."""

    name: str
    """``L<layer>/<feature>`` (``feature``), with ``@<first position>`` (``spatial``), or the label (``label``)."""
    layer: int
    nodes: list[int]
    """Indices into the graph's nodes, in node order."""


def _regions(positions: list[int], n_prefix: int, grid_w: int) -> list[list[int]]:
    """Connected regions (4-neighbourhood on the patch grid) of token positions; prefix tokens alone."""
    regions = [[p] for p in positions if p < n_prefix]
    cells = {divmod(p - n_prefix, grid_w): p for p in positions if p >= n_prefix}
    seen: set[tuple[int, int]] = set()
    for start in sorted(cells, key=cells.get):
        if start in seen:
            continue
        stack, region = [start], []
        seen.add(start)
        while stack:
            r, c = stack.pop()
            region.append(cells[(r, c)])
            for nb in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if nb in cells and nb not in seen:
                    seen.add(nb)
                    stack.append(nb)
        regions.append(sorted(region))
    return regions


def group_nodes(
    graph: AttributionGraph,
    by: GroupBy = "spatial",
    labels: Mapping[tuple[int, int], str] | None = None,
    *,
    nodes: Tensor | None = None,
) -> list[Supernode]:
    """Supernodes of ``graph``'s feature nodes (module docstring), largest influence first. ``nodes``: a
    boolean mask of the nodes to group (default: ``graph.node_mask`` when pruned, else all); ``labels`` is
    required for ``by="label"``."""
    from .ops import node_influence

    if by not in _RULES:
        raise ValueError(f"by={by!r} is not a grouping rule; valid: {', '.join(_RULES)}.")
    if by == "label" and not labels:
        raise ValueError("by='label' needs labels={(layer, feature): label}, e.g. from analyse_features.")
    keep = nodes if nodes is not None else graph.node_mask
    if keep is not None and (keep.dtype != torch.bool or keep.shape != (graph.n_nodes,)):
        raise ValueError(
            f"nodes must be a boolean mask of the graph's {graph.n_nodes} nodes; got {keep.dtype} {tuple(keep.shape)}."
        )
    members: dict[tuple[int, int], list[int]] = {}
    for i, kind in enumerate(graph.node_kind):
        if kind == "feature" and (keep is None or bool(keep[i])):
            members.setdefault((int(graph.node_layer[i]), int(graph.node_feature[i])), []).append(i)
    groups: list[Supernode] = []
    if by == "label":
        by_label: dict[tuple[int, str], list[int]] = {}
        for (layer, feature), idx in members.items():
            label = (labels or {}).get((layer, feature))
            if label is None:
                groups.append(Supernode(f"L{layer}/{feature}", layer, idx))
            else:
                by_label.setdefault((layer, label), []).extend(idx)
        groups += [Supernode(f"L{layer} {label}", layer, sorted(idx)) for (layer, label), idx in by_label.items()]
    elif by == "feature":
        groups = [Supernode(f"L{layer}/{feature}", layer, idx) for (layer, feature), idx in members.items()]
    else:
        grid_w = graph.grid[1]
        for (layer, feature), idx in members.items():
            at = {int(graph.node_pos[i]): i for i in idx}
            for region in _regions(sorted(at), graph.n_prefix, grid_w):
                groups.append(Supernode(f"L{layer}/{feature}@{region[0]}", layer, [at[p] for p in region]))
    infl = node_influence(graph)
    return sorted(groups, key=lambda g: -float(infl[g.nodes].sum()))


def membership(graph: AttributionGraph, groups: list[Supernode]) -> tuple[Tensor, list[str]]:
    """``P [n_groups + n_single, n_nodes]`` (one row per group, then one per node in no group, in node
    order) and the row names; ``ValueError`` if a node is in two groups."""
    owner = torch.full((graph.n_nodes,), -1, dtype=torch.long)
    for g, group in enumerate(groups):
        idx = torch.tensor(group.nodes, dtype=torch.long)
        if (owner[idx] >= 0).any():
            raise ValueError(f"supernode {group.name!r} shares nodes with another group; groups must be disjoint.")
        owner[idx] = g
    singles = (owner < 0).nonzero().flatten()
    owner[singles] = torch.arange(len(groups), len(groups) + len(singles))
    P = torch.zeros(len(groups) + len(singles), graph.n_nodes, dtype=graph.adjacency.dtype)
    P[owner, torch.arange(graph.n_nodes)] = 1
    from .nodes import node_ids

    names = [g.name for g in groups] + node_ids(graph, singles.tolist())
    return P, names


def supernode_graph(graph: AttributionGraph, groups: list[Supernode]) -> tuple[list[str], Tensor, Tensor]:
    """``(names, edges, values)``: ``edges = P A Pᵀ`` between groups (rows targets, columns sources, as the
    adjacency) and each group's summed node values (``P value``; NaN-free rows only)."""
    P, names = membership(graph, groups)
    A = graph.dense().to(P.dtype)
    return names, P @ A @ P.T, P @ torch.nan_to_num(graph.value.to(P.dtype))


def group_edges(graph: AttributionGraph, groups: list[Supernode]) -> Tensor:
    """``[len(groups), len(groups)]``: the rows of ``supernode_graph``'s edges between the groups themselves
    (targets by sources), summed from the sparse adjacency (no dense ``n_nodes x n_nodes`` matrix)."""
    from .ops import edges

    owner = torch.full((graph.n_nodes,), -1, dtype=torch.long)
    for g, group in enumerate(groups):
        owner[torch.tensor(group.nodes, dtype=torch.long)] = g
    dst, src, vals = edges(graph.adjacency)
    both = (owner[dst] >= 0) & (owner[src] >= 0)
    out = torch.zeros(len(groups), len(groups), dtype=vals.dtype)
    return out.index_put_((owner[dst[both]], owner[src[both]]), vals[both], accumulate=True)


def influence_coverage(graph: AttributionGraph, groups: list[Supernode] | None = None, share: float = 0.8) -> int:
    """How many feature nodes (``groups=None``) or groups are needed, strongest first, to hold ``share`` of
    the feature nodes' total influence (groups: their members' summed influence)."""
    from .ops import node_influence

    if not 0 < share <= 1:
        raise ValueError(f"share={share} must be in (0, 1].")
    infl = node_influence(graph).double()
    if groups is None:
        parts = infl[[i for i, k in enumerate(graph.node_kind) if k == "feature"]]
    else:
        parts = torch.stack([infl[g.nodes].sum() for g in groups]) if groups else infl[:0]
    total = float(parts.sum())
    if total <= 0:
        return 0
    cum = parts.sort(descending=True).values.cumsum(0) / total
    return int((cum < share - 1e-12).sum()) + 1


def to_circuit_tracer(graph: AttributionGraph, groups: list[Supernode], min_size: int = 2) -> list[list[str]]:
    """Groups of at least ``min_size`` nodes as circuit-tracer's ``qParams.supernodes``: ``[name, node_id, ...]``."""
    from .nodes import node_ids

    return [[g.name, *node_ids(graph, g.nodes)] for g in groups if len(g.nodes) >= min_size]


def exported_supernodes(
    graph: AttributionGraph, by: GroupBy = "feature", labels: Mapping[tuple[int, int], str] | None = None
) -> list[list[str]]:
    """``qParams.supernodes`` for ``graph``'s circuit-tracer export: :func:`group_nodes` over the nodes
    ``export.write_circuit_tracer`` writes (groups of two or more), as ``sae-vision trace`` and the demo write them."""
    from .export import exported_masks

    return to_circuit_tracer(graph, group_nodes(graph, by, labels, nodes=exported_masks(graph)[0]))
