"""The seed paper's evaluation protocol (``circuits/evaluate/seed_protocol.py``)."""

from __future__ import annotations

import pytest
import torch
from helpers import images

from sae_vision_ext.circuits.evaluate.circuit import evaluate_circuit
from sae_vision_ext.circuits.evaluate.seed_protocol import (
    _masked_outputs,
    evaluate_seed_protocol,
    seed_errors,
    select_nodes,
)
from sae_vision_ext.circuits.graph.graph import AggregatedGraph


def test_node_selection_follows_the_papers_rules_on_a_hand_made_graph():
    rel = [torch.tensor([3.0, -1.0, 2.0, 0.5]), torch.tensor([-2.0, 4.0, 1.0, 0.0, 0.2, 3.0])]
    # edges[0]: rows targets (layer 1's 5 features + error), columns layer 0's 3 features + error
    e0 = torch.zeros(6, 4)
    e0[1] = torch.tensor([0.1, 5.0, -3.0, 0.0])  # into target 1: source 1 strongest
    e0[5] = torch.tensor([1.0, 0.0, 2.0, 0.0])  # into target 5
    g = AggregatedGraph([0, 1], rel, [e0, rel[1][None]], 0, 1.0, True)
    gen = torch.Generator().manual_seed(0)
    assert [t.tolist() for t in select_nodes(g, "relevance", 0.0, gen)] == [[], []]
    assert [len(t) for t in select_nodes(g, "relevance", 1.0, gen)] == [4, 6]
    # q = 0.34: int(0.34 * 6) = 2 nodes per layer by positive relevance (max(R, 0) / sum)
    assert [t.tolist() for t in select_nodes(g, "relevance", 0.34, gen)] == [[0, 2], [1, 5]]
    # edge rule: layer 1 by relevance ([1, 5]); layer 0 by the signed sum of its edges into them:
    # [1.1, 5.0, -1.0, 0.0] -> 1, then 0 (clipping each edge at zero would have picked 2: 2.0 > 1.1)
    assert [t.tolist() for t in select_nodes(g, "edge", 0.34, gen)] == [[1, 0], [1, 5]]
    assert [len(t) for t in select_nodes(g, "random", 0.5, gen)] == [2, 3]  # int(q * (d_sae + 1)) per layer
    with pytest.raises(ValueError, match="Unknown seed-protocol rule"):
        select_nodes(g, "best", 0.5, gen)


def _signed_edge_rule(into_chosen: torch.Tensor, n: int) -> list[int]:
    """The authors' rule as stated: sources by the signed sum of their edges into the chosen targets,
    most first, ties by index (an independent loop, no sort)."""
    sums = into_chosen.sum(0).tolist()
    left, out = list(range(len(sums))), []
    for _ in range(n):
        best = max(left, key=lambda j: (sums[j], -j))
        out.append(best)
        left.remove(best)
    return out


# rows: edges into the two chosen targets of layer 1 (one column per layer-0 source: 2 features + error)
EDGE_CASES = [
    # the example: clipping picks {0, 2} (1.0 > 0.6 > 0.5), the signed sums (0.1, 0.5, 0.6) {1, 2}
    ("positive_and_negative_edges", [[1.0, 0.5, 0.3], [-0.9, 0.0, 0.3]], {1, 2}),
    ("all_sums_negative", [[-0.5, -0.1, -0.3], [0.0, 0.0, 0.0]], {1, 2}),  # clipping: all 0 -> {0, 1}
    ("tie_at_the_cut_keeps_index_order", [[0.4, 0.8, 0.9], [0.0, -0.4, 0.0]], {0, 2}),  # sums 0.4, 0.4, 0.9
]


@pytest.mark.parametrize(("into", "want"), [r[1:] for r in EDGE_CASES], ids=[r[0] for r in EDGE_CASES])
def test_edge_rule_sums_signed_edges_into_the_chosen_targets(into, want):
    rel = [torch.zeros(3), torch.tensor([2.0, 1.0, -1.0])]  # layer 1 by relevance: targets 0 and 1
    e0 = torch.zeros(3, 3)
    e0[:2] = torch.tensor(into)
    g = AggregatedGraph([0, 1], rel, [e0, rel[1][None]], 0, 1.0, True)
    chosen = select_nodes(g, "edge", 0.7, torch.Generator().manual_seed(0))  # int(0.7 * 3) = 2 per layer
    assert chosen[1].tolist() == [0, 1]
    assert chosen[0].tolist() == _signed_edge_rule(e0[chosen[1]], 2)
    assert set(chosen[0].tolist()) == want


