"""The committed screenshot command (``examples/screenshots.py``) on the demo's graph, in Chromium:
our viewer fills its canvas and a node is picked where it is drawn; circuit-tracer's frontend draws the
same export over most of its graph area and opens a feature clicked at its drawn position, with the
thumbnail linked from its title."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).parents[2]
FEATURE_GREEN = np.array([0x3F, 0x9A, 0x3A])


def _ink_box(png: Path, box: list[float]) -> float:
    """Share of ``box`` (x, y, w, h, CSS px = image px at dpr 1) covered by the bounding box of its non-white pixels."""
    x, y, w, h = (round(v) for v in box)
    a = np.asarray(Image.open(png).convert("RGB"))[y : y + h, x : x + w].astype(int)
    ink = (np.abs(a - 255).sum(-1) > 30).nonzero()
    return (np.ptp(ink[0]) + 1) * (np.ptp(ink[1]) + 1) / (w * h)


@pytest.mark.browser
@pytest.mark.slow
def test_screenshots_of_the_demo_graph(tmp_path):
    out = tmp_path / "img"
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "screenshots.py"), "--out", str(out), "--work", str(tmp_path / "w")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    m = json.loads((out / "measurements.json").read_text())
    v, ct = m["viewer"], m["circuit-tracer"]
    assert v["errors"] == [] and ct["outside"] == []
    # our viewer: the drawn graph spans most of the canvas (it drew in ~23% of it before)
    assert _ink_box(out / "viewer.png", v["plot"]) > 0.75
    x0, y0, x1, y1, w, h = v["extent"]
    assert (x1 - x0) * (y1 - y0) / (w * h) > 0.75
    # the strongest feature is drawn (feature green) where the page says, and a click there selects it
    px, py = (round(c) for c in v["click"])
    shot = np.asarray(Image.open(out / "viewer.png").convert("RGB")).astype(int)
    assert np.abs(shot[py - 1 : py + 2, px - 1 : px + 2] - FEATURE_GREEN).sum(-1).min() < 60
    assert v["selected"] == v["feature"]
    sel = np.asarray(Image.open(out / "viewer-selected.png").convert("RGB")).astype(int)
    assert (np.abs(sel - shot).sum(-1) > 30).mean() > 0.01  # edges and the panel drawn after the click
    # circuit-tracer's frontend: the graph over most of its area, the clicked feature's panel with stats
    assert _ink_box(out / "circuit-tracer.png", ct["graph_box"]) > 0.6
    layer, feat = ct["feature"].split("_")[:2]
    assert f"L{layer}/{feat}" in ct["title"] and "pct" in ct["title"] and "Freq: 0.000%" not in ct["title"]
    assert ct["link"].startswith("./data/features/") and ct["link"].endswith(".png")
    thumb = tmp_path / "w" / "circuit-tracer" / "features" / Path(ct["link"]).name
    assert Image.open(thumb).size[0] > 96 * 2  # the traced image and top images
