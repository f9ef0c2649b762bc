"""Spurious-feature search and debiasing: AUROC, ablation semantics, and the shapes shortcut."""

from __future__ import annotations

import pytest
import torch
from helpers import images, rrm_for

import sae_vision_ext as sve
from sae_vision_ext.circuits.evaluate.debias import _auroc, group_accuracy


def test_auroc_matches_pairwise_definition_with_ties():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (60, 5), generator=gen).double()
    labels = torch.randint(0, 2, (60,), generator=gen)
    got = _auroc(scores, labels)
    for j in range(5):
        p, n = scores[labels == 1, j], scores[labels == 0, j]
        expected = ((p[:, None] > n[None]).double() + 0.5 * (p[:, None] == n[None]).double()).mean()
        assert float(got[j]) == pytest.approx(float(expected), abs=1e-12)


def test_debias_ablates_like_intervene_and_leaves_the_original_alone():
    rrm = rrm_for("timm_cls")
    x = images(2, seed=3).double()
    with torch.no_grad():
        before = rrm.model(x)
    acts = rrm.feature_acts(x)
    layer = rrm.n_layers - 1
    feat = int(acts[layer][0, 0].argmax())  # active on the CLS token, which the head reads
    deb = sve.debias(rrm.model, rrm.saes, [(layer, feat)])
    deb.reset_hooks()  # permanent hooks survive
    with torch.no_grad():
        out = deb(x)
        torch.testing.assert_close(rrm.model(x), before)  # original untouched
    assert not torch.allclose(out, before)
    for i in range(2):
        expected = rrm.intervene(x[i : i + 1], [(layer, None, feat, 0.0)], freeze=False)["output"]
        torch.testing.assert_close(out[i : i + 1], expected)
    # a per-position reference equal to the clean values changes nothing
    ref = [torch.zeros(rrm.model.cfg.n_ctx, s.cfg.d_sae, dtype=torch.float64) for s in rrm.saes]
    ref[layer] = acts[layer][0]
    same = sve.debias(rrm.model, rrm.saes, [(layer, feat)], reference=ref)
    with torch.no_grad():
        torch.testing.assert_close(same(x[:1]), before[:1])


def test_bad_groups_raise():
    rrm = rrm_for("timm_cls")
    x = images(4).double()
    with pytest.raises(ValueError, match="groups must be 0/1"):
        sve.find_spurious_features(rrm, x, torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    # the shape annotations catch this in tests; users (no runtime checker) get the ValueError
    import inspect

    unchecked = inspect.unwrap(sve.find_spurious_features)
    assert unchecked is not sve.find_spurious_features
    with pytest.raises(ValueError, match="differ in length"):
        unchecked(rrm, x, torch.zeros(3, dtype=torch.long), torch.tensor([0, 1, 0, 1]))


def test_finds_the_marker_shortcut_on_the_biased_shapes_model():
    model = sve.HookedViT.from_pretrained("sve:shapes-vit-biased")
    saes = [sve.load_sae(f"sve:shapes-vit-biased/blocks.{layer}.hook_resid_post") for layer in range(6)]
    rrm = sve.ResidualReplacementModel(model, saes)

    def split(n, seed):
        d = sve.make_shapes(n, seed=seed, balanced=True)
        raw, y = d.tensors()
        return model.preprocess(raw), y, torch.from_numpy(d.factors["marker"]).long()

    px, y, g = split(512, 21)
    found = sve.find_spurious_features(rrm, px, y, g)
    assert found.associated_class == sve.SHAPES.index("circle")
    assert found.n_selected > 0 and all(a >= 0.7 for a in found.auroc)
    # nobody said where the marker is: the top features fire at its patch p(0,0) (position 1)
    acts = rrm.feature_acts(px[g == 1][:64])
    peaks = [int(acts[layer][..., f].mean(0).argmax()) for layer, f in found.candidates[:5]]
    assert 1 in peaks
    # held-out balanced split: the worst group improves a lot, the average barely moves
    tx, ty, tg = split(768, 2)
    deb = sve.debias(model, saes, found.selected, found.reference)
    with torch.no_grad():
        before, after = model(tx).argmax(-1), deb(tx).argmax(-1)
    wb, wa = min(group_accuracy(before, ty, tg).values()), min(group_accuracy(after, ty, tg).values())
    assert wa - wb >= 0.15
    assert float((after == ty).float().mean()) >= float((before == ty).float().mean()) - 0.03


def test_spurious_attribution_uses_the_effective_decoder_of_layer_norm_saes():
    """Summed over features, the total-effect attribution is ``<grad, decode(encode(x)) − decode(0)>``
    computed with SAELens's own decode (per-token std and mean included)."""
    from helpers import build_native, images, make_sae

    from sae_vision_ext import HookedViT
    from sae_vision_ext.circuits.evaluate.debias import _attribution
    from sae_vision_ext.circuits.models import ResidualReplacementModel
    from sae_vision_ext.circuits.replacement.linearise import resid_post_gradients

    model = HookedViT.from_model(build_native("timm_cls")).double()
    saes = [make_sae("topk_rescale", "layer_norm", True, d_in=32, seed=i, hook=f"blocks.{i}.hook_resid_post")
            for i in range(2)]  # fmt: skip
    rrm = ResidualReplacementModel(model, saes)
    x, y = images(3).double(), torch.tensor([0, 1, 2])
    total = _attribution(rrm, x, y, assoc=3)
    resid, grads = resid_post_gradients(model, x, lambda out: (out[:, 3] - out.gather(1, y[:, None])[:, 0]).sum())
    for layer, sae in enumerate(saes):
        acts = sae.encode(resid[layer])
        recon = sae.decode(acts)
        sae.encode(resid[layer])  # SAELens's decode reads the statistics of the last encode
        bias = sae.decode(torch.zeros_like(acts))
        expected = (grads[layer] * (recon - bias)).sum() / len(x)
        torch.testing.assert_close(total[layer].sum(), expected.detach(), atol=1e-8, rtol=1e-8)
