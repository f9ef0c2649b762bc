"""What a traced graph's attention did, computed at export time: ``<slug>.attention.json`` and the viewer's
edge panel.

:func:`attention_report` takes a pruned graph and, for a bounded number of its exported edges, the splits
of ``circuits/engine/attention.py``:

- **edges**: the ``max_edges`` strongest exported edges (by |weight|) from a feature to a feature of the
  next SAE layer or to a target that cross at least one attention block, each split over the heads of
  *every* block it crosses (:func:`~.attention.head_loadings` once per block: per block, ``direct`` plus the
  heads sum to the edge);
- **entries**: attention entries ``(block, head, query, key)`` ranked by the largest head part of an edge
  that crosses that one block only (source at SAE layer ``block - 1`` and key position the source's, target at
  SAE layer ``block`` and query position the target's), the ``max_entries`` strongest each with its QK
  attribution (:func:`~.attention.qk_attribution`): the ``pairs_per_entry`` largest query × key pairs and the
  rest of the score.

The JSON (schema ``sae_vision_ext.attention`` version 1; ``export.write_circuit_tracer(..., attention=)``
writes it beside ``<slug>.json``)::

    {"schema": "sae_vision_ext.attention", "version": 1, "graph": "<slug>.json",
     "config": {"max_edges": 50, "max_entries": 20, "pairs_per_entry": 10},
     "n_heads": {"<block>": n},
     "edges": [{"source": node_id, "target": node_id, "weight": graph edge,
                "blocks": [{"block": b, "edge": e, "direct": d, "heads": [h_0, ...]}]}],   # d + Σ h = e
     "entries": [{"block": b, "head": h, "query": q, "key": k, "query_label": "p(1,3)", "key_label": "CLS",
                  "layer": b - 1, "score": s, "pairs": [["f402", "f393", v], ...], "rest": s - Σ v,
                  "n_query_terms": nq, "n_key_terms": nk, "edges": [edge indices]}],
     "skipped": [{"block": b, "reason": "..."}]}

Node ids are ``graph/nodes.py``'s (those of ``<slug>.json``); pair terms are ``f<feature>`` of the SAE at
``layer`` at the query (first) and key (second) positions, ``error`` and ``bias``. ``edge`` is the frozen
intervention; it equals the graph's ``weight`` (float64 to 1e-9, tested; float32 to its precision).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..graph.export import exported_masks
from ..graph.nodes import node_ids, position_labels
from .attention import head_loadings_many, qk_attribution_many, qk_refusal

if TYPE_CHECKING:
    from jaxtyping import Float
    from torch import Tensor

    from ..graph.graph import AttributionGraph
    from ..replacement.base import ReplacementModelBase

SCHEMA = "sae_vision_ext.attention"


@dataclass
class AttentionExport:
    """How much of a graph's attention :func:`attention_report` splits (each item costs one or two forwards)."""

    max_edges: int = 50
    """The strongest exported edges through attention split over heads (0: none, and no entries)."""
    max_entries: int = 20
    """Attention entries ``(block, head, query, key)`` given a QK attribution (0: none)."""
    pairs_per_entry: int = 10
    """Query × key pairs kept per entry, largest |value| first (the rest is summed in ``rest``)."""

    def __post_init__(self) -> None:
        for name, least in (("max_edges", 0), ("max_entries", 0), ("pairs_per_entry", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"AttentionExport.{name}={value!r}: must be an integer >= {least}.")


def _endpoint(graph: AttributionGraph, i: int, first_target: int) -> tuple[int, int, int] | tuple[str, int]:
    if graph.node_kind[i] == "target":
        return ("output", int(graph.target_classes[i - first_target]))
    return (int(graph.node_layer[i]), int(graph.node_pos[i]), int(graph.node_feature[i]))


def _blocks(rrm: ReplacementModelBase, s_layer: int, target: tuple) -> range:
    """The blocks an edge from SAE layer ``s_layer`` to ``target`` crosses."""
    n_blocks = rrm.model.cfg.n_layers
    last = n_blocks - 1 if target[0] == "output" else int(target[0])
    return range(s_layer + 1, min(last, n_blocks - 1) + 1)


def strongest_edges(rrm: ReplacementModelBase, graph: AttributionGraph, n: int) -> list[tuple[int, int, float]]:
    """``(source, target, weight)`` node indices of the ``n`` strongest exported edges from a feature to a
    feature or a class target that cross at least one block."""
    kinds = graph.node_kind
    _, keep = exported_masks(graph)
    a = graph.adjacency.coalesce()
    dst, src = a.indices()
    vals = a.values()
    first_target = kinds.index("target") if "target" in kinds else len(kinds)
    out = []
    for e in vals.abs().argsort(descending=True).tolist():
        if len(out) >= n:
            break
        s, d = int(src[e]), int(dst[e])
        if not bool(keep[e]) or kinds[s] != "feature" or kinds[d] not in ("feature", "target"):
            continue
        if kinds[d] == "target" and d - first_target >= len(graph.target_classes):
            continue  # a target that is not a class logit: head_loadings splits class logits only
        if len(_blocks(rrm, int(graph.node_layer[s]), _endpoint(graph, d, first_target))):
            out.append((s, d, float(vals[e])))
    return out


@torch.no_grad()
def attention_report(
    rrm: ReplacementModelBase,
    pixels: Float[Tensor, "1 chan h w"],
    graph: AttributionGraph,
    config: AttentionExport | None = None,
) -> dict[str, Any]:
    """The report of the module docstring for ``graph`` (pruned or not), traced from ``pixels``. Graphs with
    MLP leaves are refused: their edges leave out the paths through the MLPs that head loadings include."""
    config = config or AttentionExport()
    if "mlp" in graph.node_kind:
        raise ValueError(
            "attention_report splits edges of graphs without MLP leaves (attribute(..., mlp_leaves=False)): an "
            "MLP-leaf graph's edges leave out the paths through the MLPs, which head loadings include."
        )
    kinds = graph.node_kind
    first_target = kinds.index("target") if "target" in kinds else len(kinds)
    chosen = strongest_edges(rrm, graph, config.max_edges)
    ids = node_ids(graph)
    jobs, owners = [], []
    for k, (s, d, _) in enumerate(chosen):
        source, target = _endpoint(graph, s, first_target), _endpoint(graph, d, first_target)
        for block in _blocks(rrm, source[0], target):
            jobs.append((source, target, block))
            owners.append(k)
    splits = head_loadings_many(rrm, pixels, jobs)
    edges = [{"source": ids[s], "target": ids[d], "weight": w, "blocks": []} for s, d, w in chosen]
    candidates: dict[tuple[int, int, int, int], tuple[float, list[int]]] = {}
    for k, (source, target, block), h in zip(owners, jobs, splits, strict=True):
        edges[k]["blocks"].append({"block": block, "edge": h.edge, "direct": h.direct, "heads": h.heads.tolist()})
        if target[0] != "output" and block == source[0] + 1 == target[0]:  # one block: key -> query
            for head, part in enumerate(h.heads.tolist()):
                key = (block, head, target[1], source[1])
                best, refs = candidates.get(key, (0.0, []))
                candidates[key] = (max(best, abs(part)), [*refs, k])
    entries, skipped = _entries(rrm, pixels, graph, candidates, config)
    n_heads = {str(b["block"]): len(b["heads"]) for e in edges for b in e["blocks"]}
    return {
        "schema": SCHEMA,
        "version": 1,
        "config": asdict(config),
        "n_heads": n_heads,
        "edges": edges,
        "entries": entries,
        "skipped": skipped,
    }


def _entries(
    rrm: ReplacementModelBase,
    pixels: Tensor,
    graph: AttributionGraph,
    candidates: dict[tuple[int, int, int, int], tuple[float, list[int]]],
    config: AttentionExport,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """QK attributions of the strongest candidate entries; blocks that refuse the split are listed once."""
    labels = position_labels(graph)
    chosen, skipped, refused = [], [], set()
    for (block, head, query, key), (_, refs) in sorted(candidates.items(), key=lambda kv: -kv[1][0]):
        if len(chosen) >= config.max_entries:
            break
        reason = qk_refusal(rrm, block)
        if reason is not None:  # q/k norm or rotary embeddings: not bilinear in the residual
            if block not in refused:
                refused.add(block)
                skipped.append({"block": block, "reason": reason})
            continue
        chosen.append(((block, head, query, key), refs))
    entries = []
    for ((block, head, query, key), refs), qk in zip(
        chosen, qk_attribution_many(rrm, pixels, [c for c, _ in chosen]), strict=True
    ):
        top = qk.top(config.pairs_per_entry)
        entries.append(
            {
                "block": block,
                "head": head,
                "query": query,
                "key": key,
                "query_label": labels[query],
                "key_label": labels[key],
                "layer": block - 1,
                "score": qk.score,
                "pairs": [[q, k, v] for q, k, v in top],
                "rest": qk.score - sum(v for _, _, v in top),
                "n_query_terms": len(qk.query_terms),
                "n_key_terms": len(qk.key_terms),
                "edges": sorted(set(refs)),
            }
        )
    return entries, skipped


__all__ = ["SCHEMA", "AttentionExport", "attention_report", "strongest_edges"]
