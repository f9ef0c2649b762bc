"""The seed paper's token-aggregated graph against a direct, slow computation of its formulas
(``circuits/engine/aggregated.py``; authors' definitions in rubato-yeong/RRM ``utils/modules/modelgrad.py``)."""

from __future__ import annotations

import pytest
import torch
from helpers import images, make_sae

from sae_vision_ext import HookedViT
from sae_vision_ext.circuits.engine.attribution import Attributor, _Leaves
from sae_vision_ext.circuits.models import ResidualReplacementModel
from sae_vision_ext.saes import affine


def direct(rrm, x, ref, err_ref, leaf_errors):
    """The paper's formulas, one scalar gradient at a time (no batching, no shared code path)."""
    att = Attributor(rrm)
    frozen, norms = rrm.frozen_state(x)
    leaves = _Leaves(rrm.n_layers)
    out, pre = att._forward(x, frozen, leaves, norms)
    acts = [a[0] for a in rrm.feature_acts(x)]
    errs = [e[0] for e in rrm.errors(x)]
    n_out = out.shape[-1]
    c = int(out[0].argmax())
    direction = -torch.full((n_out,), 1 / n_out, dtype=torch.float64)
    direction[c] += 1
    n_pos = acts[0].shape[0]

    def dec(i, p, f):
        return affine.decoder_directions(rrm.saes[i], torch.tensor(f), norms[i].select(p))

    def g_feat(i, grad):  # <G[p], d_f[p]> for every (p, f)
        return torch.stack([torch.stack([grad[p] @ dec(i, p, f) for f in range(rrm.saes[i].cfg.d_sae)])
                            for p in range(n_pos)])  # fmt: skip

    (g_last,) = torch.autograd.grad(out[0] @ direction, leaves.values[1], retain_graph=True)
    if leaf_errors:
        grad0 = None
    else:
        from sae_vision_ext.circuits.replacement.linearise import resid_post_gradients

        grad0 = resid_post_gradients(rrm.model, x, lambda o: o[0] @ direction)[1][0][0]
    gf1 = g_feat(1, g_last[0])
    weight = gf1 * (acts[1] != 0)
    d0 = rrm.saes[0].cfg.d_sae
    edges0 = torch.zeros(rrm.saes[1].cfg.d_sae + 1, d0 + 1, dtype=torch.float64)
    acc = torch.zeros_like(leaves.values[0][0])
    for fo in range(rrm.saes[1].cfg.d_sae):
        row = torch.zeros_like(leaves.values[0][0]).detach()
        for q in range(n_pos):
            if weight[q, fo] != 0:
                (gq,) = torch.autograd.grad(pre[1][0, q, fo], leaves.values[0], retain_graph=True)
                row += weight[q, fo].detach() * gq[0]
        acc += row
        for f in range(d0):
            edges0[fo, f] = sum(
                float(row[p] @ dec(0, p, f)) * float(acts[0][p, f] - ref[0][p, f]) for p in range(n_pos)
            )
        edges0[fo, d0] = float((row * (errs[0] - err_ref[0])).sum())
    grad0 = acc if leaf_errors else grad0
    rel = []
    for i, grad in ((0, grad0), (1, g_last[0])):
        gf = g_feat(i, grad)
        rel.append(torch.cat([(gf * (acts[i] - ref[i])).sum(0), (grad * (errs[i] - err_ref[i])).sum()[None]]))
    if not leaf_errors:
        edges0[-1] = rel[0] - edges0[:-1].sum(0)
    return rel, edges0, c


