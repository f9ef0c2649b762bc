"""circuit-tracer's files for an attribution graph, laid out as its server and frontend read them.

``write_circuit_tracer(graph, out_dir, slug)`` writes, in ``out_dir``:

- ``<slug>.json``: the graph (circuit-tracer 0.5.0's ``frontend/graph_models.Model``: metadata,
  qParams, nodes, links). Nodes and links are what its ``create_graph_files`` exports for the same
  pruning: links kept by ``prune`` between kept nodes; nodes kept by ``prune`` that touch a kept
  link, plus every input and target. ``influence`` is circuit-tracer's cumulative share (what its
  pruning slider compares with ``node_threshold``); our raw influence is the extra field
  ``influence_raw``. Ids, feature codes and clerps come from ``nodes.py``.
- ``graph-metadata.json``: the list of graphs in the folder (the entry for ``slug`` replaced).
- ``features/<code>.json`` (``features=True``): one file per exported feature in circuit-tracer's
  feature format (``frontend/feature_models.Model``), with ``metadata.scan = "./data/features"``
  so its feature panel reads them from the served folder instead of the Hub. Examples are token
  rows (position labels with the feature's activation at each): the traced image always, and the
  top images of ``stats`` when ``stats``, ``stats_pixels`` and ``rrm`` are given.

Serve the folder with ``circuit_tracer.frontend.local_server.serve(data_dir=out_dir)``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .._compat import renamed_kwargs
from .._hooks import resid_post
from .._io import atomic_write_text
from .graph_ops import node_influence
from .nodes import (
    cantor_pair,
    cantor_unpair,
    clerps,
    feature_codes,
    js_node_ids,
    node_ids,
    position_labels,
    readout_position,
)

if TYPE_CHECKING:
    from ..vis.stats import FeatureStats
    from .graph import AttributionGraph
    from .replacement_base import ReplacementModelBase

FEATURE_TYPES = {
    "feature": "cross layer transcoder",
    "error": "mlp reconstruction error",
    "input": "embedding",
    "target": "logit",
    "mlp": "mlp output",
}
"""circuit-tracer's ``feature_type`` per node kind (MLP leaves have no circuit-tracer equivalent)."""

LOCAL_SCAN = "./data/features"
"""The ``scan`` that makes circuit-tracer's frontend read ``features/<code>.json`` from the served folder."""


def exported_masks(graph: AttributionGraph) -> tuple[Tensor, Tensor]:
    """``(node_mask, edge_mask)`` of what is exported (see the module docstring); an unpruned graph
    exports every node and edge."""
    a = graph.adjacency.coalesce()
    dst, src = a.indices()
    if graph.node_mask is None:
        return torch.ones(graph.n_nodes, dtype=torch.bool), torch.ones(a._nnz(), dtype=torch.bool)
    edges = graph.edge_mask & graph.node_mask[src] & graph.node_mask[dst]
    touched = torch.zeros(graph.n_nodes, dtype=torch.bool)
    touched[src[edges]] = True
    touched[dst[edges]] = True
    always = torch.tensor([k in ("input", "target") for k in graph.node_kind])
    return graph.node_mask & (touched | always), edges


