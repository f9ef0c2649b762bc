"""Exactness of attribution graphs under the frozen linearisation (these tests define correctness)."""

from __future__ import annotations

import pytest
import torch
from helpers import build_native, check_exact, images, make_sae, rrm_for

from sae_vision_ext import HookedViT
from sae_vision_ext.circuits.engine.attribution import Attributor, _Leaves
from sae_vision_ext.circuits.models import ResidualReplacementModel
from sae_vision_ext.saes import affine


@pytest.fixture(
    scope="module",
    params=["timm_cls", "timm_layerscale_deit3", "open_clip_tok", "hf_dinov2", "hf_dinov2_registers_classifier"],
)
def traced(request):
    rrm = rrm_for(request.param)
    x = images(1).double()
    graph = Attributor(rrm, batch_size=7).attribute(x)
    return rrm, x, graph


def test_sum_rule_edges_plus_bias_response_equal_preactivation(traced):
    _, _, g = traced
    rows = ~torch.isnan(g.value)
    assert int(rows.sum()) == sum(k in ("feature", "target") for k in g.node_kind)
    total = g.dense()[rows].sum(1) + g.constant[rows]
    torch.testing.assert_close(total, g.value[rows].to(total.dtype), atol=1e-8, rtol=1e-8)


def test_frozen_perturbation_moves_targets_by_exactly_the_edge(traced):
    rrm, x, g = traced
    att = Attributor(rrm)
    frozen, norms = rrm.frozen_state(x)
    leaves = _Leaves(rrm.n_layers)
    with torch.no_grad():
        out0, pre0 = att._forward(x, frozen, leaves, norms)
    base = {k: v.detach() for k, v in leaves.values.items()}
    A = g.dense()
    checked = logit_checked = 0
    for layer in range(rrm.n_layers):
        feats = [i for i, k in enumerate(g.node_kind) if k == "feature" and g.node_layer[i] == layer][:3]
        for s in feats:
            p, f, a = int(g.node_pos[s]), int(g.node_feature[s]), float(g.activation[s])
            delta = 0.7
            moved = base[layer].clone()
            direction = affine.decoder_directions(rrm.saes[layer], torch.tensor(f), norms[layer].select(p))
            moved[0, p] += delta * direction.detach()
            with torch.no_grad():
                out1, pre1 = att._forward(x, frozen, _Leaves(rrm.n_layers, {layer: moved}), norms)
            targets = [
                t for t in range(g.n_nodes) if g.node_layer[t] == layer + 1 and g.node_kind[t] in ("feature", "target")
            ]
            for t in targets:
                if g.node_kind[t] == "feature":
                    change = float(
                        pre1[layer + 1][0, g.node_pos[t], g.node_feature[t]]
                        - pre0[layer + 1][0, g.node_pos[t], g.node_feature[t]]
                    )
                else:  # a target: the demeaned logit of its class
                    n_out = out0.shape[-1]
                    direction = torch.full((n_out,), -1.0 / n_out, dtype=out0.dtype)
                    direction[g.target_classes[0]] += 1.0
                    change = float((out1 - out0)[0] @ direction)
                    logit_checked += 1
                assert abs(change - delta / a * float(A[t, s])) < 1e-6
                checked += 1
    assert checked > 10 and logit_checked > 0


def test_second_derivatives_vanish_under_freezing(traced):
    rrm, x, _ = traced
    att = Attributor(rrm)
    frozen, norms = rrm.frozen_state(x)
    leaves = _Leaves(rrm.n_layers)
    _, pre = att._forward(x, frozen, leaves, norms)
    h = pre[1][0].sum()
    (g,) = torch.autograd.grad(h, leaves.values[0], create_graph=True)
    second = torch.autograd.grad((g * torch.randn_like(g)).sum(), leaves.values[0], allow_unused=True)[0]
    assert second is None or second.abs().max() == 0


def test_batching_does_not_change_edges():
    rrm = rrm_for("timm_cls")
    x = images(1).double()
    a = Attributor(rrm, batch_size=1).attribute(x).dense()
    b = Attributor(rrm, batch_size=16).attribute(x).dense()
    torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_errors_for_batches_and_attention_pool_heads():
    rrm = rrm_for("timm_cls")
    with pytest.raises(ValueError, match="traces one image"):
        Attributor(rrm).attribute(images(2).double())
    model = HookedViT.from_model(build_native("timm_map_siglip"))
    saes = [s.float() for s in rrm.saes]
    with pytest.raises(ValueError, match="attention-pool head"):
        Attributor(ResidualReplacementModel(model, saes))


@pytest.mark.parametrize("flag", ["scale_mlp_norm", "scale_attn_norm"])
def test_norms_inside_the_block_are_frozen_scales_and_edges_stay_exact(flag):
    """timm's norm on the MLP hidden activation / the attention output: its scale is held like ln1/ln2
    (``mlp.ln``/``attn.ln`` hooks), so the sum rule and frozen interventions hold."""
    import timm

    torch.manual_seed(0)
    native = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5, **{flag: True}
    ).eval()
    with torch.no_grad():
        for p in native.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model = HookedViT.from_model(native).double()
    part = "mlp.ln" if flag == "scale_mlp_norm" else "attn.ln"
    assert f"blocks.0.{part}.hook_scale" in model.hook_dict
    saes = [make_sae("topk", "none", True, seed=i, hook=f"blocks.{i}.hook_resid_post") for i in range(2)]
    assert check_exact(ResidualReplacementModel(model, saes), images(1).double(), n_sources=2) > 5


