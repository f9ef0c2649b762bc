"""The offline attribution-graph viewer, in headless Chromium: layout by layer and image position,
only the selected node's edges, heatmap and top patches, pruning slider, supernodes, the aggregated
tab, links only to pages that exist, and the unpruned shapes graph (thousands of nodes)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import images, launch_chromium, rrm_for

from sae_vision_ext.circuits.graph.export import exported_masks
from sae_vision_ext.circuits.graph.nodes import node_ids
from sae_vision_ext.circuits.graph.viewer import render_graph_html, strongest_edges


def page_data(path) -> dict:
    return json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', path.read_text(), re.S)[1])


def _open(p, path):
    browser = launch_chromium(p)
    page = browser.new_page(viewport={"width": 1600, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri())
    page.wait_for_function("window.sveViewer !== undefined")
    return browser, page, errors


def _click(page, node_id: str, shift: bool = False) -> None:
    x, y = page.evaluate(f"sveViewer.screenPos('{node_id}')")
    if shift:
        page.keyboard.down("Shift")
    page.mouse.click(x, y)
    if shift:
        page.keyboard.up("Shift")


def test_strongest_edges_keeps_each_nodes_top_inputs_and_outputs():
    rrm = rrm_for("timm_cls")
    g = rrm.attribute(images(1).double(), batch_size=16)
    keep = strongest_edges(g, 3)
    a = g.adjacency.coalesce()
    dst, src = a.indices()
    mag = a.values().abs()
    for node in range(g.n_nodes):
        for ends in (dst, src):
            mine = (ends == node).nonzero().squeeze(1)
            if len(mine):
                top = mine[mag[mine].argsort(descending=True)[:3]]
                assert bool(keep[top].all())
    assert int(keep.sum()) <= 2 * 3 * g.n_nodes and int(keep.sum()) < a._nnz()


@pytest.mark.browser
def test_viewer_click_draws_only_that_nodes_edges_with_heatmap_and_top_patches(tmp_path):
    from playwright.sync_api import sync_playwright

    from sae_vision_ext.vis.stats import collect_feature_stats

    rrm = rrm_for("timm_cls")
    x = images(1).double()
    graph = rrm.attribute(x).prune(node_threshold=0.8, edge_threshold=0.9)
    ref = images(6, seed=8).double()
    stats = collect_feature_stats(rrm.model, rrm.saes, ref, top_k=4, progress=False)
    agg = rrm.attribute_aggregated(x)
    # one dashboard page exists, the others do not: only it is linked
    feature_i = next(i for i, k in enumerate(graph.node_kind) if k == "feature" and bool(exported_masks(graph)[0][i]))
    layer, feat = int(graph.node_layer[feature_i]), int(graph.node_feature[feature_i])
    page_path = tmp_path / "dash" / f"blocks.{layer}.hook_resid_post" / f"f{feat}.html"
    page_path.parent.mkdir(parents=True)
    page_path.write_text("<html></html>")
    path = render_graph_html(
        graph,
        tmp_path / "graph.html",
        rrm,
        x,
        dashboard_dir="dash",
        stats=stats,
        stats_pixels=ref,
        n_top=3,
        aggregated=agg,
    )
    data = page_data(path)
    shown, _ = exported_masks(graph)
    assert len(data["nodes"]) == int(shown.sum())  # what circuit-tracer's files hold
    assert data["pages"] == {f"{layer}_{feat}": f"dash/blocks.{layer}.hook_resid_post/f{feat}.html"}
    ids = node_ids(graph)
    fid = ids[feature_i]
    j = next(k for k, n in enumerate(data["nodes"]) if n["id"] == fid)
    mine = [e for e in data["links"] if j in (e[0], e[1])]
    assert mine and len(mine) < len(data["links"])
    with sync_playwright() as p:
        browser, page, errors = _open(p, path)
        assert page.evaluate("sveViewer.visibleCount()") == len(data["nodes"])
        assert page.evaluate("document.querySelectorAll('path.edge').length") == 0  # nothing drawn before a click
        _click(page, fid)
        assert page.evaluate("document.getElementById('node-id').textContent") == fid
        drawn = page.evaluate(
            "[...document.querySelectorAll('path.edge')].map(e => [e.dataset.source, e.dataset.target])"
        )
        assert len(drawn) == len(mine) and all(fid in pair for pair in drawn)
        listed = page.evaluate("document.querySelectorAll('#info ul.io li').length")
        assert listed == min(12, sum(e[1] == j for e in mine)) + min(12, sum(e[0] == j for e in mine))
        # the heatmap is painted where the feature fires on the traced image, with a colour scale
        heat = page.evaluate(
            "(() => { const c = document.getElementById('heat');"
            " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            " let s = 0; for (let i = 3; i < d.length; i += 4) s += d[i] > 0; return s })()"
        )
        assert heat > 0 and page.evaluate("document.getElementById('scale') !== null")
        expected = len(stats[f"blocks.{layer}.hook_resid_post"].top_examples(feat)[:3])
        page.wait_for_function(f"document.querySelectorAll('canvas.top[data-loaded]').length == {expected}")
        assert page.evaluate("document.getElementById('page').getAttribute('href')") == data["pages"][f"{layer}_{feat}"]
        # clicking an input in the list selects that node
        page.click("#info ul.io li")
        assert page.evaluate("document.getElementById('node-id').textContent") != fid
        # pruning slider: nodes beyond the cumulative share disappear
        t = 0.4
        slide = "v => { const s = document.getElementById('slider'); s.value = v; s.dispatchEvent(new Event('input')) }"
        page.evaluate(slide, t)
        keep = sum(n["k"] in ("input", "target") or n["q"] <= t + 1e-9 for n in data["nodes"])
        assert page.evaluate("sveViewer.visibleCount()") == keep < len(data["nodes"])
        page.evaluate(slide, 0.8)
        # supernodes: shift-click two features, name the group, download circuit-tracer's qParams
        two = [n["id"] for n in data["nodes"] if n["k"] == "feature"][:2]
        for nid in two:
            _click(page, nid, shift=True)
        page.fill("#group-name", "edges")
        page.click("#group")
        assert page.evaluate("document.querySelectorAll('#groups li').length") == 1
        with page.expect_download() as dl:
            page.click("#download")
        saved = json.loads(Path(dl.value.path()).read_text())
        assert saved["qParams"]["supernodes"] == [["edges", *two]]
        # the paper's token-aggregated circuit as feature cards
        page.click("#tab-agg")
        n_cards = page.evaluate("document.querySelectorAll('#agg g.card').length")
        assert n_cards == len(data["aggregated"]["cards"]) > 0
        browser.close()
    assert errors == []


@pytest.mark.browser
@pytest.mark.slow
def test_viewer_stays_usable_on_the_unpruned_shapes_graph(tmp_path):
    from playwright.sync_api import sync_playwright

    from sae_vision_ext.circuits.models import ResidualReplacementModel
    from sae_vision_ext.data.shapes import make_shapes
    from sae_vision_ext.models import HookedViT
    from sae_vision_ext.saes.loading import load_sae

    model = HookedViT.from_pretrained("sve:shapes-vit")
    rrm = ResidualReplacementModel(model, [load_sae(f"sve:shapes-vit/blocks.{i}.hook_resid_post") for i in range(6)])
    x = model.preprocess(make_shapes(1, seed=0).tensors()[0])
    graph = rrm.attribute(x)
    assert graph.n_nodes > 5000 and graph.adjacency._nnz() > 1_000_000
    path = render_graph_html(graph, tmp_path / "graph.html", rrm, x, max_edges_per_node=40)
    data = page_data(path)
    assert len(data["nodes"]) == graph.n_nodes and len(data["links"]) <= 2 * 40 * graph.n_nodes
    target = next(n["id"] for n in data["nodes"] if n["k"] == "target")
    feature = max((n for n in data["nodes"] if n["k"] == "feature"), key=lambda n: n["i"])["id"]
    with sync_playwright() as p:
        browser, page, errors = _open(p, path)
        assert page.evaluate("sveViewer.visibleCount()") == graph.n_nodes
        for nid in (feature, target):
            _click(page, nid)
            assert page.evaluate("document.getElementById('node-id').textContent") == nid
            j = next(k for k, n in enumerate(data["nodes"]) if n["id"] == nid)
            drawn = page.evaluate(
                "[...document.querySelectorAll('path.edge')].map(e => [e.dataset.source, e.dataset.target])"
            )
            assert all(nid in pair for pair in drawn)
            assert 0 < len(drawn) == sum(j in (e[0], e[1]) for e in data["links"])
        browser.close()
    assert errors == []
    assert torch.tensor([n["i"] for n in data["nodes"]]).isfinite().all()


@pytest.mark.browser
def test_viewer_fills_zooms_pans_and_navigates_by_keyboard(tmp_path):
    import warnings

    from playwright.sync_api import sync_playwright

    rrm = rrm_for("timm_cls")
    x = images(1).double()
    graph = rrm.attribute(x).prune(node_threshold=0.8, edge_threshold=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rendering (aggregated cards included) warns about nothing
        path = render_graph_html(graph, tmp_path / "graph.html", rrm, x, aggregated=rrm.attribute_aggregated(x))
    data = page_data(path)
    assert all(n["q"] is not None for n in data["nodes"])  # one influence figure: the cumulative share
    p = data["target_probs"][0]
    assert p == pytest.approx(float(graph.target_probs[0])) and f"(p={p:.3f})" in path.read_text()
    with sync_playwright() as pw:
        browser, page, errors = _open(pw, path)
        x0, y0, x1, y1, w, h = page.evaluate("sveViewer.extent()")
        assert max((x1 - x0) / w, (y1 - y0) / h) > 0.9  # square cells: the graph fills the plot's limiting side
        # the smallest node is still drawn at >= 3 px and picked from 7 px away
        assert min(page.evaluate("sveViewer.nodes.map(n => Math.max(n.r, 3))")) >= 3
        # wheel zooms about the cursor: the node under it stays put; fit resets
        feats = sorted((n for n in data["nodes"] if n["k"] == "feature"), key=lambda n: -n["i"])
        fid = feats[0]["id"]
        sx, sy = page.evaluate(f"sveViewer.screenPos('{fid}')")
        page.mouse.move(sx, sy)
        page.mouse.wheel(0, -400)
        assert page.evaluate("sveViewer.view().k") > 1.5
        zx, zy = page.evaluate(f"sveViewer.screenPos('{fid}')")
        assert abs(zx - sx) < 2 and abs(zy - sy) < 2
        # drag pans (and is not a click)
        page.mouse.move(sx + 40, sy + 40)
        page.mouse.down()
        page.mouse.move(sx + 140, sy + 90, steps=5)
        page.mouse.up()
        v = page.evaluate("sveViewer.view()")
        assert page.evaluate("sveViewer.selectedId()") is None and v["x"] != 0
        page.click("#fit")
        assert page.evaluate("sveViewer.view()")["k"] == 1
        # hover over a cell lists its nodes; the tooltip gives the cumulative share, not the raw value
        _click(page, fid)
        page.mouse.move(*page.evaluate(f"sveViewer.screenPos('{fid}')"))
        tip = page.evaluate("document.getElementById('tip').textContent")
        assert "cumulative share" in tip and "raw" not in tip
        panel = page.evaluate("document.getElementById('info').textContent")
        assert f"influence {feats[0]['q']:.3f} (cumulative share)" in panel and "raw influence" in panel
        assert "from its min" in page.evaluate("document.getElementById('range').textContent")
        _keyboard_and_cards(page, data, fid)
        browser.close()
    assert errors == []


def _keyboard_and_cards(page, data, fid):
    """Left = strongest input, down = the next one, right = strongest output; a card leads to its nodes."""
    ins = sorted((e for e in data["links"] if data["nodes"][e[1]]["id"] == fid), key=lambda e: -abs(e[2]))
    page.keyboard.press("ArrowLeft")
    assert page.evaluate("sveViewer.selectedId()") == data["nodes"][ins[0][0]]["id"]
    if len(ins) > 1:
        page.keyboard.press("ArrowDown")
        assert page.evaluate("sveViewer.selectedId()") == data["nodes"][ins[1][0]]["id"]
    _click(page, fid)
    outs = sorted((e for e in data["links"] if data["nodes"][e[0]]["id"] == fid), key=lambda e: -abs(e[2]))
    page.keyboard.press("ArrowRight")
    assert page.evaluate("sveViewer.selectedId()") == data["nodes"][outs[0][1]]["id"]
    page.keyboard.press("Escape")
    assert page.evaluate("sveViewer.selectedId()") is None
    # an aggregated card leads to its feature's nodes
    card = next(
        c
        for c in data["aggregated"]["cards"]
        if any(n["k"] == "feature" and n["l"] == c["layer"] and n["f"] == c["feature"] for n in data["nodes"])
    )
    page.click("#tab-agg")
    page.click(f"#agg g.card[data-layer='{card['layer']}'][data-feature='{card['feature']}']")
    mine = {
        n["id"] for n in data["nodes"] if n["k"] == "feature" and (n["l"], n["f"]) == (card["layer"], card["feature"])
    }
    assert set(page.evaluate("sveViewer.highlighted()")) == mine
    assert page.evaluate("sveViewer.selectedId()") in mine
    assert page.evaluate("document.getElementById('plot').style.display") == "block"