def graph_json(
    graph: AttributionGraph,
    slug: str,
    scan: str = LOCAL_SCAN,
    transcoder_list: list[str] | None = None,
    feature_labels: Mapping[tuple[int, int], str] | None = None,
    *,
    prompt: str | None = None,
    supernodes: Sequence[Sequence[str]] | None = None,
) -> dict[str, Any]:
    """The graph file's content (see the module docstring); ``supernodes`` (``[[name, node_id, ...]]``,
    as our viewer's "download groups" writes them) go to ``qParams.supernodes``."""
    nodes_keep, edges_keep = exported_masks(graph)
    raw = node_influence(graph)
    if graph.cumulative_influence is not None:
        cumulative = graph.cumulative_influence
    else:
        ordered, order = raw.sort(descending=True)
        cumulative = torch.zeros_like(raw)
        cumulative[order] = ordered.cumsum(0) / ordered.sum().clamp_min(1e-30)
    keep = nodes_keep.nonzero().squeeze(1).tolist()  # only what is exported is labelled
    ids, js_ids, codes = node_ids(graph, keep), js_node_ids(graph, keep), feature_codes(graph, keep)
    labels = clerps(graph, feature_labels, index=keep)
    probs = graph.target_probs.tolist() if graph.target_probs is not None else []
    first_target = graph.node_kind.index("target") if "target" in graph.node_kind else graph.n_nodes
    readout = readout_position(graph)
    sel = torch.tensor(keep, dtype=torch.long)
    layers, poss = graph.node_layer[sel].tolist(), graph.node_pos[sel].tolist()
    acts, cum, infl = graph.activation[sel].tolist(), cumulative[sel].tolist(), raw[sel].tolist()
    nodes = []
    for j, i in enumerate(keep):
        kind = graph.node_kind[i]
        is_target = kind == "target"
        t = i - first_target
        nodes.append(
            {
                "node_id": ids[j],
                "feature": codes[j],
                "layer": "E" if kind == "input" else str(layers[j] + 1 if is_target else layers[j]),
                "ctx_idx": readout if is_target else poss[j],
                "feature_type": FEATURE_TYPES[kind],
                "token_prob": (probs[t] if t < len(probs) and probs[t] == probs[t] else 0.0) if is_target else 0.0,
                "is_target_logit": is_target and t == 0,
                "run_idx": 0,
                "reverse_ctx_idx": 0,
                "jsNodeId": js_ids[j],
                "clerp": labels[j],
                "influence": cum[j],
                "activation": None if is_target else acts[j],
                "influence_raw": infl[j],
            }
        )
    a = graph.adjacency.coalesce()
    pairs = a.indices()[:, edges_keep].T.tolist()
    weights = a.values()[edges_keep].tolist()
    id_of = dict(zip(keep, ids, strict=True))
    links = [{"source": id_of[s], "target": id_of[d], "weight": w} for (d, s), w in zip(pairs, weights, strict=True)]
    tokens = position_labels(graph)
    node_threshold = graph.pruning[0] if graph.pruning is not None else None
    metadata = {
        "slug": slug,
        "scan": scan,
        "transcoder_list": list(transcoder_list or []),
        "prompt_tokens": tokens,
        "prompt": prompt or f"{', '.join(graph.target_names)}: image of {len(tokens)} tokens",
        "node_threshold": node_threshold,
        "schema_version": 1,
    }
    known = {n["node_id"] for n in nodes}
    groups = [list(g) for g in supernodes or []]
    for g in groups:
        missing = [i for i in g[1:] if i not in known]
        if missing:
            raise ValueError(f"Supernode {g[0]!r} names nodes not in the exported graph: {missing[:5]}.")
    qparams = {"pinnedIds": [], "supernodes": groups, "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": nodes, "links": links}


def add_graph_metadata(out_dir: Path, metadata: dict[str, Any]) -> None:
    """Add (or replace, by slug) ``metadata`` in ``out_dir/graph-metadata.json``."""
    path = out_dir / "graph-metadata.json"
    graphs = json.loads(path.read_text())["graphs"] if path.exists() else []
    graphs = [g for g in graphs if g.get("slug") != metadata["slug"]] + [metadata]
    atomic_write_text(path, json.dumps({"graphs": graphs}, indent=2))


@renamed_kwargs(images="stats_pixels")
def feature_files(
    graph: AttributionGraph,
    exported: dict[str, Any],
    rrm: ReplacementModelBase | None = None,
    stats: Mapping[str, FeatureStats] | None = None,
    stats_pixels: Tensor | None = None,
    *,
    n_examples: int = 8,
    logit_effects: Mapping[tuple[int, int], tuple[list[str], list[str]]] | None = None,
) -> dict[int, dict[str, Any]]:
    """circuit-tracer feature records for the exported feature nodes, keyed by feature code."""
    tokens = exported["metadata"]["prompt_tokens"]
    n_pos = len(tokens)
    by_feature: dict[tuple[int, int], list[float]] = {}
    kinds, layers = graph.node_kind, graph.node_layer.tolist()
    poss, feats, acts = graph.node_pos.tolist(), graph.node_feature.tolist(), graph.activation.tolist()
    for i, kind in enumerate(kinds):  # the traced image's activation map, from the graph's nodes
        if kind == "feature":
            by_feature.setdefault((layers[i], feats[i]), [0.0] * n_pos)[poss[i]] = acts[i]
    wanted = {cantor_unpair(n["feature"]) for n in exported["nodes"] if n["feature_type"] == FEATURE_TYPES["feature"]}
    top_rows = _top_rows(rrm, stats, stats_pixels, n_examples, wanted) if stats else {}
    out: dict[int, dict[str, Any]] = {}
    for layer, feat in sorted(wanted):
        code = cantor_pair(layer, feat)
        traced = by_feature.get((layer, feat), [0.0] * n_pos)
        quantiles = [{"quantile_name": "Traced image", "examples": [_example(traced, tokens)]}]
        rows = top_rows.get((layer, feat), [])
        if rows:
            quantiles.append(
                {"quantile_name": "Top images", "examples": [_example(r, tokens, j) for j, r in enumerate(rows)]}
            )
        every = [a for r in [traced, *rows] for a in r]
        hook = resid_post(layer)
        frequency = 0.0
        if stats and hook in stats and stats[hook].n_tokens:
            frequency = float(stats[hook].fire_tokens[feat]) / stats[hook].n_tokens
        top, bottom = (logit_effects or {}).get((layer, feat), ([], []))
        out[code] = {
            "transcoder_id": hook,
            "index": code,
            "examples_quantiles": quantiles,
            "top_logits": list(top),
            "bottom_logits": list(bottom),
            "act_min": 0.0,
            "act_max": max(every) if every else 1.0,
            "quantile_values": [],
            "histogram": [],
            "activation_frequency": frequency,
        }
    return out