def test_public_intervene_follows_edges_when_frozen_and_is_real_when_free(traced):
    rrm, x, g = traced
    A = g.dense()
    s = next(i for i, k in enumerate(g.node_kind) if k == "feature" and g.node_layer[i] == 0)
    p, f, a = int(g.node_pos[s]), int(g.node_feature[s]), float(g.activation[s])
    delta = 0.5
    base = rrm.intervene(x, [(0, p, f, a)], freeze=True)  # setting a feature to its own value changes nothing
    torch.testing.assert_close(base["output"], base["clean_output"], atol=1e-10, rtol=1e-10)
    moved = rrm.intervene(x, [(0, p, f, a + delta)], freeze=True)
    targets = [t for t in range(g.n_nodes) if g.node_kind[t] == "feature" and g.node_layer[t] == 1]
    for t in targets:
        pt, ft = int(g.node_pos[t]), int(g.node_feature[t])
        change = float(moved["feature_pre_acts"][1][0, pt, ft] - base["feature_pre_acts"][1][0, pt, ft])
        assert abs(change - delta / a * float(A[t, s])) < 1e-6
    free = rrm.intervene(x, [(0, None, f, 0.0)], freeze=False)
    hook = "blocks.0.hook_resid_post.hook_sae_acts_post"
    with rrm.spliced(keep_errors=True):
        expected = rrm.model.run_with_hooks(
            x, fwd_hooks=[(hook, lambda t, hook: t.index_fill(-1, torch.tensor([f]), 0.0))]
        )
    torch.testing.assert_close(free["output"], expected)
    assert (free["feature_acts"][0][..., f] == 0).all()
    with pytest.raises(ValueError, match="out of range"):
        rrm.intervene(x, [(9, 0, 0, 1.0)])


@pytest.mark.parametrize("variant", ["timm_cls", "hf_dinov2"])
def test_mlp_leaf_mode_is_exact_with_the_mlp_gate_left_free(variant):
    """MLP outputs as input-less leaves: edges and the sum rule hold with the gate *not* frozen, as
    long as every MLP output is held at its clean value."""
    rrm = rrm_for(variant)
    x = images(1).double()
    att = Attributor(rrm, batch_size=5, mlp_leaves=True)
    g = att.attribute(x)
    kinds = g.node_kind
    assert kinds.count("mlp") == rrm.n_layers * rrm.model.cfg.n_ctx
    rows = ~torch.isnan(g.value)
    torch.testing.assert_close(g.dense()[rows].sum(1) + g.constant[rows], g.value[rows], atol=1e-8, rtol=1e-8)
    frozen, norms = rrm.frozen_state(x)
    frozen = {k: v for k, v in frozen.items() if not k.endswith("gate")}  # gates free
    leaves = _Leaves(rrm.n_layers, mlp=True)
    with torch.no_grad():
        _, pre0 = att._forward(x, frozen, leaves, norms)
    held = {k: v.detach() for k, v in leaves.values.items() if isinstance(k, tuple)}
    A = g.dense()
    layer = 1
    for s in [i for i, k in enumerate(kinds) if k == "mlp" and g.node_layer[i] == layer][:3]:
        p = int(g.node_pos[s])
        moved = held[("mlp", layer)].clone()
        moved[0, p] *= 1.5  # the MLP node's value times 1.5: targets move by 0.5 * edge
        with torch.no_grad():
            _, pre1 = att._forward(x, frozen, _Leaves(rrm.n_layers, held | {("mlp", layer): moved}, mlp=True), norms)
        for t in [i for i, k in enumerate(kinds) if k == "feature" and g.node_layer[i] == layer]:
            pt, ft = int(g.node_pos[t]), int(g.node_feature[t])
            change = float(pre1[layer][0, pt, ft] - pre0[layer][0, pt, ft])
            assert abs(change - 0.5 * float(A[t, s])) < 1e-8
    # MLP edges carry real weight, and an MLP node only feeds its own layer
    mlp_cols = torch.tensor([k == "mlp" for k in kinds])
    a = g.adjacency.coalesce()
    src, dst = a.indices()[1], a.indices()[0]
    on_mlp = mlp_cols[src]
    assert a.values()[on_mlp].abs().sum() > 0
    assert (g.node_layer[dst[on_mlp]] == g.node_layer[src[on_mlp]]).all()
    assert 0 < g.scores()["mlp_share"] < 1


def test_budgeted_exploration_follows_influence_and_keeps_rows_exact():
    rrm = rrm_for("timm_cls")
    x = images(1).double()
    full = Attributor(rrm, batch_size=4).attribute(x)
    budget = 10
    part = Attributor(rrm, batch_size=4).attribute(x, max_feature_nodes=budget)
    explored = [i for i, k in enumerate(part.node_kind) if k == "feature" and not torch.isnan(part.value[i])]
    assert len(explored) == budget
    assert part.node_kind == full.node_kind  # same nodes; only rows differ
    A, B = full.dense(), part.dense()
    torch.testing.assert_close(B[explored], A[explored])
    n_features = full.node_kind.count("feature")
    assert n_features > budget
    unexplored = [i for i, k in enumerate(part.node_kind) if k == "feature" and i not in explored]
    assert B[unexplored].abs().sum() == 0
    # the first batch is the top-influence features as seen from the target rows alone
    from sae_vision_ext.circuits.graph.ops import influence, normalised_abs

    t = [i for i, k in enumerate(full.node_kind) if k == "target"]
    only_targets = torch.zeros_like(A)
    only_targets[t] = A[t]
    infl = influence(normalised_abs(only_targets.to_sparse()), full.weights)
    is_feature = torch.tensor([k == "feature" for k in full.node_kind])
    first = infl.masked_fill(~is_feature, -1).argsort(descending=True)[:4].tolist()
    assert set(first) <= set(explored)