def test_error_medians_use_the_authors_error(seed_setup):
    """``x̃·σ + μ − x̂`` with ``x̃ = (x − μ)/(σ + 1e-5)`` (layer_norm SAEs), written out here; a few 1e-6
    from ``x − x̂``; the protocol masks error nodes to its median (fully masked deletion checked)."""
    rrm, x, ref, err_ref_ours = seed_setup
    ref_pixels = images(6, seed=5).double()
    got = seed_errors(rrm, ref_pixels, batch_size=4)
    _, cache = rrm.model.run_with_cache(ref_pixels, return_cache_object=False)
    ours = rrm.errors(ref_pixels)
    for i, sae in enumerate(rrm.saes):
        h = cache[sae.cfg.metadata.hook_name]
        mu, sigma = h.mean(-1, keepdim=True), h.std(-1, keepdim=True)
        want = (h - mu) / (sigma + 1e-5) * sigma + mu - sae.decode(sae.encode(h))
        torch.testing.assert_close(got[i], want, rtol=0, atol=1e-12)
        gap = float((got[i] - ours[i]).abs().max())
        assert 1e-9 < gap < 1e-3, gap
    err_ref_theirs = [e.median(0).values for e in got]
    ev = evaluate_seed_protocol(rrm, x, fractions=[0.0, 1.0], reference_pixels=ref_pixels, progress=False)
    every = [[torch.arange(s.cfg.d_sae + 1) for s in rrm.saes]]
    clean_errors = [e[0] for e in rrm.errors(x)]
    target = int(rrm.model(x).argmax())

    def demeaned(err_ref):
        out = _masked_outputs(rrm, x, every, ref, err_ref, clean_errors=clean_errors)[0]
        return float(out[target] - out.mean())

    got_end = ev.curves["relevance"]["deletion"]["demeaned_logit"][-1]
    assert got_end == pytest.approx(demeaned(err_ref_theirs), abs=1e-12)
    assert abs(got_end - demeaned(err_ref_ours)) > 1e-9


def test_leaf_errors_reaches_the_seed_protocol(seed_setup, monkeypatch):
    """``evaluate_circuit(protocol="seed", leaf_errors=...)`` builds every graph with it (default: the
    paper's ``True``); ``protocol="ours"`` refuses it."""
    rrm, x, _, _ = seed_setup
    pixels = torch.cat([x, images(1, seed=4).double()])
    seen = []
    build = rrm.attribute_aggregated

    def spy(*args, **kwargs):
        seen.append(kwargs["leaf_errors"])
        return build(*args, **kwargs)

    monkeypatch.setattr(rrm, "attribute_aggregated", spy)
    kw = dict(fractions=[0.0, 1.0], reference_pixels=images(6, seed=5).double(), progress=False)
    for leaf_errors, want in ((False, False), (True, True), (None, True)):
        seen.clear()
        evaluate_circuit(rrm, pixels, protocol="seed", leaf_errors=leaf_errors, **kw)
        assert seen == [want, want], leaf_errors
    with pytest.raises(ValueError, match=r"leaf_errors=True applies to protocol='seed'"):
        evaluate_circuit(rrm, pixels, leaf_errors=True, **kw)


def test_everything_masked_makes_the_output_independent_of_the_image(seed_setup):
    """With every feature and error node at its reference, the first SAE layer's residual is fixed (for
    SAEs without per-token normalisation: a layer_norm SAE de-standardises with the image's own
    statistics, in the paper's code too), so two images give the same output; with nothing masked
    (errors held at the clean values) the model's."""
    from helpers import make_sae

    from sae_vision_ext.circuits.models import ResidualReplacementModel

    base, x, _, _ = seed_setup
    saes = [
        make_sae("topk", "none", True, d_in=32, d_sae=24, seed=i, hook=f"blocks.{i}.hook_resid_post") for i in (0, 1)
    ]
    rrm = ResidualReplacementModel(base.model, saes)
    ref_pixels = images(6, seed=5).double()
    ref, err_ref = rrm.reference_values(ref_pixels), rrm.reference_values(ref_pixels, of="errors")
    y = images(1, seed=9).double()
    every = [[torch.arange(s.cfg.d_sae + 1) for s in rrm.saes]]
    none = [[torch.zeros(0, dtype=torch.long) for _ in rrm.saes]]
    outs = []
    for img in (x, y):
        clean_errors = [e[0] for e in rrm.errors(img)]
        outs.append(_masked_outputs(rrm, img, every + none, ref, err_ref, clean_errors=clean_errors))
        torch.testing.assert_close(outs[-1][1], rrm.model(img)[0])
    torch.testing.assert_close(outs[0][0], outs[1][0])
    assert (rrm.model(x) - rrm.model(y)).abs().max() > 1e-3


def test_seed_protocol_curves_end_at_the_model_and_say_errors_are_clean(seed_setup):
    rrm, x, _, _ = seed_setup
    pixels = torch.cat([x, images(2, seed=4).double()])
    ev = evaluate_circuit(rrm, pixels, reference_pixels=images(6, seed=5).double(), protocol="seed", progress=False)
    assert (ev.protocol, ev.errors) == ("seed", "clean")
    assert set(ev.curves) == {"relevance", "edge", "random", "neurons"}
    out = rrm.model(pixels)
    target = out.argmax(-1)
    clean_demeaned = float((out.gather(1, target[:, None])[:, 0] - out.mean(-1)).mean())
    for rule, modes in ev.curves.items():
        assert len(modes["deletion"]["demeaned_logit"]) == len(ev.fractions)
        assert modes["deletion"]["demeaned_logit"][0] == pytest.approx(clean_demeaned, abs=1e-8), rule
        assert modes["insertion"]["demeaned_logit"][-1] == pytest.approx(clean_demeaned, abs=1e-8), rule
    assert ev.auc["relevance"]["deletion"]["demeaned_logit"] < ev.auc["random"]["deletion"]["demeaned_logit"]
    from jaxtyping import TypeCheckError  # the tests check hints at run time; users get the ValueError

    with pytest.raises((ValueError, TypeCheckError), match="paper"):
        evaluate_circuit(rrm, pixels, protocol="paper")