def _example(acts: list[float], tokens: list[str], index: int = 0) -> dict[str, Any]:
    return {
        "tokens_acts_list": [float(a) for a in acts],
        "train_token_ind": int(max(range(len(acts)), key=lambda p: acts[p])) if acts else 0,
        "is_repeated_datapoint": False,
        "tokens": list(tokens),
    }


@torch.no_grad()
def _top_rows(
    rrm: ReplacementModelBase,
    stats: Mapping[str, FeatureStats],
    stats_pixels: Tensor | None,
    n: int,
    wanted: set[tuple[int, int]],
) -> dict[tuple[int, int], list[list[float]]]:
    """Per-position activations of each wanted feature on its top images (re-encoded with ``rrm``)."""
    if rrm is None or stats_pixels is None:
        return {}
    needed: dict[tuple[int, int], list[int]] = {}
    for layer, feat in wanted:
        hook = resid_post(layer)
        if hook in stats:
            needed[(layer, feat)] = [int(i) for _, i, _ in stats[hook].top_examples(feat)[:n]]
    index = sorted({i for ids in needed.values() for i in ids})
    if not index:
        return {}
    acts = rrm.feature_acts(stats_pixels[torch.tensor(index)])
    row_of = {img: r for r, img in enumerate(index)}
    out: dict[tuple[int, int], list[list[float]]] = {}
    for (layer, feat), ids in needed.items():
        slot = rrm.layers.index(layer)
        out[(layer, feat)] = [acts[slot][row_of[i], :, feat].double().tolist() for i in ids]
    return out


@renamed_kwargs(images="stats_pixels")
def write_circuit_tracer(
    graph: AttributionGraph,
    out_dir: str | Path,
    slug: str = "vit-graph",
    *,
    features: bool = True,
    rrm: ReplacementModelBase | None = None,
    stats: Mapping[str, FeatureStats] | None = None,
    stats_pixels: Tensor | None = None,
    n_examples: int = 8,
    feature_labels: Mapping[tuple[int, int], str] | None = None,
    logit_effects: Mapping[tuple[int, int], tuple[list[str], list[str]]] | None = None,
    prompt: str | None = None,
    supernodes: Sequence[Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Write ``<slug>.json``, ``graph-metadata.json`` and (``features``) ``features/<code>.json`` into
    ``out_dir`` (see the module docstring); returns the graph JSON. ``feature_labels`` add a label to
    feature clerps; ``logit_effects`` fill the feature files' ``top_logits``/``bottom_logits``;
    ``supernodes`` (``[[name, node_id, ...]]``, e.g. our viewer's downloaded groups) go to ``qParams``."""
    if not slug or "/" in slug or slug.startswith("."):
        raise ValueError(f"slug must be a plain file stem; got {slug!r}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sae_layers = sorted({int(lay) for lay, k in zip(graph.node_layer, graph.node_kind, strict=True) if k == "error"})
    transcoders = [resid_post(layer) for layer in sae_layers]
    scan = LOCAL_SCAN if features else "sae_vision_ext"
    exported = graph_json(graph, slug, scan, transcoders, feature_labels, prompt=prompt, supernodes=supernodes)
    if features:
        folder = out / "features"
        folder.mkdir(exist_ok=True)
        records = feature_files(
            graph, exported, rrm, stats, stats_pixels, n_examples=n_examples, logit_effects=logit_effects
        )
        for code, record in records.items():
            atomic_write_text(folder / f"{code}.json", json.dumps(record))
    atomic_write_text(out / f"{slug}.json", json.dumps(exported))
    add_graph_metadata(out, exported["metadata"])
    return exported


def serve_command(out_dir: str | Path, port: int = 8032) -> str:
    """The shell command that serves circuit-tracer files in ``out_dir`` with circuit-tracer's own
    ``local_server`` (its frontend then opens at ``http://localhost:<port>``)."""
    code = (
        "from circuit_tracer.frontend.local_server import serve; "
        f"serve('{Path(out_dir).resolve()}', port={port}).server_thread.join()"
    )
    return f'python -c "{code}"'
