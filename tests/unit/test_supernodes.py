"""Automatic supernodes (``circuits/graph/supernodes.py``): partitions that keep the sum rule, agree with
the graph's own token aggregation, and load in circuit-tracer's own pydantic models."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import _circuit_tracer, images, rrm_for

from sae_vision_ext.circuits.graph.ops import node_influence
from sae_vision_ext.circuits.graph.supernodes import (
    _regions,
    group_nodes,
    influence_coverage,
    membership,
    supernode_graph,
    to_circuit_tracer,
)


@pytest.fixture(scope="module")
def graph():
    rrm = rrm_for("timm_cls")
    return rrm.attribute(images(1).double())


def test_regions_are_the_connected_patches_and_prefix_tokens_stand_alone():
    # 1 prefix token, a 4-wide grid: patches (0,0) (0,1) (1,1) touch; (3,3) and (2,0) stand apart
    cell = lambda r, c: 1 + 4 * r + c
    positions = [0, cell(0, 0), cell(0, 1), cell(1, 1), cell(3, 3), cell(2, 0)]
    assert _regions(positions, n_prefix=1, grid_w=4) == [[0], [1, 2, 6], [9], [16]]
    assert _regions([cell(0, 3), cell(1, 0)], n_prefix=1, grid_w=4) == [[4], [5]]  # row ends do not wrap


@pytest.mark.parametrize("by", ["feature", "spatial", "label"])
def test_groups_partition_the_feature_nodes_and_keep_the_sum_rule(graph, by):
    labels = {(int(graph.node_layer[i]), int(graph.node_feature[i])): "even" if i % 2 else "odd" for i in range(30)}
    groups = group_nodes(graph, by, labels=labels)
    feats = {i for i, k in enumerate(graph.node_kind) if k == "feature"}
    covered = [i for g in groups for i in g.nodes]
    assert sorted(covered) == sorted(feats)  # every feature node once
    for g in groups:
        keys = {(int(graph.node_layer[i]), int(graph.node_feature[i])) for i in g.nodes}
        assert {graph.node_layer[i].item() for i in g.nodes} == {g.layer}
        if by != "label" or len(keys) == 1:
            assert len(keys) == 1
    P, names = membership(graph, groups)
    assert P.sum(0).eq(1).all() and len(names) == P.shape[0]
    names, edges, values = supernode_graph(graph, groups)
    finite = ~torch.isnan(graph.value)
    rows = [r for r in range(len(groups)) if all(bool(finite[i]) for i in groups[r].nodes)]
    assert rows, "some groups have node values"
    const = P @ torch.nan_to_num(graph.constant.to(P.dtype))
    torch.testing.assert_close(edges[rows].sum(1) + const[rows], values[rows], atol=1e-8, rtol=1e-8)
    infl = node_influence(graph)
    shares = [float(infl[g.nodes].sum()) for g in groups]
    assert shares == sorted(shares, reverse=True)


def test_feature_groups_equal_the_graphs_own_position_aggregation(graph):
    groups = group_nodes(graph, "feature")
    _, edges, _ = supernode_graph(graph, groups)
    keys, aggregated = graph.aggregate_positions()
    index = {k: i for i, k in enumerate(keys)}
    rows = [index[("feature", g.layer, int(graph.node_feature[g.nodes[0]]))] for g in groups]
    torch.testing.assert_close(edges[: len(groups), : len(groups)], aggregated[rows][:, rows], atol=1e-10, rtol=0)


def test_spatial_groups_are_connected_and_maximal(graph):
    w, n_prefix = graph.grid[1], graph.n_prefix
    groups = group_nodes(graph, "spatial")
    cell = lambda i: divmod(int(graph.node_pos[i]) - n_prefix, w)
    by_feature: dict[tuple[int, int], list[set]] = {}
    for g in groups:
        cells = {cell(i) for i in g.nodes if int(graph.node_pos[i]) >= n_prefix}
        if len(cells) > 1:  # connected: every cell has a neighbour in the group
            assert all(any(abs(r - r2) + abs(c - c2) == 1 for r2, c2 in cells) for r, c in cells), g.name
        key = (g.layer, int(graph.node_feature[g.nodes[0]]))
        by_feature.setdefault(key, []).append(cells)
    split = 0
    for regions in by_feature.values():  # maximal: no two regions of a feature touch
        for a in range(len(regions)):
            for b in range(a + 1, len(regions)):
                assert not any(abs(r - r2) + abs(c - c2) == 1 for r, c in regions[a] for r2, c2 in regions[b])
        split += len([r for r in regions if r]) > 1
    assert split > 0, "some feature fires on separate regions (else the test proves nothing)"


def test_coverage_counts_fewer_groups_than_nodes(graph):
    infl = node_influence(graph).double()
    feats = infl[[i for i, k in enumerate(graph.node_kind) if k == "feature"]].sort(descending=True).values
    expected = int(((feats.cumsum(0) / feats.sum()) < 0.8 - 1e-12).sum()) + 1
    assert influence_coverage(graph) == expected
    by_feature = influence_coverage(graph, group_nodes(graph, "feature"))
    spatial = influence_coverage(graph, group_nodes(graph, "spatial"))
    assert by_feature <= spatial <= expected and by_feature < expected
    with pytest.raises(ValueError, match=r"share=0 must be in \(0, 1\]"):
        influence_coverage(graph, share=0)


def test_supernodes_load_in_circuit_tracers_models(tmp_path):
    graph_models, *_ = _circuit_tracer()
    rrm = rrm_for("timm_cls")
    pruned = rrm.attribute(images(1).double()).prune(node_threshold=0.99)  # features kept at several positions
    groups = to_circuit_tracer(pruned, group_nodes(pruned, "feature"))
    assert groups and all(len(g) >= 3 for g in groups)  # a name and at least two nodes
    out = pruned.to_json(tmp_path / "g.json", rrm=rrm, supernodes=groups)
    model = graph_models.Model.model_validate(json.loads((tmp_path / "g.json").read_text()))
    ids = {n.node_id for n in model.nodes}
    assert model.qParams.supernodes == groups == out["qParams"]["supernodes"]
    assert all(node in ids for g in groups for node in g[1:])  # only nodes the pruned export kept


def test_bad_rules_and_masks_are_named(graph):
    with pytest.raises(ValueError, match=r"by='position' is not a grouping rule; valid: feature, spatial, label"):
        group_nodes(graph, "position")
    with pytest.raises(ValueError, match="by='label' needs labels"):
        group_nodes(graph, "label")
    with pytest.raises(ValueError, match="nodes must be a boolean mask"):
        group_nodes(graph, "feature", nodes=torch.ones(3))
