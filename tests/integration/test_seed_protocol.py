"""The seed paper's evaluation protocol (``circuits/seed_protocol.py``)."""

from __future__ import annotations

import pytest
import torch
from helpers import images

from sae_vision_ext.circuits.aggregated import AggregatedGraph
from sae_vision_ext.circuits.evaluate import evaluate_circuit
from sae_vision_ext.circuits.seed_protocol import _masked_outputs, select_nodes


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
    # edge rule: layer 1 by relevance ([1, 5]); layer 0 by positive edges into them: 1 (5.0), then 2 (2.0)
    assert [t.tolist() for t in select_nodes(g, "edge", 0.34, gen)] == [[1, 2], [1, 5]]
    assert [len(t) for t in select_nodes(g, "random", 0.5, gen)] == [2, 3]  # int(q * (d_sae + 1)) per layer
    with pytest.raises(ValueError, match="Unknown seed-protocol rule"):
        select_nodes(g, "best", 0.5, gen)


def test_everything_masked_makes_the_output_independent_of_the_image(seed_setup):
    """With every feature and error node at its reference, the first SAE layer's residual is fixed (for
    SAEs without per-token normalisation: a layer_norm SAE de-standardises with the image's own
    statistics, in the paper's code too), so two images give the same output; with nothing masked
    (errors held at the clean values) the model's."""
    from helpers import make_sae

    from sae_vision_ext.circuits.replacement import ResidualReplacementModel

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
