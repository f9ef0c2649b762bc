"""What circuit-tracer's feature panel reads from our export: density, percentiles and histogram from
the feature statistics (checked against the activations themselves), top images, a PNG thumbnail per
feature linked from the node, and position labels thinned under the graph."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import images, rrm_for
from PIL import Image

from sae_vision_ext.circuits.graph.nodes import cantor_unpair, position_labels


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from sae_vision_ext.vis.stats import collect_feature_stats

    out = tmp_path_factory.mktemp("ct")
    rrm = rrm_for("timm_cls")
    x = images(1).double()
    pruned = rrm.attribute(x, batch_size=16).prune()
    ref = images(12, seed=5).double()
    stats = collect_feature_stats(rrm.model, rrm.saes, ref, top_k=3, progress=False)
    graph = pruned.to_json(out / "g.json", rrm=rrm, stats=stats, stats_pixels=ref, pixels=x)
    return out, graph, pruned, rrm, ref, stats


def test_feature_records_carry_density_percentiles_and_histogram(exported):
    out, graph, _, rrm, ref, stats = exported
    acts = [a.detach() for a in rrm.feature_acts(ref)]
    checked = 0
    for node in graph["nodes"]:
        if node["feature_type"] != "cross layer transcoder":
            continue
        layer, feat = cantor_unpair(node["feature"])
        rec = json.loads((out / "features" / f"{node['feature']}.json").read_text())
        a = acts[rrm.layers.index(layer)][:, :, feat].flatten()
        fired = a[a > 0]
        assert rec["activation_frequency"] == pytest.approx(len(fired) / a.numel())
        q = rec["quantile_values"]
        assert len(q) == 100 and q == sorted(q) and q[-1] <= rec["act_max"] + 1e-6  # rounded to 6 decimals
        for pct in (10, 50, 90):  # exact to one log10 bin of the statistics (a factor 10**0.2)
            true = float(torch.quantile(fired, pct / 100))
            assert true / 10**0.21 <= q[pct - 1] <= true * 10**0.21
        assert sum(rec["histogram"]) == int(((fired >= 1e-4) & (fired < 100)).sum()) and len(rec["histogram"]) == 30
        names = [r["quantile_name"] for r in rec["examples_quantiles"]]
        assert names == ["Traced image", "Top images"]
        assert len(rec["examples_quantiles"][1]["examples"]) == len(stats[rec["transcoder_id"]].top_examples(feat)[:8])
        checked += 1
    assert checked > 3


def test_a_thumbnail_per_feature_linked_from_its_node(exported):
    out, graph, pruned, *_ = exported
    feats = [n for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"]
    for node in feats:
        assert node["vis_link"] == f"./data/features/{node['feature']}.png"
        png = Image.open(out / "features" / f"{node['feature']}.png")
        assert png.size[1] == 96 and png.size[0] >= 96
    # the traced tile is tinted where the feature fires: its hottest patch differs from its coldest
    node = max(feats, key=lambda n: n["activation"])
    tile = np.asarray(Image.open(out / "features" / f"{node['feature']}.png").convert("RGB"))[:, :96].astype(int)
    assert np.abs(tile - tile.mean((0, 1))).max() > 40
    # labels under the graph: prefix tokens and the first patch of each row; the examples keep all
    labels = position_labels(pruned)
    tokens = graph["metadata"]["prompt_tokens"]
    gw, n_prefix = pruned.grid[1], pruned.n_prefix
    shown = [t for t in tokens if t != "·"]
    assert len(shown) == n_prefix + pruned.grid[0]
    assert all(tokens[p] == labels[p] for p in range(n_prefix)) and tokens[n_prefix + gw] == labels[n_prefix + gw]
    rec = json.loads((out / "features" / f"{node['feature']}.json").read_text())
    assert rec["examples_quantiles"][0]["examples"][0]["tokens"] == labels
