"""circuit-tracer's files for an attribution graph, laid out as its server and frontend read them.

``write_circuit_tracer(graph, out_dir, slug)`` writes, in ``out_dir``:

- ``<slug>.json``: the graph (circuit-tracer 0.5.0's ``frontend/graph_models.Model``: metadata,
  qParams, nodes, links). Nodes and links are what its ``create_graph_files`` exports for the same
  pruning: links kept by ``prune`` between kept nodes; nodes kept by ``prune`` that touch a kept
  link, plus every input and target. ``influence`` is circuit-tracer's cumulative share (what its
  pruning slider compares with ``node_threshold``); our raw influence is the extra field
  ``influence_raw``. Ids, feature codes and clerps come from ``graph/nodes.py``.
- ``graph-metadata.json``: the list of graphs in the folder (the entry for ``slug`` replaced).
- ``features/<code>.json`` (``features=True``): one file per exported feature in circuit-tracer's
  feature format (``frontend/feature_models.Model``), with ``metadata.scan = "./data/features"``
  so its feature panel reads them from the served folder instead of the Hub (``graph/feature_files.py``:
  examples of the traced image and of the top images of ``stats``; density, percentiles and
  histogram from ``stats``), and ``features/<code>.png``, the feature's thumbnail (the traced
  image ``pixels`` under its activation map and its top images), which the node's ``vis_link``
  points at: the feature's title in circuit-tracer's panel opens it.
- ``<slug>.attention.json`` (``attention=``): head loadings of the strongest edges and QK attributions of
  the strongest attention entries (``circuits/engine/attention_report.py`` documents the schema);
  circuit-tracer's server serves it, its frontend does not read it, our viewer shows it.

``prompt_tokens`` (the labels under circuit-tracer's graph) are thinned so that they do not overlap:
prefix tokens and the first patch of each row keep their label (``CLS``, ``p(3,0)``), the other
patches show ``·``; node clerps keep the full position (``L3 #73 p(3,5)``), shown on hover, and the
feature examples keep every label. (circuit-tracer 0.5.0's frontend rebuilds embedding nodes' clerps from
``prompt_tokens``, so those alone read ``Emb: “·”`` on a thinned patch; docs/circuits.md.)

Serve the folder with ``circuit_tracer.frontend.local_server.serve(data_dir=out_dir)``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..._compat import renamed_kwargs
from ..._hooks import resid_post
from ..._io import atomic_write, atomic_write_text
from .feature_files import feature_files, thumbnail, traced_maps
from .nodes import (
    cantor_unpair,
    clerps,
    feature_codes,
    js_node_ids,
    node_ids,
    position_labels,
    readout_position,
)
from .ops import node_influence

if TYPE_CHECKING:
    from ...vis.stats import FeatureStats
    from ..replacement.base import ReplacementModelBase
    from .graph import AttributionGraph

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


def cumulative_share(graph: AttributionGraph) -> Tensor:
    """circuit-tracer's ``influence`` of every node: the cumulative share of the total influence of
    the nodes at least as influential (the pruning's, when the graph was pruned)."""
    if graph.cumulative_influence is not None:
        return graph.cumulative_influence
    raw = node_influence(graph)
    ordered, order = raw.sort(descending=True)
    cumulative = torch.zeros_like(raw)
    cumulative[order] = ordered.cumsum(0) / ordered.sum().clamp_min(1e-30)
    return cumulative


def thinned_labels(graph: AttributionGraph) -> list[str]:
    """``prompt_tokens`` as exported: prefix tokens and each row's first patch labelled, ``·`` elsewhere."""
    labels = position_labels(graph)
    gw = graph.grid[1]
    return [t if p < graph.n_prefix or (p - graph.n_prefix) % gw == 0 else "·" for p, t in enumerate(labels)]


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
    raw, cumulative = node_influence(graph), cumulative_share(graph)
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
        if kind == "feature":
            nodes[-1]["vis_link"] = f"{LOCAL_SCAN}/{codes[j]}.png"  # the thumbnail beside the feature's JSON
    a = graph.adjacency.coalesce()
    pairs = a.indices()[:, edges_keep].T.tolist()
    weights = a.values()[edges_keep].tolist()
    id_of = dict(zip(keep, ids, strict=True))
    links = [{"source": id_of[s], "target": id_of[d], "weight": w} for (d, s), w in zip(pairs, weights, strict=True)]
    tokens = thinned_labels(graph)
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
def write_circuit_tracer(  # noqa: PLR0913 (keyword-only export options, each documented)
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
    pixels: Tensor | None = None,
    attention: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``<slug>.json``, ``graph-metadata.json`` and (``features``) ``features/<code>.json`` into
    ``out_dir`` (see the module docstring); returns the graph JSON. ``feature_labels`` add a label to
    feature clerps; ``logit_effects`` fill the feature files' ``top_logits``/``bottom_logits``;
    ``supernodes`` (``[[name, node_id, ...]]``, e.g. our viewer's downloaded groups) go to ``qParams``;
    ``pixels`` (the traced image ``[1, chan, h, w]``, with ``rrm``) goes under the thumbnails' maps;
    ``attention`` (``engine/attention_report.attention_report``) is written to ``<slug>.attention.json``."""
    if not slug or "/" in slug or slug.startswith("."):
        raise ValueError(f"slug must be a plain file stem; got {slug!r}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sae_layers = sorted({int(lay) for lay, k in zip(graph.node_layer, graph.node_kind, strict=True) if k == "error"})
    transcoders = graph.transcoder_list or [resid_post(layer) for layer in sae_layers]
    scan = LOCAL_SCAN if features else "sae_vision_ext"
    exported = graph_json(graph, slug, scan, transcoders, feature_labels, prompt=prompt, supernodes=supernodes)
    if features:
        folder = out / "features"
        folder.mkdir(exist_ok=True)
        records, top_rows = feature_files(
            graph,
            exported,
            rrm,
            stats,
            stats_pixels,
            n_examples=n_examples,
            logit_effects=logit_effects,
            tokens=position_labels(graph),
        )
        _write_thumbnails(graph, folder, records, top_rows, rrm=rrm, pixels=pixels, stats_pixels=stats_pixels)
        for code, record in records.items():
            atomic_write_text(folder / f"{code}.json", json.dumps(record))
    atomic_write_text(out / f"{slug}.json", json.dumps(exported))
    if attention is not None:  # head loadings and QK attributions beside the graph (its own schema)
        atomic_write_text(out / f"{slug}.attention.json", json.dumps({**attention, "graph": f"{slug}.json"}))
    add_graph_metadata(out, exported["metadata"])
    return exported


def _write_thumbnails(
    graph: AttributionGraph,
    folder: Path,
    records: Mapping[int, Any],
    top_rows: Mapping[tuple[int, int], list[tuple[int, list[float]]]],
    *,
    rrm: ReplacementModelBase | None,
    pixels: Tensor | None,
    stats_pixels: Tensor | None,
) -> None:
    """``features/<code>.png`` for every record (``feature_files.thumbnail``)."""
    from ...vis.plots import display_images

    traced_rgb = display_images(rrm.model, pixels[:1])[0] if rrm is not None and pixels is not None else None
    used = sorted({i for rows in top_rows.values() for i, _ in rows})
    top_rgb = {}
    if used and rrm is not None and stats_pixels is not None:
        top_rgb = dict(zip(used, display_images(rrm.model, stats_pixels[torch.tensor(used)]), strict=True))
    maps = traced_maps(graph)
    n_pos = sum(k == "input" for k in graph.node_kind)
    for code in records:
        key = cantor_unpair(code)
        png = thumbnail(graph, maps.get(key, [0.0] * n_pos), traced_rgb, top_rows.get(key, []), top_rgb)
        atomic_write(folder / f"{code}.png", lambda tmp, png=png: tmp.write_bytes(png))


def serve_command(out_dir: str | Path, port: int = 8032) -> str:
    """The shell command that serves circuit-tracer files in ``out_dir`` with circuit-tracer's own
    ``local_server`` (its frontend then opens at ``http://localhost:<port>``)."""
    code = (
        "from circuit_tracer.frontend.local_server import serve; "
        f"serve('{Path(out_dir).resolve()}', port={port}).server_thread.join()"
    )
    return f'python -c "{code}"'
