"""Our exports checked with circuit-tracer 0.5.0's own code: its pydantic models, its pruning and
its ``create_graph_files`` node selection (installed with ``pip install --no-deps circuit-tracer==0.5.0``,
the README's test set-up: its model dependencies conflict with ours and are not needed here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import FAMILIES, _circuit_tracer, _Tokenizer, images, rrm_for, to_circuit_tracer_graph

from sae_vision_ext.circuits.graph.nodes import cantor_unpair, node_ids


@pytest.fixture(scope="module")
def traced():
    rrm = rrm_for("timm_cls")
    return rrm, rrm.attribute(images(1).double(), batch_size=16)


@pytest.mark.parametrize("thresholds", [(0.8, 0.98), (0.5, 0.9), (0.95, 0.99)])
def test_pruning_and_exported_nodes_equal_circuit_tracers(traced, thresholds, tmp_path):
    _, _, _, prune_graph, cgf, _ = _circuit_tracer()
    _, g = traced
    ct, perm, sae_layers = to_circuit_tracer_graph(g)
    torch.set_default_dtype(torch.float64)  # circuit-tracer allocates its weights in the default dtype
    try:
        node_mask, edge_mask, cumulative = prune_graph(ct, *thresholds)
    finally:
        torch.set_default_dtype(torch.float32)
    ours = g.prune(*thresholds)
    assert torch.equal(ours.node_mask[perm], node_mask)
    torch.testing.assert_close(ours.cumulative_influence[perm], cumulative)
    a = g.adjacency.coalesce()
    ours_edges = torch.zeros_like(g.dense(), dtype=torch.bool)
    ours_edges[a.indices()[0][ours.edge_mask], a.indices()[1][ours.edge_mask]] = True
    assert torch.equal(
        ours_edges[perm][:, perm] & node_mask[:, None] & node_mask[None],
        edge_mask & node_mask[:, None] & node_mask[None],
    )
    # circuit-tracer's own node and link selection for its files
    nodes = cgf.create_nodes(ct, node_mask, _Tokenizer(), cumulative)
    used_nodes, used_edges = cgf.create_used_nodes_and_edges(ct, nodes, edge_mask)
    exported = ours.to_json(tmp_path / "g.json")
    assert len(exported["nodes"]) == len(used_nodes) and len(exported["links"]) == len(used_edges)
    ours_ids = node_ids(g)
    kinds = {
        "cross layer transcoder": "feature",
        "mlp reconstruction error": "error",
        "embedding": "input",
        "logit": "target",
    }
    theirs = set()
    for n in used_nodes:  # circuit-tracer's nodes, named by our node index
        kind = kinds[n.feature_type]
        if kind == "feature":
            layer, f = cantor_unpair(n.feature)
            key = ("feature", sae_layers[layer], n.ctx_idx, f)
        elif kind == "error":
            key = ("error", sae_layers[int(n.layer)], n.ctx_idx, -1)
        elif kind == "input":
            key = ("input", -1, n.ctx_idx, -1)
        else:
            key = ("target", -1, -1, n.feature)
        theirs.add(key)
    mine = set()
    for n in exported["nodes"]:
        i = ours_ids.index(n["node_id"])
        kind = g.node_kind[i]
        if kind == "target":
            mine.add(("target", -1, -1, n["feature"]))
        else:
            mine.add((kind, int(g.node_layer[i]), int(g.node_pos[i]), int(g.node_feature[i])))
    assert mine == theirs


def _exports(tmp_path: Path):
    """Exports of every adapter family, an MLP-leaf graph and a budgeted graph."""
    for variant in FAMILIES:
        rrm = rrm_for(variant)
        x = images(1).double()
        yield variant, rrm, rrm.attribute(x, batch_size=32).prune()
    rrm = rrm_for("timm_cls")
    yield "mlp_leaves", rrm, rrm.attribute(images(1).double(), mlp_leaves=True).prune()
    yield "budget", rrm, rrm.attribute(images(1).double(), max_feature_nodes=20).prune()


def test_every_export_validates_against_circuit_tracers_models(tmp_path):
    graph_models, feature_models, *_ = _circuit_tracer()
    from sae_vision_ext.vis.stats import collect_feature_stats

    for name, rrm, g in _exports(tmp_path):
        ref = images(4, seed=3).double()
        stats = collect_feature_stats(rrm.model, rrm.saes, ref, top_k=3, progress=False)
        exported_ids = g.to_json(tmp_path / name / "probe.json", features=False)["nodes"]
        group = [
            ["a group", *[n["node_id"] for n in exported_ids if n["feature_type"] == "cross layer transcoder"][:2]]
        ]
        out = g.to_json(tmp_path / name / f"{name}.json", rrm=rrm, stats=stats, stats_pixels=ref, supernodes=group)
        assert out["qParams"]["supernodes"] == group
        model = graph_models.Model.model_validate(json.loads((tmp_path / name / f"{name}.json").read_text()))
        assert len(model.nodes) == len(out["nodes"]) > 0
        ids = [n.node_id for n in model.nodes]
        assert len(set(ids)) == len(ids), name
        assert all(link["source"] in ids and link["target"] in ids for link in model.links)
        meta = json.loads((tmp_path / name / "graph-metadata.json").read_text())
        assert [m["slug"] for m in meta["graphs"]] == ["probe", name]
        assert model.metadata.node_threshold == 0.8 and model.metadata.scan == "./data/features"
        target = next(n for n in model.nodes if n.is_target_logit)
        p = float(target.clerp.split("(p=")[1].split(")")[0])  # as circuit-tracer's frontend parses it
        assert abs(p - target.token_prob) < 5e-4 and 0 < p <= 1
        cum = [n.influence for n in model.nodes if n.feature_type != "logit"]
        assert all(0 < c <= 1 + 1e-9 for c in cum)
        codes = {n.feature for n in model.nodes if n.feature_type == "cross layer transcoder"}
        files = {int(f.stem) for f in (tmp_path / name / "features").glob("*.json")}
        assert files == codes, name
        for code in codes:
            rec = feature_models.Model.model_validate(
                json.loads((tmp_path / name / "features" / f"{code}.json").read_text())
            )
            layer, feat = cantor_unpair(code)
            assert rec.transcoder_id == f"blocks.{layer}.hook_resid_post" and rec.index == code
            traced_row = rec.examples_quantiles[0].examples[0]
            # the traced image's row holds the feature's activation at every position where it is a node
            here = [
                (int(g.node_pos[i]), float(g.activation[i]))
                for i, k in enumerate(g.node_kind)
                if k == "feature" and int(g.node_layer[i]) == layer and int(g.node_feature[i]) == feat
            ]
            assert here and all(abs(traced_row.tokens_acts_list[p] - a) < 1e-9 for p, a in here)
            tops = rec.examples_quantiles[1].examples if len(rec.examples_quantiles) > 1 else []
            hook = f"blocks.{layer}.hook_resid_post"
            expected = stats[hook].top_examples(feat)[:8]
            assert len(tops) == len(expected)
            for row, (act, _, tok) in zip(tops, expected, strict=True):
                assert abs(max(row.tokens_acts_list) - act) < 1e-5 and row.train_token_ind == tok


def test_supernodes_must_name_exported_nodes(traced, tmp_path):
    _, g = traced
    with pytest.raises(ValueError, match="not in the exported graph"):
        g.prune().to_json(tmp_path / "g.json", supernodes=[["x", "no_such_node"]])
