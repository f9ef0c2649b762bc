"""``render_graph_html``: a self-contained, offline viewer of an attribution graph over an image.

Layout: one column per layer (inputs, each SAE layer, targets), and inside a column the image's
patch grid, so a node sits where its token is on the image (prefix tokens, CLS then registers, in a
row above the grid; the inputs column shows the traced image itself). Nodes are drawn on a canvas
(thousands stay responsive); only the selected node's edges are drawn (blue raises the target,
red lowers it, width by |weight|), and the side panel lists its signed inputs and outputs, the
feature's activation map on the traced image with a colour scale, its top patches over a reference
set (``stats`` and ``stats_pixels``), and a link to its dashboard page when that page exists. Hover shows
a node's label; a slider hides nodes beyond a cumulative-influence share (circuit-tracer's
``influence``); shift-click selects several nodes and "group" makes them a supernode, kept in the
browser and downloadable as circuit-tracer's ``qParams.supernodes``. With ``aggregated`` (from
``rrm.attribute_aggregated``) a second tab draws the paper's token-aggregated circuit as cards; without
it, given ``supernodes``, that tab draws the supernodes as cards (summed influence and edges).
With ``attention`` (``engine/attention_report.attention_report``) a drawn edge can be clicked: the panel
lists its split over the heads of every block it crosses (the parts and their sum, which is the edge),
and a head with a QK attribution lists that attention entry's strongest query x key feature pairs.

Node ids, labels and feature codes come from ``graph/nodes.py``; a pruned graph shows what
``export.write_circuit_tracer`` exports; an unpruned graph shows every node with each node's
``max_edges_per_node`` strongest inputs and outputs. Everything is embedded: no server, no network.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ..._compat import renamed_kwargs
from ..._hooks import resid_post
from .export import cumulative_share, exported_masks
from .nodes import clerps, node_ids, position_labels
from .ops import edges, node_influence

if TYPE_CHECKING:
    from ...models.hooked_vit import HookedViT
    from ...vis.stats import FeatureStats
    from ..replacement.base import ReplacementModelBase
    from .graph import AggregatedGraph, AttributionGraph


def _png_data_uri(rgb: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _image_uri(model: HookedViT, pixels: Tensor, max_side: int = 192) -> str:
    from PIL import Image

    from ...vis.plots import display_images

    rgb = (display_images(model, pixels)[0] * 255).astype(np.uint8)
    im = Image.fromarray(rgb)
    if max(im.size) > max_side:
        im.thumbnail((max_side, max_side))
    return _png_data_uri(np.asarray(im))


def strongest_edges(graph: AttributionGraph, per_node: int) -> Tensor:
    """Mask over the stored edges keeping, for every node, its ``per_node`` strongest inputs and
    outputs by |weight| (an edge is kept when either end keeps it)."""
    dst, src, vals = edges(graph.adjacency)
    keep = torch.zeros(len(vals), dtype=torch.bool)
    order = vals.abs().argsort(descending=True)
    for ends in (dst, src):
        grouped = order[ends[order].argsort(stable=True)]  # by node, strongest first within a node
        node = ends[grouped]
        first = torch.ones_like(node, dtype=torch.bool)
        first[1:] = node[1:] != node[:-1]
        start = torch.cummax(torch.where(first, torch.arange(len(node)), torch.zeros_like(node)), 0).values
        keep[grouped[(torch.arange(len(node)) - start) < per_node]] = True
    return keep


@renamed_kwargs(images="stats_pixels")
def viewer_data(  # noqa: PLR0913 (keyword-only display options, as render_graph_html's)
    graph: AttributionGraph,
    rrm: ReplacementModelBase | None = None,
    pixels: Tensor | None = None,
    stats: Mapping[str, FeatureStats] | None = None,
    stats_pixels: Tensor | None = None,
    *,
    n_top: int = 4,
    dashboard_dir: str | None = None,
    base_dir: Path | None = None,
    aggregated: AggregatedGraph | None = None,
    max_edges_per_node: int = 40,
    supernodes: Sequence[Sequence[str]] | None = None,
    feature_labels: Mapping[tuple[int, int], str] | None = None,
    attention: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What the viewer page embeds (see the module docstring)."""
    if graph.node_mask is not None:
        shown, edge_keep = exported_masks(graph)
    else:
        shown, edge_keep = torch.ones(graph.n_nodes, dtype=torch.bool), strongest_edges(graph, max_edges_per_node)
    index = {i: j for j, i in enumerate(shown.nonzero().squeeze(1).tolist())}
    nodes = _nodes(graph, index, feature_labels)
    shown_feats = {f"{n['l']}_{n['f']}" for n in nodes if n["k"] == "feature"}
    dst, src, vals = edges(graph.adjacency)
    keep = edge_keep & shown[src] & shown[dst]
    triples = zip(src[keep].tolist(), dst[keep].tolist(), vals[keep].tolist(), strict=True)
    maps = _activation_maps(graph)
    kinds, layers = graph.node_kind, graph.node_layer.tolist()
    data: dict[str, Any] = {
        "grid": list(graph.grid),
        "n_prefix": graph.n_prefix,
        "tokens": position_labels(graph),
        "layers": sorted({layers[i] for i in range(len(kinds)) if kinds[i] in ("feature", "error", "mlp")}),
        "targets": graph.target_names,
        "target_probs": _target_probs(graph),
        "node_threshold": graph.pruning[0] if graph.pruning else 1.0,
        "nodes": nodes,
        "links": [[index[s], index[d], round(w, 6)] for s, d, w in triples],
        "maps": {k: maps[k] for k in shown_feats},
        "image": _image_uri(rrm.model, pixels) if rrm is not None and pixels is not None else None,
        "refs": {},
        "tops": {},
        "pages": _dashboard_pages(shown_feats, dashboard_dir, base_dir) if dashboard_dir is not None else {},
        "supernodes": [list(s) for s in supernodes or []],
        "aggregated": _aggregated_cards(aggregated) if aggregated is not None else None,
        "attention": dict(attention) if attention is not None else None,
    }
    if aggregated is None and supernodes:  # the token-aggregated tab from the supernodes
        data["aggregated"] = _supernode_cards(graph, supernodes, nodes)
    if stats is not None and stats_pixels is not None and rrm is not None:
        data["tops"] = _top_patches(shown_feats, stats, n_top)
        used = sorted({img for tops in data["tops"].values() for _, img, _ in tops})
        data["refs"] = {str(i): _image_uri(rrm.model, stats_pixels[i : i + 1], 96) for i in used}
    return data


