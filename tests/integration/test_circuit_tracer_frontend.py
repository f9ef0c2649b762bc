"""Our export opened by circuit-tracer 0.5.0's own frontend, served by its own ``local_server``, in
headless Chromium.

The frontend's pages load six scripts from CDNs; this machine (and CI) has no network, so the test
serves them from npm packages installed by the README's test command (``npm ci --prefix
tests/frontend``): ``d3.js`` is d3-jetpack 2.3.0's ``d3v7+jetpack.js`` bundle (d3 v7 with the jetpack
helpers), dagre 0.8.5 and pako 2.1.0 are the same npm releases unpkg serves. Three are not on npm:
``jetpack_2024-07-20.js`` (its API is in the d3-jetpack bundle but ``d3.clamp``, which
``tests/frontend/jetpack-shim.js`` adds), ``npy_v0.js`` (reads ``.npy`` files, which graphs do not
use) and ``hotserver-client-ws.js`` (live reload for its authors' dev server): those two are empty.
Any other request leaving 127.0.0.1 fails the test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import _circuit_tracer, _Tokenizer, free_port, images, launch_chromium, rrm_for, to_circuit_tracer_graph

FRONTEND = Path(__file__).parents[1] / "frontend"
MODULES = FRONTEND / "node_modules"
CDN = {
    "https://transformer-circuits.pub/2025/attribution-graphs/static_js/lib/d3.js": FRONTEND / "dist" / "d3-jetpack.js",
    "https://transformer-circuits.pub/2025/attribution-graphs/static_js/lib/jetpack_2024-07-20.js": FRONTEND
    / "jetpack-2024-shim.js",
    "https://transformer-circuits.pub/2025/attribution-graphs/static_js/lib/npy_v0.js": None,
    "https://transformer-circuits.pub/2025/attribution-graphs/static_js/lib/hotserver-client-ws.js": None,
    "https://unpkg.com/dagre@0.8.5/dist/dagre.min.js": MODULES / "dagre" / "dist" / "dagre.min.js",
    "https://unpkg.com/pako@2.1.0/dist/pako.min.js": MODULES / "pako" / "dist" / "pako.min.js",
}


def _route(page, outside: list[str]) -> None:
    missing = [str(p) for p in CDN.values() if p is not None and not p.exists()]
    if missing:
        raise AssertionError(f"npm packages missing ({missing}); run: npm ci --prefix tests/frontend")

    def handle(route):
        url = route.request.url
        if url.startswith("http://127.0.0.1"):
            return route.continue_()
        if url in CDN:
            body = CDN[url].read_text() if CDN[url] is not None else ""
            return route.fulfill(status=200, content_type="application/javascript", body=body)
        outside.append(url)
        return route.abort()

    page.route("**/*", handle)


@pytest.mark.browser
def test_circuit_tracers_frontend_renders_our_export(tmp_path):
    from playwright.sync_api import sync_playwright

    _, _, _, _, cgf, _ = _circuit_tracer()
    from circuit_tracer.frontend.local_server import serve

    from sae_vision_ext.vis.stats import collect_feature_stats

    rrm = rrm_for("timm_cls")
    g = rrm.attribute(images(1).double(), batch_size=16)
    pruned = g.prune()
    ref = images(4, seed=3).double()
    stats = collect_feature_stats(rrm.model, rrm.saes, ref, top_k=3, progress=False)
    out = pruned.to_json(tmp_path / "vit.json", rrm=rrm, stats=stats, stats_pixels=ref)
    # circuit-tracer's own selection for the same graph and thresholds
    import torch
    from circuit_tracer.graph import prune_graph

    ct, _, _ = to_circuit_tracer_graph(g)
    torch.set_default_dtype(torch.float64)
    try:
        node_mask, edge_mask, cumulative = prune_graph(ct, 0.8, 0.98)
    finally:
        torch.set_default_dtype(torch.float32)
    used_nodes, used_edges = cgf.create_used_nodes_and_edges(
        ct, cgf.create_nodes(ct, node_mask, _Tokenizer(), cumulative), edge_mask
    )
    assert len(out["nodes"]) == len(used_nodes)
    # circuit-tracer's OWN export of the same graph, served beside ours: the frontend must show as many
    # nodes for ours as for its own (it hides, for both, a node whose share is just past the threshold)
    own = cgf.build_model(ct, used_nodes, used_edges, "ct-own", "sae_vision_ext", 0.8, _Tokenizer())
    (tmp_path / "ct-own.json").write_text(own.model_dump_json())
    cgf.add_graph_metadata(own.metadata.model_dump(), str(tmp_path))

    port = free_port()
    server = serve(data_dir=str(tmp_path), port=port)
    try:
        with sync_playwright() as p:
            browser = launch_chromium(p)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            errors: list[str] = []
            outside: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            _route(page, outside)
            count = "document.querySelectorAll('.link-graph text.node').length"
            page.goto(f"http://127.0.0.1:{port}/index.html?slug=ct-own")
            page.wait_for_function(f"{count} > 0", timeout=30000)
            shown_own = page.evaluate(count)
            page.goto(f"http://127.0.0.1:{port}/index.html?slug=vit")
            page.wait_for_function(f"{count} > 0", timeout=30000)
            shown = page.evaluate(count)
            assert shown == shown_own and shown >= len(used_nodes) - 1
            _hover_thinned_patches(page, out)
            # click a feature: its panel reads features/<code>.json from the served folder, not the Hub
            feature = next(n for n in out["nodes"] if n["feature_type"] == "cross layer transcoder")
            box = page.evaluate(
                "id => { const n = [...document.querySelectorAll('.link-graph text.node')]"
                ".find(e => e.__data__.nodeId === id); const b = n.getBoundingClientRect();"
                " return [b.x + b.width / 2, b.y + b.height / 2] }",
                feature["node_id"],
            )
            page.mouse.click(*box)
            page.wait_for_function(
                "document.querySelectorAll('.feature-example-list .ctx-container').length > 0", timeout=15000
            )
            title = page.evaluate("document.querySelector('.feature-detail .feature-title').textContent")
            layer, feat = feature["node_id"].split("_")[:2]
            assert f"L{layer}/{feat}" in title
            browser.close()
    finally:
        server.stop()
    assert outside == []
    assert errors == []


def _hover_thinned_patches(page, out: dict) -> None:
    """Nodes at a patch whose axis label is thinned to "·" still read their full ``p(r,c)`` on hover (the
    frontend's tooltip shows the node's clerp). Embedding nodes are the exception the frontend imposes: it
    rebuilds their clerp from ``prompt_tokens`` (``Emb: “·”``), the same string as the axis label."""
    tokens = out["metadata"]["prompt_tokens"]
    by_id = {n["node_id"]: n for n in out["nodes"]}
    drawn = page.evaluate("[...document.querySelectorAll('.link-graph text.node')].map(e => e.__data__.nodeId)")
    hovered = 0
    for kind in ("cross layer transcoder", "mlp reconstruction error"):
        node = next(
            (by_id[i] for i in drawn if by_id[i]["feature_type"] == kind and tokens[by_id[i]["ctx_idx"]] == "·"), None
        )
        if node is None:
            continue
        x, y = page.evaluate(
            "id => { const n = [...document.querySelectorAll('.link-graph text.node')]"
            ".find(e => e.__data__.nodeId === id); const b = n.getBoundingClientRect();"
            " return [b.x + b.width / 2, b.y + b.height / 2] }",
            node["node_id"],
        )
        page.mouse.move(x - 40, y - 40)
        page.mouse.move(x, y)
        page.wait_for_function("!document.querySelector('.tooltip').classList.contains('tooltip-hidden')")
        tip = page.evaluate("document.querySelector('.tooltip').textContent")
        r, c = divmod(node["ctx_idx"] - 1, 4)  # timm_cls: CLS, then a 4 x 4 patch grid
        assert tip == node["clerp"] and tip.endswith(f"p({r},{c})"), (tip, node["clerp"])
        hovered += 1
    assert hovered == 2
    emb = next(n for n in out["nodes"] if n["feature_type"] == "embedding" and tokens[n["ctx_idx"]] == "·")
    text = page.evaluate(
        "id => [...document.querySelectorAll('.link-graph text.node')].find(e => e.__data__.nodeId === id)"
        ".__data__.ppClerp",
        emb["node_id"],
    )
    assert text == 'Emb: “·"' and emb["clerp"].startswith("Emb: p(")  # ours is full; the frontend's is not
