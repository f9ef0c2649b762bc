"""Influence, pruning, scores, circuit-tracer JSON and the token-aggregated view."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import images
from test_attribution import rrm_for

from sae_vision_ext.circuits.attribution import AttributionGraph
from sae_vision_ext.circuits.graph_ops import influence, normalised_abs


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


def test_influence_and_scores_on_a_hand_computed_graph():
    g = hand_graph()
    infl = influence(normalised_abs(g.adjacency), g.weights)
    torch.testing.assert_close(infl, torch.tensor([2 / 3, 2 / 3, 1 / 3, 0.0], dtype=torch.float64))
    s = g.scores()
    assert abs(s["replacement"] - 2 / 3) < 1e-12  # input influence 2/3 vs error 1/3
    assert abs(s["completeness"] - 0.8) < 1e-12  # ((1 - 1/3)·1 + 1·2/3) / (1 + 2/3)
    pruned = g.prune(node_threshold=0.5)
    assert pruned.node_mask.tolist() == [True, True, True, True]
    s = pruned.scores()
    assert s["replacement_pruned"] == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def traced():
    rrm = rrm_for("timm_cls")
    return rrm, rrm.attribute(images(1).double(), batch_size=16)


def test_pruning_keeps_structure_and_influence_share(traced):
    _, g = traced
    p = g.prune(node_threshold=0.8, edge_threshold=0.98)
    kinds = g.node_kind
    assert all(bool(p.node_mask[i]) for i, k in enumerate(kinds) if k != "feature")
    infl = influence(normalised_abs(g.adjacency), g.weights)
    feats = torch.tensor([k == "feature" for k in kinds])
    kept = float(infl[feats & p.node_mask].sum() / infl[feats].sum())
    assert kept >= 0.8 and int((feats & p.node_mask).sum()) < int(feats.sum())
    looser = g.prune(node_threshold=0.95)
    assert int(looser.node_mask.sum()) >= int(p.node_mask.sum())
    s = p.scores()
    assert 0 < s["replacement_pruned"] <= s["replacement"] <= 1 and 0 < s["completeness_pruned"] <= 1


def test_circuit_tracer_json(traced, tmp_path):
    _, g = traced
    p = g.prune()
    out = p.to_json(str(tmp_path / "g.json"))
    assert json.loads((tmp_path / "g.json").read_text()) == out
    assert set(out) == {"metadata", "qParams", "nodes", "links"}
    assert out["metadata"]["prompt_tokens"][:2] == ["CLS", "p(0,0)"] and len(out["metadata"]["prompt_tokens"]) == 17
    ids = {n["node_id"] for n in out["nodes"]}
    assert len(ids) == int(p.node_mask.sum())
    assert all(link["source"] in ids and link["target"] in ids for link in out["links"])
    kinds = {n["feature_type"] for n in out["nodes"]}
    assert kinds == {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"}
    feature = next(n for n in out["nodes"] if n["feature_type"] == "cross layer transcoder")
    layer, feat, pos = feature["node_id"].split("_")
    assert (int(layer), int(feat), int(pos)) == (int(feature["layer"]), feature["feature"], feature["ctx_idx"])
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