def _nodes(
    graph: AttributionGraph, index: dict[int, int], feature_labels: Mapping[tuple[int, int], str] | None
) -> list[dict[str, Any]]:
    """The shown nodes (``index``: graph node -> page node), in node order, as the page reads them."""
    ids, labels = node_ids(graph), clerps(graph, feature_labels)
    raw = (node_influence(graph) + graph.weights).tolist()
    cum = cumulative_share(graph).tolist()  # circuit-tracer's influence: the one figure the page shows
    kinds, layers = graph.node_kind, graph.node_layer.tolist()
    poss, feats, acts = graph.node_pos.tolist(), graph.node_feature.tolist(), graph.activation.tolist()
    first_target = kinds.index("target") if "target" in kinds else len(kinds)
    nodes = []
    for i in index:
        node = {
            "id": ids[i],
            "k": kinds[i],
            "l": layers[i],
            "p": poss[i],
            "f": feats[i],
            "c": labels[i],
            "a": acts[i],
            "i": raw[i],
            "q": cum[i],
        }
        if kinds[i] == "target":
            node["c"] = graph.target_names[i - first_target]
            node["p"] = -1
        nodes.append(node)
    return nodes


def _target_probs(graph: AttributionGraph) -> list[float | None]:
    """Each target's probability (``None`` when the graph has none, e.g. a non-class target)."""
    probs = graph.target_probs.tolist() if graph.target_probs is not None else []
    n = len(graph.target_names)
    return [float(probs[t]) if t < len(probs) and probs[t] == probs[t] else None for t in range(n)]


