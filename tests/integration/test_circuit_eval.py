"""Circuit evaluation: curve endpoints are the model, edits are what they claim, and on the trained
shapes model graph influence beats random nodes."""

from __future__ import annotations

import pytest
import torch
from helpers import images, rrm_for

from sae_vision_ext.circuits.evaluate.circuit import _Patcher, evaluate_circuit
from sae_vision_ext.circuits.evaluate.curves import FRACTIONS, output_metrics


@pytest.fixture(scope="module")
def tiny():
    rrm = rrm_for("timm_cls")
    x = images(3, seed=4).double()
    return rrm, x, evaluate_circuit(rrm, x, reference="zero", progress=False, n_ablations=4)


def test_curve_endpoints_equal_the_original_model(tiny):
    rrm, x, ev = tiny
    with torch.no_grad():
        out = rrm.model(x)
    targets = out.argmax(-1)
    clean = torch.stack(
        [output_metrics(out[i : i + 1], int(targets[i]))["demeaned_logit"] for i in range(len(x))]
    ).mean()
    for ranking in ("influence", "random", "neurons"):
        curves = ev.curves[ranking]
        assert len(curves["insertion"]["logit"]) == len(FRACTIONS)
        assert curves["insertion"]["demeaned_logit"][-1] == pytest.approx(float(clean), abs=1e-9)
        assert curves["deletion"]["demeaned_logit"][0] == pytest.approx(float(clean), abs=1e-9)
        assert curves["deletion"]["accuracy"][0] == 1.0
    # insertion of nothing with zero references = every feature zero: differs from the model
    assert abs(ev.curves["influence"]["insertion"]["demeaned_logit"][0] - float(clean)) > 1e-3
    # circuit faithfulness lies where the endpoints put it; sizes are real circuit sizes
    assert all(0 < n < 2000 for n in ev.circuit_sizes) and len(ev.circuit_sizes) == 3
    assert ev.influence_ablation_spearman == ev.influence_ablation_spearman  # computed (not NaN) on every image
    assert set(ev.auc) == {"influence", "random", "neurons"}


def test_patcher_single_site_ablation_equals_intervene(tiny):
    rrm, x, _ = tiny
    x = x[:1]
    refs = rrm.reference_values(images(4, seed=9).double(), "mean")
    patcher = _Patcher(rrm, refs, [torch.zeros(1)] * rrm.n_layers)
    acts = rrm.feature_acts(x)
    sites = []
    for layer in (0, 1):
        p, f = acts[layer][0].nonzero()[0].tolist()
        sites.append(torch.tensor([[layer, p, f]]))
    outs = patcher.run(x, sites, [False, False], neurons=False)
    for row, s in zip(outs, sites, strict=True):
        layer, p, f = s[0].tolist()
        expected = rrm.intervene(x, [(layer, p, f, float(refs[layer][p, f]))], freeze=False)["output"][0]
        torch.testing.assert_close(row, expected)
    # inverted: every site except the listed ones goes to its reference
    out = patcher.run(x, [sites[0][:0]], [True], neurons=False)[0]
    hooks = [(f"blocks.{layer}.hook_resid_post.hook_sae_acts_post", lambda t, hook, r=ref: r.expand_as(t))
             for layer, ref in enumerate(refs)]  # fmt: skip
    with rrm.spliced(keep_errors=True):
        expected = rrm.model.run_with_hooks(x, fwd_hooks=hooks)
    torch.testing.assert_close(out, expected[0])


def test_bad_fractions_raise():
    rrm = rrm_for("timm_cls")
    with pytest.raises(ValueError, match="fractions"):
        evaluate_circuit(rrm, images(1).double(), fractions=[0.5, 0.1], progress=False)


def test_influence_beats_random_on_the_shapes_model():
    import sae_vision_ext as sve
    from sae_vision_ext.circuits.models import ResidualReplacementModel

    model = sve.HookedViT.from_pretrained("sve:shapes-vit")
    saes = [sve.load_sae(f"sve:shapes-vit/blocks.{layer}.hook_resid_post") for layer in range(6)]
    rrm = ResidualReplacementModel(model, saes)
    raw, labels = sve.make_shapes(48, seed=5).tensors()
    px = model.preprocess(raw)
    ev = evaluate_circuit(rrm, px[:2], labels[:2], reference_pixels=px, progress=False, n_ablations=16)
    auc = ev.auc
    assert auc["influence"]["deletion"]["demeaned_logit"] < auc["random"]["deletion"]["demeaned_logit"] - 0.5
    assert auc["influence"]["insertion"]["demeaned_logit"] > auc["random"]["insertion"]["demeaned_logit"]
    assert ev.influence_ablation_spearman > 0.3
    assert 0 < ev.faithfulness < 1.5


def test_spearman_equals_the_rank_difference_formula():
    """``_spearman`` against ``1 − 6 Σ d² / (n (n² − 1))`` (distinct values) and its two extremes."""
    from sae_vision_ext.circuits.evaluate.circuit import _spearman

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, generator=g), torch.randn(40, generator=g)
    d = (a.argsort().argsort() - b.argsort().argsort()).double()
    n = len(a)
    assert _spearman(a, b) == pytest.approx(1 - 6 * float((d**2).sum()) / (n * (n**2 - 1)), abs=1e-12)
    assert _spearman(a, a.exp()) == pytest.approx(1.0) and _spearman(a, -a) == pytest.approx(-1.0)
