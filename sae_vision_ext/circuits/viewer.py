"""``render_graph_html``: a self-contained, offline HTML view of a (pruned) attribution graph.

Layers are columns (inputs, layers 0..L-1, targets), nodes are sized by influence and coloured by
kind, edges drawn with width and opacity by |weight| (blue positive, red negative). Clicking a
feature node shows where that feature fires on the traced image (a heatmap computed with the
SAE's ``encode``), its top patches over a reference image set when feature statistics are given
(``stats`` from ``collect_feature_stats`` and the ``images`` they were collected on: each top
image with its hottest patch outlined), and, when a dashboard folder is given, a link to its
feature page. Everything (data and images) is embedded: no server, no network.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .graph_ops import influence, normalised_abs, position_label


def _png_data_uri(rgb: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@torch.no_grad()
def render_graph_html(graph: Any, path: str | Path, rrm: Any | None = None, pixels: Tensor | None = None,
                      dashboard_dir: str | None = None, title: str = "attribution graph",
                      stats: dict[str, Any] | None = None, images: Tensor | None = None,
                      n_top: int = 4) -> Path:  # fmt: skip
    """Write the viewer for ``graph`` (its pruning masks are honoured); heatmaps need ``rrm`` and the
    traced ``pixels`` ``[1, chan, h, w]``; top patches need ``stats`` (``{hook_name: FeatureStats}``),
    the ``images`` they were collected on (preprocessed) and ``rrm``."""
    import markupsafe

    from ..vis.html import template_env
    from ..vis.plots import display_images

    mask = graph.node_mask if graph.node_mask is not None else torch.ones(graph.n_nodes, dtype=torch.bool)
    infl = influence(normalised_abs(graph.adjacency), graph.weights) + graph.weights
    n_layers = int(graph.node_layer.max())
    heatmaps: dict[str, str] = {}
    tops: dict[str, list[dict[str, Any]]] = {}
    image = feats_by_layer = None
    if rrm is not None and pixels is not None:
        image = display_images(rrm.model, pixels)[0]
        feats_by_layer = rrm.feature_acts(pixels)
    nodes = []
    for i in mask.nonzero().squeeze(1).tolist():
        kind, layer, pos = graph.node_kind[i], int(graph.node_layer[i]), int(graph.node_pos[i])
        feat = int(graph.node_feature[i])
        node = {
            "id": {"feature": f"{layer}_{feat}_{pos}", "error": f"{layer}_-1_{pos}", "input": f"E_{pos}",
                   "mlp": f"{layer}_mlp_{pos}", "target": f"T_{i}"}[kind],
            "kind": kind, "layer": layer, "col": layer + 1, "influence": float(infl[i]),
            "activation": float(graph.activation[i]),
            "label": graph.target_names[i - graph.node_kind.index("target")] if kind == "target"
            else position_label(pos, graph.n_prefix, graph.has_cls, graph.grid[1]),
        }  # fmt: skip
        if kind == "feature" and image is not None:
            key = f"{layer}_{feat}"
            if key not in heatmaps:
                acts = feats_by_layer[layer][0, graph.n_prefix :, feat].reshape(*graph.grid).cpu().numpy()
                cell = np.ones((image.shape[0] // graph.grid[0], image.shape[1] // graph.grid[1]))
                heat = np.kron(acts / max(float(acts.max()), 1e-12), cell)
                overlay = image * (1 - 0.6 * heat[..., None]) + 0.6 * heat[..., None] * np.array([1.0, 0.2, 0.1])
                heatmaps[key] = _png_data_uri((overlay.clip(0, 1) * 255).astype(np.uint8))
            node["heatmap"] = key
        hook = f"blocks.{layer}.hook_resid_post"
        if kind == "feature" and stats is not None and images is not None and rrm is not None and hook in stats:
            key = f"{layer}_{feat}"
            if key not in tops:
                tops[key] = [_top_patch(rrm.model, images, i, tok, graph, act)
                             for act, i, tok in stats[hook].top_examples(feat)[:n_top]]  # fmt: skip
            node["tops"] = key
        if kind == "feature" and dashboard_dir is not None:
            node["link"] = f"{dashboard_dir}/blocks.{layer}.hook_resid_post/f{feat}.html"
        nodes.append(node)
    ids = {i: n["id"] for i, n in zip(mask.nonzero().squeeze(1).tolist(), nodes, strict=True)}
    a = graph.adjacency.coalesce()
    emask = graph.edge_mask if graph.edge_mask is not None else torch.ones(a._nnz(), dtype=torch.bool)
    links = [{"source": ids[s], "target": ids[t], "weight": w}
             for (t, s), w, keep in zip(a.indices().T.tolist(), a.values().tolist(), emask.tolist(), strict=True)
             if keep and s in ids and t in ids]  # fmt: skip
    columns = ["inputs", *[f"layer {i}" for i in range(n_layers)], "targets"]
    data = {"nodes": nodes, "links": links, "columns": columns, "heatmaps": heatmaps, "tops": tops}
    html = (
        template_env()
        .get_template("graph.html.j2")
        .render(
            title=title,
            subtitle=f"{len(nodes)} nodes, {len(links)} edges; target: {', '.join(graph.target_names)}",
            data_json=markupsafe.Markup(json.dumps(data).replace("</", "<\\/")),  # "</" escaped: safe in <script>
        )
    )
    path = Path(path)
    path.write_text(html)
    return path


def _top_patch(model: Any, images: Tensor, index: int, token: int, graph: Any, act: float) -> dict[str, Any]:
    """One top example: the image with its hottest patch outlined (prefix tokens: the whole image)."""
    from ..vis.plots import display_images

    img = (display_images(model, images[index : index + 1])[0] * 255).astype(np.uint8).copy()
    if token >= graph.n_prefix:
        gh, gw = graph.grid
        ph, pw = img.shape[0] // gh, img.shape[1] // gw
        r, c = divmod(token - graph.n_prefix, gw)
        box = img[r * ph : (r + 1) * ph, c * pw : (c + 1) * pw]
        red = np.array([255, 40, 40], dtype=np.uint8)
        box[[0, -1], :] = red
        box[:, [0, -1]] = red
    label = position_label(token, graph.n_prefix, graph.has_cls, graph.grid[1])
    return {"src": _png_data_uri(img), "caption": f"image {index}, {label}, {act:.2f}"}
