"""circuit-tracer's per-feature files (``features/<code>.json``) and their PNG thumbnails.

A record (circuit-tracer 0.5.0's ``frontend/feature_models.Model``) holds:

- ``examples_quantiles``: token rows (position labels with the feature's activation at each) for the
  traced image, then the feature's top images of ``stats`` (re-encoded with ``rrm`` over ``stats_pixels``).
- ``activation_frequency``: the share of ``stats``'s tokens where the feature fires (its density).
- ``quantile_values``: the 1st..100th percentile of the feature's activation over its firing tokens,
  and ``histogram``: counts over ``[act_min, act_max]`` in 30 linear bins, both read from the
  statistics' log10 histogram (``vis/stats.py``'s ``hist``, 30 bins over 1e-4..1e2; a value is
  placed at its bin's geometric centre, so percentiles are exact to one log bin, a factor 1.58).
- ``act_min``/``act_max``: 0 and the feature's largest activation (statistics and the rows shown).

``thumbnail`` draws ``features/<code>.png``: the traced image with the feature's activation map
(normalised to the feature's own maximum) and its top images with their hottest patch outlined; the
graph JSON's ``vis_link`` points at it, so the feature's title in circuit-tracer's panel opens it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ..._hooks import resid_post
from .nodes import cantor_pair, cantor_unpair

if TYPE_CHECKING:
    from ...vis.stats import FeatureStats
    from ..replacement.base import ReplacementModelBase
    from .graph import AttributionGraph

N_BINS = 30
"""Linear bins of the exported ``histogram``."""

THUMB = 96
"""Side of one image in a thumbnail, in pixels."""


def stat_fields(stats: FeatureStats, feature: int) -> dict[str, Any]:
    """``activation_frequency``, ``quantile_values``, ``histogram`` and ``act_max`` of one feature
    from its statistics (see the module docstring); empty lists when it never fired."""
    from ...vis.stats import HIST_EDGES

    counts = stats.hist[feature].double()
    freq = float(stats.fire_tokens[feature]) / stats.n_tokens if stats.n_tokens else 0.0
    act_max = float(stats.max_act[feature])
    total = float(counts.sum())
    if total <= 0 or act_max <= 0:
        return {"activation_frequency": freq, "quantile_values": [], "histogram": [], "act_max": act_max}
    edges = HIST_EDGES.double()
    centres = (10 ** ((edges[:-1] + edges[1:]) / 2)).clamp(max=act_max)
    cum = counts.cumsum(0) / total
    quantiles = []
    for q in range(1, 101):  # the bin holding the q-th percentile, interpolated in log10 within it
        b = int(torch.searchsorted(cum, torch.tensor(q / 100, dtype=torch.float64) - 1e-12))
        b = min(b, len(counts) - 1)
        below = float(cum[b - 1]) if b > 0 else 0.0
        share = (q / 100 - below) / max(float(cum[b]) - below, 1e-12)
        lo, hi = float(edges[b]), float(edges[b + 1])
        quantiles.append(min(10 ** (lo + min(max(share, 0.0), 1.0) * (hi - lo)), act_max))
    lin = torch.zeros(N_BINS, dtype=torch.float64)
    slot = (centres / act_max * N_BINS).floor().clamp(0, N_BINS - 1).long()
    lin.index_add_(0, slot, counts)
    return {
        "activation_frequency": freq,
        "quantile_values": [round(v, 6) for v in quantiles],
        "histogram": [int(c) for c in lin.tolist()],
        "act_max": act_max,
    }


def feature_files(
    graph: AttributionGraph,
    exported: dict[str, Any],
    rrm: ReplacementModelBase | None = None,
    stats: Mapping[str, FeatureStats] | None = None,
    stats_pixels: Tensor | None = None,
    *,
    n_examples: int = 8,
    logit_effects: Mapping[tuple[int, int], tuple[list[str], list[str]]] | None = None,
    tokens: list[str] | None = None,
) -> tuple[dict[int, dict[str, Any]], dict[tuple[int, int], list[tuple[int, list[float]]]]]:
    """circuit-tracer feature records for the exported feature nodes, keyed by feature code, and the
    top rows used (``(layer, feature) -> [(image, per-position activations)]``, for thumbnails).
    ``tokens``: the position labels of the example rows (default the graph's ``prompt_tokens``)."""
    tokens = tokens or exported["metadata"]["prompt_tokens"]
    n_pos = len(tokens)
    wanted = {cantor_unpair(n["feature"]) for n in exported["nodes"] if n["feature_type"] == "cross layer transcoder"}
    maps = traced_maps(graph)
    top_rows = _top_rows(rrm, stats, stats_pixels, n_examples, wanted) if stats else {}
    out: dict[int, dict[str, Any]] = {}
    for layer, feat in sorted(wanted):
        code = cantor_pair(layer, feat)
        traced = maps.get((layer, feat), [0.0] * n_pos)
        quantiles = [{"quantile_name": "Traced image", "examples": [_example(traced, tokens)]}]
        rows = [r for _, r in top_rows.get((layer, feat), [])]
        if rows:
            quantiles.append({"quantile_name": "Top images", "examples": [_example(r, tokens) for r in rows]})
        every = [a for r in [traced, *rows] for a in r]
        hook = resid_post(layer)
        fields = {"activation_frequency": 0.0, "quantile_values": [], "histogram": [], "act_max": 0.0}
        if stats and hook in stats:
            fields = stat_fields(stats[hook], feat)
        top, bottom = (logit_effects or {}).get((layer, feat), ([], []))
        out[code] = {
            "transcoder_id": hook,
            "index": code,
            "examples_quantiles": quantiles,
            "top_logits": list(top),
            "bottom_logits": list(bottom),
            "act_min": 0.0,
            "act_max": max([fields.pop("act_max"), *every]) or 1.0,
            **fields,
        }
    return out, top_rows


def traced_maps(graph: AttributionGraph) -> dict[tuple[int, int], list[float]]:
    """Each feature's activation at every position of the traced image, from the graph's nodes."""
    n_pos = sum(k == "input" for k in graph.node_kind)
    kinds, layers = graph.node_kind, graph.node_layer.tolist()
    poss, feats, acts = graph.node_pos.tolist(), graph.node_feature.tolist(), graph.activation.tolist()
    out: dict[tuple[int, int], list[float]] = {}
    for i, kind in enumerate(kinds):
        if kind == "feature":
            out.setdefault((layers[i], feats[i]), [0.0] * n_pos)[poss[i]] = acts[i]
    return out


def _example(acts: list[float], tokens: list[str]) -> dict[str, Any]:
    return {
        "tokens_acts_list": [float(a) for a in acts],
        "train_token_ind": int(max(range(len(acts)), key=lambda p: acts[p])) if acts else 0,
        "is_repeated_datapoint": False,
        "tokens": list(tokens),
    }


@torch.no_grad()
def _top_rows(
    rrm: ReplacementModelBase | None,
    stats: Mapping[str, FeatureStats],
    stats_pixels: Tensor | None,
    n: int,
    wanted: set[tuple[int, int]],
) -> dict[tuple[int, int], list[tuple[int, list[float]]]]:
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
    out: dict[tuple[int, int], list[tuple[int, list[float]]]] = {}
    for (layer, feat), ids in needed.items():
        slot = rrm.layers.index(layer)
        out[(layer, feat)] = [(i, acts[slot][row_of[i], :, feat].double().tolist()) for i in ids]
    return out


def _tile(rgb: np.ndarray | None, acts: list[float], n_prefix: int, grid: tuple[int, int], box: bool) -> np.ndarray:
    """One ``THUMB``-sided tile: the image (grey without one) under the feature's patch activations
    normalised to their own maximum (orange-red), the hottest patch outlined when ``box``."""
    from PIL import Image

    gh, gw = grid
    base = (
        np.full((THUMB, THUMB, 3), 0.85)
        if rgb is None
        else np.asarray(Image.fromarray((rgb * 255).astype(np.uint8)).resize((THUMB, THUMB))) / 255.0
    )
    patch = np.asarray(acts[n_prefix : n_prefix + gh * gw], dtype=np.float64).reshape(gh, gw)
    top = patch.max() if patch.size else 0.0
    heat = np.clip(patch / top, 0, 1) if top > 0 else np.zeros_like(patch)
    heat = np.kron(heat, np.ones((math.ceil(THUMB / gh), math.ceil(THUMB / gw))))[:THUMB, :THUMB, None]
    colour = np.array([0.85, 0.2, 0.05])
    out = base * (1 - 0.7 * heat) + colour * 0.7 * heat
    if box and top > 0:
        r, c = divmod(int(patch.argmax()), gw)
        y0, x0 = r * THUMB // gh, c * THUMB // gw
        y1, x1 = (r + 1) * THUMB // gh - 1, (c + 1) * THUMB // gw - 1
        out[y0 : y1 + 1, [x0, x1]] = out[[y0, y1], x0 : x1 + 1] = (0.1, 0.3, 1.0)
    return (out * 255).astype(np.uint8)


def thumbnail(
    graph: AttributionGraph,
    traced: list[float],
    traced_rgb: np.ndarray | None,
    tops: list[tuple[int, list[float]]],
    top_rgb: Mapping[int, np.ndarray],
) -> bytes:
    """PNG bytes of one feature's thumbnail (see the module docstring): tiles separated by 4 px."""
    import io

    from PIL import Image

    tiles = [_tile(traced_rgb, traced, graph.n_prefix, graph.grid, box=False)]
    tiles += [_tile(top_rgb.get(i), row, graph.n_prefix, graph.grid, box=True) for i, row in tops]
    sheet = np.full((THUMB, len(tiles) * (THUMB + 4) - 4, 3), 255, dtype=np.uint8)
    for j, t in enumerate(tiles):
        sheet[:, j * (THUMB + 4) : j * (THUMB + 4) + THUMB] = t
    buf = io.BytesIO()
    Image.fromarray(sheet).save(buf, format="PNG")
    return buf.getvalue()