@pytest.mark.parametrize("leaf_errors", [True, False])
def test_aggregated_graph_equals_the_papers_formulas_computed_directly(seed_setup, leaf_errors):
    rrm, x, ref, err_ref = seed_setup
    g = rrm.attribute_aggregated(x, reference=ref, error_reference=err_ref, leaf_errors=leaf_errors, batch_size=5)
    rel, edges0, c = direct(rrm, x, ref, err_ref, leaf_errors)
    assert g.target_class == c and g.layers == [0, 1]
    assert [tuple(e.shape) for e in g.edges] == [(25, 25), (1, 25)]
    for got, want in zip(g.relevance, rel, strict=True):
        torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(g.edges[0], edges0, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(g.edges[1][0], rel[1], atol=1e-8, rtol=1e-8)
    assert g.edges[0].abs().sum() > 0 and (g.edges[0][-1] == 0).all() == leaf_errors
    if leaf_errors:  # relevance is conserved: a source's relevance is the sum of its outgoing edges
        torch.testing.assert_close(g.edges[0].sum(0), g.relevance[0], atol=1e-8, rtol=1e-8)


def test_aggregated_sum_rules_hold_under_the_frozen_linearisation(seed_setup):
    """Σ_sources edges[f'] = Σ_p' c[p', f'] (h − h_ref)[p', f'] with h_ref the frozen response to layer
    0's residual at its references; the last layer's relevances sum to the frozen change of the target."""
    rrm, x, ref, err_ref = seed_setup
    g = rrm.attribute_aggregated(x, reference=ref, error_reference=err_ref)
    att = Attributor(rrm)
    frozen, norms = rrm.frozen_state(x)
    leaves = _Leaves(rrm.n_layers)
    with torch.no_grad():
        out, pre = att._forward(x, frozen, leaves, norms)
    acts = [a[0] for a in rrm.feature_acts(x)]
    errs = [e[0] for e in rrm.errors(x)]

    def at_reference(i):
        delta = affine.decode(rrm.saes[i], acts[i], norms[i]) - affine.decode(rrm.saes[i], ref[i], norms[i])
        return (leaves.values[i] - delta - (errs[i] - err_ref[i])).detach()

    direction = -torch.full((out.shape[-1],), 1 / out.shape[-1], dtype=torch.float64)
    direction[g.target_class] += 1
    with torch.no_grad():
        out_ref, _ = att._forward(x, frozen, _Leaves(rrm.n_layers, {1: at_reference(1)}), norms)
        _, pre_ref = att._forward(x, frozen, _Leaves(rrm.n_layers, {0: at_reference(0)}), norms)
    torch.testing.assert_close(g.relevance[1].sum(), ((out - out_ref)[0] @ direction).double(), atol=1e-8, rtol=1e-8)
    # c[p', f'] = g_1 times layer 1's active mask
    leaves2 = _Leaves(rrm.n_layers)
    out2, _ = att._forward(x, frozen, leaves2, norms)
    (g1,) = torch.autograd.grad(out2[0] @ direction, leaves2.values[1])
    c = affine.decoder_projection(rrm.saes[1], g1[0], norms[1]) * (acts[1] != 0)
    expected = (c * (pre[1][0] - pre_ref[1][0])).sum(0)
    torch.testing.assert_close(g.edges[0][:-1].sum(1), expected.double(), atol=1e-8, rtol=1e-8)


def test_bad_references_are_refused(seed_setup):
    rrm, x, ref, _ = seed_setup
    with pytest.raises(ValueError, match=r"reference\[1\] has shape"):
        rrm.attribute_aggregated(x, reference=[ref[0], ref[1][:, :3]])
    with pytest.raises(ValueError, match="traces one image"):
        rrm.attribute_aggregated(images(2).double())
    out = rrm.attribute_aggregated(x, reference=ref).to_json()
    assert {n["id"] for n in out["nodes"]} >= {"0_err", "1_err", "output"}
    assert all(link["target"] == "output" for link in out["links"] if link["source"].startswith("1_"))


@pytest.mark.parametrize("mix_first", [True, False])
@pytest.mark.parametrize(
    "variant", ["timm_layerscale_deit3", "open_clip_tok", "hf_dinov2", "hf_clip", "hf_vit_classifier"]
)
def test_staged_rows_equal_plain_vjp_rows_on_every_adapter_family(variant, mix_first, monkeypatch):
    """rows.py (rank-one encoder cotangents, the MLP half on the active tokens, the value path of the
    attention half in either order) against plain batched VJPs through the whole frozen block, float64."""
    from helpers import build_native

    from sae_vision_ext.circuits.engine import rows

    monkeypatch.setattr(rows, "mix_first", lambda *args: mix_first)
    model = HookedViT.from_model(build_native(variant)).double()
    saes = [make_sae("gated" if variant == "hf_clip" else "topk_rescale", "layer_norm", True, d_in=32, seed=i,
                     hook=f"blocks.{i}.hook_resid_post") for i in range(2)]  # fmt: skip
    rrm = ResidualReplacementModel(model, saes)
    x = images(1).double()
    ref = rrm.reference_values(images(4, seed=3).double(), "median")
    staged = rrm.attribute_aggregated(x, reference=ref, batch_size=7)
    plain = rrm.attribute_aggregated(x, reference=ref, batch_size=7, engine="autograd")
    assert staged.edges[0].abs().sum() > 0
    for a, b in zip(staged.edges + staged.relevance, plain.edges + plain.relevance, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