def _activation_maps(graph: AttributionGraph) -> dict[str, list[float]]:
    """Each feature's activation at every position (all its nodes, pruned or not), keyed ``{layer}_{feature}``."""
    n_pos = sum(k == "input" for k in graph.node_kind)
    layers, poss = graph.node_layer.tolist(), graph.node_pos.tolist()
    feats, acts = graph.node_feature.tolist(), graph.activation.tolist()
    maps: dict[str, list[float]] = {}
    for i, kind in enumerate(graph.node_kind):
        if kind == "feature":
            maps.setdefault(f"{layers[i]}_{feats[i]}", [0.0] * n_pos)[poss[i]] = round(acts[i], 5)
    return maps


def _top_patches(
    features: set[str], stats: Mapping[str, FeatureStats], n_top: int
) -> dict[str, list[tuple[float, int, int]]]:
    """``(activation, image, token)`` of the top ``n_top`` examples of each ``{layer}_{feature}``."""
    out = {}
    for key in features:
        layer, feat = (int(x) for x in key.split("_"))
        if resid_post(layer) in stats:
            examples = stats[resid_post(layer)].top_examples(feat)[:n_top]
            out[key] = [(float(a), int(img), int(tok)) for a, img, tok in examples]
    return out


def _dashboard_pages(features: set[str], dashboard_dir: str, base_dir: Path | None) -> dict[str, str]:
    """Links to the dashboard pages of ``features`` that exist under ``base_dir / dashboard_dir``."""
    root, pages = Path(base_dir or ".") / dashboard_dir, {}
    for key in features:
        layer, feat = key.split("_")
        page = f"{resid_post(int(layer))}/f{feat}.html"
        if (root / page).exists():
            pages[key] = f"{dashboard_dir}/{page}"
    return pages


def _aggregated_cards(agg: AggregatedGraph, per_layer: int = 6) -> dict[str, Any]:
    """The paper's token-aggregated circuit: per SAE layer the ``per_layer`` features of largest
    |relevance| (plus the error node), and the edges among them."""
    cards, keep = [], []
    relevance = [r.detach() for r in agg.relevance]
    for i, rel in enumerate(relevance):
        feats = rel[:-1].abs().argsort(descending=True)[:per_layer].tolist()
        chosen = [f for f in feats if float(rel[f]) != 0] + [len(rel) - 1]
        keep.append(chosen)
        for f in chosen:
            err = f == len(rel) - 1
            cards.append(
                {
                    "id": f"{agg.layers[i]}_{'err' if err else f}",
                    "layer": agg.layers[i],
                    "feature": -1 if err else f,
                    "relevance": float(rel[f]),
                }
            )
    links = []
    for i, e in enumerate(agg.edges[:-1]):
        for t in keep[i + 1]:
            for s in keep[i]:
                w = float(e[t, s].detach())
                if w != 0:
                    tid = f"{agg.layers[i + 1]}_{'err' if t == len(relevance[i + 1]) - 1 else t}"
                    sid = f"{agg.layers[i]}_{'err' if s == len(relevance[i]) - 1 else s}"
                    links.append([sid, tid, w])
    return {"cards": cards, "links": links, "target": float(agg.target_value)}


