"""The closed-form row engine (``circuits/engine/rows.py``) and the row store (``circuits/engine/row_store.py``)
against the autograd reference, float64.

Every row of the position-resolved graph computed in closed form equals the plain batched VJP rows
(``Attributor(engine="autograd")``) on every adapter family and SAE configuration; the influence the
row store computes equals ``graph_ops``'s propagation over the sparse adjacency; the adjacency it
builds (claimed coalesced) equals the coalesced sort of its entries.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import ARCHS, FAMILIES, build_native, images, make_sae, rrm_with

from sae_vision_ext import HookedViT
from sae_vision_ext.circuits.engine.attribution import Attributor
from sae_vision_ext.circuits.engine.row_store import RowStore
from sae_vision_ext.circuits.engine.rows import row_macs
from sae_vision_ext.circuits.graph import ops as graph_ops
from sae_vision_ext.circuits.models import ResidualReplacementModel


def _both(rrm, x, **kw):
    staged = Attributor(rrm, batch_size=5, **kw).attribute(x)
    plain = Attributor(rrm, batch_size=5, engine="autograd", **kw).attribute(x)
    return staged, plain


@pytest.mark.parametrize("variant", [*FAMILIES, "timm_layerscale_deit3"])
@pytest.mark.parametrize(
    ("arch", "norm"), [("topk_rescale", "layer_norm"), ("gated", "none"), ("jumprelu", "constant_norm_rescale")]
)
def test_closed_form_rows_equal_autograd_rows(variant, arch, norm):
    model = HookedViT.from_model(build_native(variant)).double()
    saes = [
        make_sae(arch, norm, True, d_in=model.cfg.d_model, seed=i, hook=f"blocks.{i}.hook_resid_post")
        for i in range(model.cfg.n_layers)
    ]
    staged, plain = _both(ResidualReplacementModel(model, saes), images(1).double())
    a, b = staged.adjacency.coalesce(), plain.adjacency.coalesce()
    assert torch.equal(a.indices(), b.indices())
    assert a.values().abs().max() > 1e-3  # rows that carry weight
    torch.testing.assert_close(a.values(), b.values(), atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(staged.constant, plain.constant, equal_nan=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_closed_form_rows_equal_autograd_rows_for_every_sae_class(arch):
    rrm = rrm_with("timm_cls", arch, "layer_norm", False)
    staged, plain = _both(rrm, images(1, seed=4).double())
    torch.testing.assert_close(staged.dense(), plain.dense(), atol=1e-10, rtol=1e-8)


def test_budgeted_graph_equal_between_engines_and_influence_equal_to_propagation():
    rrm = rrm_with("timm_cls", "topk", "layer_norm", True)
    x = images(1).double()
    staged = Attributor(rrm, batch_size=3, update_interval=2).attribute(x, max_feature_nodes=12)
    plain = Attributor(rrm, batch_size=3, update_interval=2, engine="autograd").attribute(x, max_feature_nodes=12)
    torch.testing.assert_close(staged.dense(), plain.dense(), atol=1e-10, rtol=1e-8)
    explored = int((~torch.isnan(staged.value)).sum())
    assert explored == 12 + 1  # the budget plus the target row
    # the influence cached from the row store equals graph_ops's propagation over the adjacency
    dst, src, vals = graph_ops.edges(staged.adjacency)
    expected = graph_ops.propagate(dst, src, graph_ops.normalised_values(dst, vals, staged.n_nodes), staged.weights)
    torch.testing.assert_close(graph_ops.node_influence(staged), expected, atol=1e-12, rtol=1e-9)
    assert graph_ops.node_influence(staged).abs().sum() > 0


def test_row_store_adjacency_is_in_coalesced_order():
    g = torch.Generator().manual_seed(0)
    store = RowStore(12, torch.zeros(12, dtype=torch.float64))
    store.add(2, torch.tensor([9, 7]), torch.tensor([3, 4, 5]), torch.randn(2, 3, generator=g))
    store.add(1, torch.tensor([5, 3]), torch.tensor([0, 1]), torch.randn(2, 2, generator=g))
    store.add(2, torch.tensor([8]), torch.tensor([3, 4, 5]), torch.randn(1, 3, generator=g))
    built = store.adjacency()
    dense = built.to_dense()
    reference = torch.sparse_coo_tensor(built.indices(), built.values(), built.shape, check_invariants=True)
    reference = reference.coalesce()
    assert torch.equal(reference.indices(), built.indices())
    assert dense[9, 4] == store.blocks[0].weights[0, 1] and dense[3, 1] == store.blocks[1].weights[1, 1]
    with pytest.raises(ValueError, match="different sources"):
        store.add(2, torch.tensor([10]), torch.tensor([3, 4]), torch.randn(1, 2, generator=g))
        store.adjacency()


@pytest.mark.parametrize(
    ("n_pos", "d", "d_mlp", "heads", "k"), list(itertools.product([197], [768], [3072], [12], [33]))
)
def test_row_macs_counts_the_stated_terms(n_pos, d, d_mlp, heads, k):
    """ViT-B at k 32 (+1 error slot): ~12.7 M multiply-adds per row, as the module docstring states."""
    assert row_macs(n_pos, d, d_mlp, heads, k) == 2 * d * d_mlp + 2 * d * d + heads * n_pos * d + n_pos * k * d
    assert 12e6 < row_macs(n_pos, d, d_mlp, heads, k) < 13e6


def test_engine_and_update_interval_are_validated():
    rrm = rrm_with("timm_cls", "topk", "none", True)
    with pytest.raises(Exception, match="engine"):  # ValueError, or the runtime type checker's error in tests
        Attributor(rrm, engine="jacobian")
    with pytest.raises(ValueError, match="update_interval must be"):
        Attributor(rrm, update_interval=0)


def test_half_precision_models_are_traced_in_float32_and_given_back_unchanged():
    rrm = rrm_with("timm_cls", "topk", "layer_norm", True)
    rrm.model.to(torch.bfloat16)
    for sae in rrm.saes:
        sae.to(torch.bfloat16)
    before = [p.clone() for p in rrm.model.parameters()]
    x = images(1).to(torch.bfloat16)
    half = rrm.attribute(x)
    assert next(rrm.model.parameters()).dtype == torch.bfloat16 and rrm.saes[0].W_enc.dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(before, rrm.model.parameters(), strict=True))
    rrm.model.to(torch.float32)
    for sae in rrm.saes:
        sae.to(torch.float32)
    full = rrm.attribute(x.float())  # the same (bf16-rounded) weights in float32
    torch.testing.assert_close(half.dense(), full.dense())
    rows = ~torch.isnan(half.value)
    residual = half.dense()[rows].sum(1) + half.constant[rows] - half.value[rows]
    assert residual.abs().max() < 1e-3 * half.value[rows].abs().max()  # the sum rule at float32 precision
