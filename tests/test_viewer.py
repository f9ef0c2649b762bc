"""The offline attribution-graph viewer, in headless Chromium."""

from __future__ import annotations

import json
import re

import pytest
from conftest import images, launch_chromium, rrm_for

from sae_vision_ext.circuits.viewer import render_graph_html


@pytest.mark.browser
def test_graph_viewer_renders_and_clicks(tmp_path):
    from playwright.sync_api import sync_playwright

    rrm = rrm_for("timm_cls")
    x = images(1).double()
    graph = rrm.attribute(x).prune(node_threshold=0.8, edge_threshold=0.9)
    from sae_vision_ext.vis.stats import collect_feature_stats

    ref = images(6, seed=8).double()
    stats = collect_feature_stats(rrm.model, rrm.saes, ref, top_k=4, progress=False)
    path = render_graph_html(graph, tmp_path / "graph.html", rrm, x, stats=stats, images=ref, n_top=3)
    data = json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', path.read_text(), re.S)[1])
    assert len(data["nodes"]) == int(graph.node_mask.sum()) and data["links"]
    feature = next(n for n in data["nodes"] if n["kind"] == "feature")
    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page()
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(path.as_uri())
        assert page.evaluate("document.querySelectorAll('circle').length") == len(data["nodes"])
        assert page.evaluate("document.querySelectorAll('line').length") == len(data["links"])
        page.click(f"circle[data-id='{feature['id']}']")
        assert page.evaluate("document.getElementById('node-id').textContent") == feature["id"]
        assert page.evaluate("document.getElementById('heat').naturalWidth") > 0
        # top patches from the statistics: as many as the feature's top examples (up to 3), all loaded
        layer, feat = feature["id"].split("_")[:2]
        expected = len(stats[f"blocks.{layer}.hook_resid_post"].top_examples(int(feat))[:3])
        assert expected > 0
        assert page.evaluate("document.querySelectorAll('img.top').length") == expected
        assert page.evaluate("[...document.querySelectorAll('img.top')].every(i => i.naturalWidth > 0)")
        browser.close()
    assert errors == []
