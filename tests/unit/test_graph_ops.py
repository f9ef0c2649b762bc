"""Influence, pruning, scores, circuit-tracer JSON and the token-aggregated view."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import images, rrm_for

from sae_vision_ext.circuits.graph.graph import AttributionGraph
from sae_vision_ext.circuits.graph.nodes import cantor_pair, cantor_unpair, node_ids
from sae_vision_ext.circuits.graph.ops import influence, normalised_abs


def hand_graph() -> AttributionGraph:
    """input(0) -> feature(1) -> target(3) with weight 3 then 2; error(2) -> target with weight -1."""
    idx = torch.tensor([[1, 3, 3], [0, 1, 2]])
    vals = torch.tensor([3.0, 2.0, -1.0], dtype=torch.float64)
    adj = torch.sparse_coo_tensor(idx, vals, (4, 4), check_invariants=True).coalesce()
    g = AttributionGraph(
        node_kind=["input", "feature", "error", "target"], node_layer=torch.tensor([-1, 0, 0, 1]),
        node_pos=torch.tensor([0, 0, 0, -1]), node_feature=torch.tensor([-1, 7, -1, -1]),
        activation=torch.tensor([1.0, 1.5, 0.2, 4.0], dtype=torch.float64), adjacency=adj,
        value=torch.full((4,), float("nan"), dtype=torch.float64), constant=torch.full((4,), float("nan")),
        target_names=["t"],
    )  # fmt: skip
    g.weights = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    return g


def test_cantor_codes_round_trip_and_match_circuit_tracers_formula():
    for layer in range(40):
        for feat in (0, 1, 7, 513, 24575):
            code = cantor_pair(layer, feat)
            assert code == (layer + feat) * (layer + feat + 1) // 2 + feat and cantor_unpair(code) == (layer, feat)


def test_influence_and_scores_on_a_hand_computed_graph():
    g = hand_graph()
    infl = influence(normalised_abs(g.adjacency), g.weights)
    torch.testing.assert_close(infl, torch.tensor([2 / 3, 2 / 3, 1 / 3, 0.0], dtype=torch.float64))
    s = g.scores()
    assert abs(s["replacement"] - 2 / 3) < 1e-12  # input influence 2/3 vs error 1/3
    assert abs(s["completeness"] - 0.8) < 1e-12  # ((1 - 1/3)·1 + 1·2/3) / (1 + 2/3)
    # circuit-tracer's pruning: influence shares sorted [2/3, 2/3, 1/3, 0] / (5/3) reach 0.5 at the
    # second node, so nodes with influence >= 2/3 stay; the error (1/3) goes, inputs and targets stay
    pruned = g.prune(node_threshold=0.5)
    assert pruned.node_mask.tolist() == [True, True, False, True]
    assert sorted(pruned.cumulative_influence.tolist()) == pytest.approx([0.4, 0.8, 1.0, 1.0])
    assert pruned.edge_mask.tolist() == [True, True, False]  # the error's edge goes with it
    assert g.prune(node_threshold=0.9).node_mask.tolist() == [True, True, True, True]


@pytest.fixture(scope="module")
def traced():
    rrm = rrm_for("timm_cls")
    return rrm, rrm.attribute(images(1).double(), batch_size=16)


def test_pruning_keeps_structure_and_influence_share(traced):
    _, g = traced
    p = g.prune(node_threshold=0.8, edge_threshold=0.98)
    kinds = g.node_kind
    assert all(bool(p.node_mask[i]) for i, k in enumerate(kinds) if k in ("input", "target"))
    a = g.adjacency.coalesce()
    dst, src = a.indices()
    kept = p.edge_mask
    assert bool((p.node_mask[src[kept]] & p.node_mask[dst[kept]]).all())  # kept edges join kept nodes
    has_out = torch.zeros(g.n_nodes, dtype=torch.bool).index_fill_(0, src[kept], True)
    has_in = torch.zeros(g.n_nodes, dtype=torch.bool).index_fill_(0, dst[kept], True)
    for i, k in enumerate(kinds):
        if bool(p.node_mask[i]) and k in ("feature", "error"):
            assert bool(has_out[i]), (k, i)
        if bool(p.node_mask[i]) and k == "feature":
            assert bool(has_in[i]), i
    infl = influence(normalised_abs(g.adjacency), g.weights)
    feats = torch.tensor([k == "feature" for k in kinds])
    assert 0 < int((feats & p.node_mask).sum()) < int(feats.sum())
    assert float(infl[p.node_mask].sum() / infl.sum()) >= 0.5
    looser = g.prune(node_threshold=0.95)
    assert int(looser.node_mask.sum()) >= int(p.node_mask.sum())
    s = p.scores()
    assert 0 < s["replacement_pruned"] <= s["replacement"] <= 1 and 0 < s["completeness_pruned"] <= 1


def test_circuit_tracer_files_layout(traced, tmp_path):
    _, g = traced
    p = g.prune()
    out = p.to_json(tmp_path / "first.json")
    assert json.loads((tmp_path / "first.json").read_text()) == out
    assert set(out) == {"metadata", "qParams", "nodes", "links"}
    assert out["metadata"]["prompt_tokens"][:2] == ["CLS", "p(0,0)"] and len(out["metadata"]["prompt_tokens"]) == 17
    ids = {n["node_id"] for n in out["nodes"]}
    assert ids <= set(node_ids(g)) and len(ids) == len(out["nodes"])
    assert all(link["source"] in ids and link["target"] in ids for link in out["links"])
    p.to_json(tmp_path / "second.json", features=False)
    p.to_json(tmp_path / "first.json")  # replaces its own entry
    meta = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert sorted(m["slug"] for m in meta["graphs"]) == ["first", "second"]
    assert json.loads((tmp_path / "second.json").read_text())["metadata"]["scan"] == "sae_vision_ext"
    with pytest.raises(ValueError, match=r"ending in \.json"):
        p.to_json(tmp_path / "graph")
    feature = next(n for n in out["nodes"] if n["feature_type"] == "cross layer transcoder")
    layer, feat, pos = feature["node_id"].split("_")
    assert cantor_unpair(feature["feature"]) == (int(layer), int(feat)) and int(pos) == feature["ctx_idx"]
    assert feature["clerp"].startswith(f"L{layer} #{feat} ")
    assert sum(n["is_target_logit"] for n in out["nodes"]) == 1


def test_aggregated_view_conserves_edges_and_targets_agree(traced):
    rrm, g = traced
    keys, agg = g.aggregate_positions()
    assert abs(float(agg.sum()) - float(g.adjacency.coalesce().values().sum())) < 1e-9
    assert len(keys) < g.n_nodes
    c = g.target_classes[0]
    direction = -torch.full((1, 5), 1 / 5, dtype=torch.float64)
    direction[0, c] += 1
    same = rrm.attribute(images(1).double(), target=direction)
    torch.testing.assert_close(same.dense(), g.dense())
    other = rrm.attribute(images(1).double(), target=(c + 1) % 5)
    assert other.target_classes == [(c + 1) % 5] and not torch.allclose(other.dense(), g.dense())
