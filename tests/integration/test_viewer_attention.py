"""Attention in the export and the viewer (``circuits/engine/attention_report.py``): ``<slug>.attention.json``
beside circuit-tracer's files, whose head parts sum to the exported edges, and in Chromium a clicked edge that
lists its heads (their sum read from the page equals the exported edge weight) and an attention entry that lists
its query x key feature pairs; the token-aggregated tab drawn from supernodes."""

from __future__ import annotations

import json
import re

import pytest
from helpers import _circuit_tracer, images, launch_chromium, rrm_for

from sae_vision_ext.circuits.engine.attention_report import AttentionExport, attention_report
from sae_vision_ext.circuits.graph.supernodes import exported_supernodes
from sae_vision_ext.circuits.graph.viewer import render_graph_html


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("att")
    rrm = rrm_for("timm_cls")
    x = images(1).double()
    pruned = rrm.attribute(x, batch_size=16).prune(0.95, 0.99)  # features at several positions
    report = attention_report(rrm, x, pruned, AttentionExport(max_edges=12, max_entries=6, pairs_per_entry=5))
    groups = exported_supernodes(pruned)
    graph = pruned.to_json(out / "g.json", features=False, supernodes=groups, attention=report)
    return out, rrm, x, pruned, graph, json.loads((out / "g.attention.json").read_text())


def test_the_attention_file_sums_to_the_exported_edges(exported):
    _, rrm, _, _, graph, att = exported
    assert att["schema"] == "sae_vision_ext.attention" and att["version"] == 1 and att["graph"] == "g.json"
    weights = {(e["source"], e["target"]): e["weight"] for e in graph["links"]}
    assert len(att["edges"]) == 12
    order = [abs(e["weight"]) for e in att["edges"]]
    assert order == sorted(order, reverse=True)
    n_heads = rrm.model.cfg.n_heads
    for e in att["edges"]:
        w = weights[(e["source"], e["target"])]  # an exported link, with the exported weight
        assert e["weight"] == w
        s_layer = int(e["source"].split("_")[0])
        t_layer = int(e["target"].split("_")[0])
        crossed = list(range(s_layer + 1, min(t_layer, rrm.model.cfg.n_layers - 1) + 1))
        assert [b["block"] for b in e["blocks"]] == crossed  # every block it crosses
        for b in e["blocks"]:
            assert len(b["heads"]) == n_heads
            assert abs(b["direct"] + sum(b["heads"]) - b["edge"]) < 1e-9 * max(1.0, abs(w))
            assert abs(b["edge"] - w) < 1e-9 * max(1.0, abs(w))  # the frozen intervention is the graph's edge
    assert 0 < len(att["entries"]) <= 6
    for q in att["entries"]:
        assert len(q["pairs"]) == min(5, q["n_query_terms"] * q["n_key_terms"])
        assert abs(sum(p[2] for p in q["pairs"]) + q["rest"] - q["score"]) < 1e-9 * max(1.0, abs(q["score"]))
        # an entry is the (block, head, query = target position, key = source position) of one of its edges
        src, dst = att["edges"][q["edges"][0]]["source"], att["edges"][q["edges"][0]]["target"]
        assert (int(dst.split("_")[2]), int(src.split("_")[2])) == (q["query"], q["key"])
    assert att["skipped"] == []


def test_exported_supernodes_load_in_circuit_tracers_models(exported):
    out, _, _, _, graph, _ = exported
    graph_models, *_ = _circuit_tracer()
    model = graph_models.Model.model_validate(json.loads((out / "g.json").read_text()))
    groups = model.qParams.supernodes
    assert groups and groups == graph["qParams"]["supernodes"]
    ids = {n.node_id for n in model.nodes}
    members = [i for g in groups for i in g[1:]]
    assert len(members) == len(set(members)) and set(members) <= ids  # disjoint, all exported
    for name, *nodes in groups:  # by feature: one (layer, feature) at two or more positions
        assert len(nodes) >= 2 and len({tuple(n.split("_")[:2]) for n in nodes}) == 1
        assert name == "L{}/{}".format(*nodes[0].split("_")[:2])


def _data(path):
    return json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', path.read_text(), re.S)[1])


@pytest.mark.browser
def test_a_clicked_edge_lists_its_heads_and_an_entry_its_feature_pairs(exported, tmp_path):
    from playwright.sync_api import sync_playwright

    _, rrm, x, pruned, graph, att = exported
    path = render_graph_html(
        pruned, tmp_path / "graph.html", rrm, x, attention=att, supernodes=graph["qParams"]["supernodes"]
    )
    data = _data(path)
    weights = {(e["source"], e["target"]): e["weight"] for e in graph["links"]}
    # an edge with an entry (one block crossed) first: the test then opens that entry too
    with_entry = {i for q in att["entries"] for i in q["edges"]}
    edge = att["edges"][min(with_entry)]
    entry = next(q for q in att["entries"] if min(with_entry) in q["edges"])
    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1600, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(path.as_uri())
        page.wait_for_function("window.sveViewer !== undefined")
        page.mouse.click(*page.evaluate(f"sveViewer.screenPos('{edge['target']}')"))
        assert page.evaluate("sveViewer.selectedId()") == edge["target"]
        point = page.evaluate(f"sveViewer.edgePoint('{edge['source']}', '{edge['target']}')")
        assert point is not None
        page.mouse.click(*point)  # the drawn edge itself, away from every node
        page.wait_for_selector("#edge-id")
        rows = page.evaluate(
            "[...document.querySelectorAll('table.heads tr.head')].map(r => [+r.dataset.head, +r.dataset.value])"
        )
        direct = page.evaluate("+document.querySelector('table.heads tr.direct').dataset.value")
        shown_sum = page.evaluate("+document.querySelector('table.heads .sum-value').dataset.value")
        w = weights[(edge["source"], edge["target"])]
        assert sorted(h for h, _ in rows) == list(range(rrm.model.cfg.n_heads))
        assert abs(sum(v for _, v in rows) + direct - w) < 1e-9 * max(1.0, abs(w))
        assert abs(shown_sum - w) < 1e-9 * max(1.0, abs(w))
        text = page.evaluate("document.querySelector('table.heads .sum-value').textContent")
        assert abs(float(text) - w) <= 5e-3 * abs(w)  # shown to 3 significant digits
        # the head of the entry is marked and opens its query x key pairs
        page.click(f"table.heads tr.qk[data-head='{entry['head']}']")
        page.wait_for_selector("#qk-title")
        pairs = page.evaluate("[...document.querySelectorAll('table.pairs tr.pair')].map(r => +r.dataset.value)")
        rest = page.evaluate("+document.querySelector('table.pairs tr.rest').dataset.value")
        assert len(pairs) == len(entry["pairs"]) and abs(sum(pairs) + rest - entry["score"]) < 1e-9 * max(
            1, abs(entry["score"])
        )
        assert f"{entry['score']:.4g}" in page.evaluate("document.getElementById('qk-score').textContent")
        # back to the node: its lists offer "heads" beside the edges that have them
        page.click("#edge-back")
        assert page.evaluate("sveViewer.selectedId()") == edge["target"]
        assert page.evaluate("document.querySelectorAll('#info button.heads').length") >= 1
        # the aggregated tab from the supernodes (no AggregatedGraph given): cards lead to their members
        assert data["aggregated"]["source"] == "supernodes"
        page.click("#tab-agg")
        card = data["aggregated"]["cards"][0]
        page.click("#agg g.card >> nth=0")
        assert set(page.evaluate("sveViewer.highlighted()")) == set(card["members"])
        browser.close()
    assert errors == []
