"""Screenshots of the demo's attribution graph in our viewer and in circuit-tracer 0.5.0's own frontend.

    python examples/screenshots.py            # writes docs/img/viewer.png, viewer-selected.png,
                                              # circuit-tracer.png, circuit-tracer-feature.png
    python examples/screenshots.py --out DIR  # elsewhere (the browser test does this)

The graph is the demo's (``sve:shapes-vit``, its shipped SAEs, shapes image 0 of seed 1, pruned at
0.8/0.98), written by ``demo.circuit_stage`` and ``demo.viewer_stage``. Pages are drawn by Debian's
``/usr/bin/chromium`` through Playwright at 1600x900. circuit-tracer's frontend is served by its own
``local_server``; the six scripts it loads from CDNs come from ``tests/frontend`` (``npm ci && npm run
build`` there), as in ``tests/integration/test_circuit_tracer_frontend.py``. ``measurements.json``
beside the screenshots records what the pages reported (the graph's extent, the clicked nodes).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRONTEND = ROOT / "tests" / "frontend"
_LIB = "https://transformer-circuits.pub/2025/attribution-graphs/static_js/lib/"
CDN = {
    _LIB + "d3.js": FRONTEND / "dist" / "d3-jetpack.js",
    _LIB + "jetpack_2024-07-20.js": FRONTEND / "jetpack-2024-shim.js",
    _LIB + "npy_v0.js": None,
    _LIB + "hotserver-client-ws.js": None,
    "https://unpkg.com/dagre@0.8.5/dist/dagre.min.js": FRONTEND / "node_modules" / "dagre" / "dist" / "dagre.min.js",
    "https://unpkg.com/pako@2.1.0/dist/pako.min.js": FRONTEND / "node_modules" / "pako" / "dist" / "pako.min.js",
}
VIEWPORT = {"width": 1600, "height": 900}
BOX = "(() => { const b = %s.getBoundingClientRect(); return [b.x, b.y, b.width, b.height] })()"


def demo_graph(out: Path) -> Path:
    """The demo's graph: circuit-tracer files in ``out/circuit-tracer``, the viewer at ``out/graph.html``."""
    import torch

    from sae_vision_ext.data.shapes import make_shapes
    from sae_vision_ext.demo import circuit_stage, viewer_stage
    from sae_vision_ext.models import HookedViT
    from sae_vision_ext.saes.loading import load_sae

    torch.manual_seed(0)
    model = HookedViT.from_pretrained("sve:shapes-vit")
    saes = [load_sae(f"sve:shapes-vit/blocks.{i}.hook_resid_post") for i in range(model.cfg.n_layers)]
    images, labels = make_shapes(512, seed=1).tensors()
    pixels = model.preprocess(images)
    with contextlib.redirect_stdout(io.StringIO()):
        rrm, pruned = circuit_stage(model, saes, pixels, labels, str(out))
        viewer_stage(rrm, pruned, pixels, labels, str(out))
    return out / "graph.html"


def _browser(p):  # Debian's chromium, as tests/helpers.py launch_chromium
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise SystemExit("chromium is not installed: apt-get install -y chromium")
    return p.chromium.launch(executable_path=path, args=["--headless", "--no-sandbox", "--disable-gpu"])


def shoot_viewer(p, html: Path, img_dir: Path) -> dict:
    """The viewer as opened, then with the strongest feature clicked at the pixel it is drawn at."""
    browser = _browser(p)
    page = browser.new_page(viewport=VIEWPORT)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(html.as_uri())
    page.wait_for_function("window.sveViewer !== undefined")
    page.wait_for_timeout(300)  # the image under the grids
    plot = page.evaluate(BOX % "document.getElementById('plot')")
    page.screenshot(path=str(img_dir / "viewer.png"))
    extent = page.evaluate("sveViewer.extent()")
    fid = page.evaluate("sveViewer.nodes.filter(n => n.k == 'feature').sort((a, b) => b.i - a.i)[0].id")
    x, y = page.evaluate(f"sveViewer.screenPos('{fid}')")
    page.mouse.click(x, y)
    page.wait_for_timeout(300)
    page.screenshot(path=str(img_dir / "viewer-selected.png"))
    selected = page.evaluate("sveViewer.selectedId()")
    browser.close()
    return {"plot": plot, "extent": extent, "feature": fid, "click": [x, y], "selected": selected, "errors": errors}


def shoot_frontend(p, ct_dir: Path, slug: str, img_dir: Path) -> dict:
    """circuit-tracer's frontend on our export, then with a feature clicked at its drawn position."""
    from circuit_tracer.frontend.local_server import serve

    missing = [str(f) for f in CDN.values() if f is not None and not f.exists()]
    if missing:
        raise SystemExit(f"missing {missing}: run `npm ci && npm run build` in tests/frontend")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = serve(data_dir=str(ct_dir), port=port)
    outside: list[str] = []

    def route(r):
        url = r.request.url
        if url.startswith("http://127.0.0.1"):
            return r.continue_()
        if url in CDN:
            body = CDN[url].read_text() if CDN[url] is not None else ""
            return r.fulfill(status=200, content_type="application/javascript", body=body)
        outside.append(url)
        return r.abort()

    try:
        browser = _browser(p)
        page = browser.new_page(viewport=VIEWPORT)
        page.route("**/*", route)
        page.goto(f"http://127.0.0.1:{port}/index.html?slug={slug}")
        page.wait_for_function("document.querySelectorAll('.link-graph text.node').length > 0", timeout=30000)
        page.wait_for_timeout(500)
        page.screenshot(path=str(img_dir / "circuit-tracer.png"))
        graph_box = page.evaluate(BOX % "document.querySelector('.link-graph')")
        shown = page.evaluate("document.querySelectorAll('.link-graph text.node').length")
        node = page.evaluate(
            "(() => { const n = [...document.querySelectorAll('.link-graph text.node')]"
            ".find(e => e.__data__.feature_type == 'cross layer transcoder'); const b = n.getBoundingClientRect();"
            " return [n.__data__.nodeId, b.x + b.width / 2, b.y + b.height / 2] })()"
        )
        page.mouse.click(node[1], node[2])
        page.wait_for_function(
            "document.querySelectorAll('.feature-example-list .ctx-container').length > 0", timeout=15000
        )
        page.wait_for_timeout(500)
        title = page.evaluate("document.querySelector('.feature-detail .feature-title').textContent")
        link = page.evaluate("document.querySelector('.feature-detail .feature-title a').getAttribute('href')")
        page.screenshot(path=str(img_dir / "circuit-tracer-feature.png"))
        browser.close()
    finally:
        server.stop()
    return {
        "graph_box": graph_box,
        "shown": shown,
        "feature": node[0],
        "click": node[1:],
        "title": title,
        "link": link,
        "outside": outside,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "img"), help="folder for the PNGs (default docs/img)")
    parser.add_argument(
        "--work", default=None, help="folder for the demo's graph files (default <out>/../_demo_graph, removed after)"
    )
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    img_dir = Path(args.out)
    img_dir.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else img_dir.parent / "_demo_graph"
    html = demo_graph(work)
    with sync_playwright() as p:
        found = {
            "viewer": shoot_viewer(p, html, img_dir),
            "circuit-tracer": shoot_frontend(p, work / "circuit-tracer", "shapes-demo", img_dir),
        }
    (img_dir / "measurements.json").write_text(json.dumps(found, indent=1))
    if not args.work:
        shutil.rmtree(work)
    print(json.dumps(found, indent=1))
    print(f"screenshots in {img_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