def _supernode_cards(
    graph: AttributionGraph, supernodes: Sequence[Sequence[str]], shown: list[dict[str, Any]], per_layer: int = 6
) -> dict[str, Any]:
    """The aggregated tab from supernodes (``[name, node_id, ...]``): per layer the ``per_layer`` groups of
    largest summed influence, and the summed edges among them (``supernodes.group_edges``, all edges of the
    graph, pruned or not)."""
    from .supernodes import Supernode, group_edges

    index = {nid: i for i, nid in enumerate(node_ids(graph))}
    on_page = {n["id"] for n in shown}
    infl = node_influence(graph)
    by_layer: dict[int, list[tuple[float, Supernode]]] = {}
    for name, *ids in supernodes:
        members = [index[i] for i in ids if i in index and i in on_page]
        if members:
            layer = int(graph.node_layer[members[0]])
            by_layer.setdefault(layer, []).append((float(infl[members].sum()), Supernode(name, layer, members)))
    chosen = [g for layer in sorted(by_layer) for _, g in sorted(by_layer[layer], key=lambda t: -t[0])[:per_layer]]
    ids = node_ids(graph)
    cards = [
        {
            "id": f"g{k}",
            "layer": g.layer,
            "feature": int(graph.node_feature[g.nodes[0]]),
            "relevance": float(infl[g.nodes].sum()),
            "label": g.name,
            "members": [ids[i] for i in g.nodes],
        }
        for k, g in enumerate(chosen)
    ]
    weights = group_edges(graph, chosen)
    dst, src = weights.nonzero(as_tuple=True)
    links = [[f"g{s}", f"g{d}", float(weights[d, s])] for d, s in zip(dst.tolist(), src.tolist(), strict=True)]
    target = float(torch.nan_to_num(graph.value[[k == "target" for k in graph.node_kind]]).sum())
    return {"cards": cards, "links": links, "target": target, "source": "supernodes", "measure": "influence"}


@renamed_kwargs(images="stats_pixels")
def render_graph_html(  # noqa: PLR0913 (keyword-only display options, each documented)
    graph: AttributionGraph,
    path: str | Path,
    rrm: ReplacementModelBase | None = None,
    pixels: Tensor | None = None,
    dashboard_dir: str | None = None,
    *,
    title: str = "attribution graph",
    stats: Mapping[str, FeatureStats] | None = None,
    stats_pixels: Tensor | None = None,
    n_top: int = 4,
    aggregated: AggregatedGraph | None = None,
    max_edges_per_node: int = 40,
    supernodes: Sequence[Sequence[str]] | None = None,
    feature_labels: Mapping[tuple[int, int], str] | None = None,
    attention: Mapping[str, Any] | None = None,
) -> Path:
    """Write the viewer for ``graph`` to ``path`` (see the module docstring). ``rrm`` and the traced
    ``pixels`` ``[1, chan, h, w]`` draw the image under the grid; top patches need ``stats``
    (``{hook_name: FeatureStats}``), the preprocessed ``stats_pixels`` they were collected on and ``rrm``;
    ``dashboard_dir`` is relative to ``path``'s folder (only existing pages are linked); ``attention``
    (``engine/attention_report.attention_report``) lists a clicked edge's heads and an entry's QK pairs."""
    import markupsafe

    from ...vis.html import template_env

    path = Path(path)
    data = viewer_data(
        graph,
        rrm,
        pixels,
        stats,
        stats_pixels,
        n_top=n_top,
        dashboard_dir=dashboard_dir,
        base_dir=path.parent,
        aggregated=aggregated,
        max_edges_per_node=max_edges_per_node,
        supernodes=supernodes,
        feature_labels=feature_labels,
        attention=attention,
    )
    n_feat = sum(n["k"] == "feature" for n in data["nodes"])
    subtitle = f"{len(data['nodes'])} nodes ({n_feat} features), {len(data['links'])} edges"
    probs = data["target_probs"]
    subtitle += "; target: " + ", ".join(
        name + (f" (p={p:.3f})" if p is not None else "") for name, p in zip(graph.target_names, probs, strict=True)
    )
    html = (
        template_env()
        .get_template("graph.html.j2")
        .render(
            title=title,
            subtitle=subtitle,
            data_json=markupsafe.Markup(json.dumps(data).replace("</", "<\\/")),  # "</" escaped: safe in <script>
        )
    )
    path.write_text(html)
    return path
