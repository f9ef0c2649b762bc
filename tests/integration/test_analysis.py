"""Feature analysis: exact AUROCs recompute from ``sae.encode`` (streamed ones within their bound),
and the embedded models' known ground truth shows up (a marker feature in the biased model, shape
features late and colour features early)."""

from __future__ import annotations

import pytest
import torch

import sae_vision_ext as sve
from sae_vision_ext.vis.analysis import Attribute, analyse_features, analysis_table, shapes_attributes
from sae_vision_ext.vis.auroc import (
    N_BINS,
    AurocAccumulator,
    auroc_from_histograms,
    histogram_bound,
    rank_auroc,
    score_bins,
)


def _setup(name: str, n: int, seed: int):
    model = sve.HookedViT.from_pretrained(f"sve:{name}")
    saes = [sve.load_sae(f"sve:{name}/blocks.{layer}.hook_resid_post") for layer in range(6)]
    data = sve.make_shapes(n, seed=seed, balanced=True)
    raw, labels = data.tensors()
    pixels = model.preprocess(raw)
    attrs = shapes_attributes(data, model.cfg.grid_size, 64)
    return model, saes, data, pixels, labels, attrs, analyse_features(model, saes, pixels, attrs)


@pytest.fixture(scope="module")
def shapes():
    return _setup("shapes-vit", 512, 31)


def _exact_auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Mann-Whitney AUROC with ties counted one half."""
    p, q = scores[positive].double(), scores[~positive].double()
    return float(((p[:, None] > q[None]).double() + 0.5 * (p[:, None] == q[None]).double()).mean())


def _encode(model, sae, pixels):
    hook = sae.cfg.metadata.hook_name
    with torch.no_grad():
        _, cache = model.run_with_cache(pixels, names_filter=[hook], return_cache_object=False)
        return sae.encode(cache[hook]).float()  # [n, pos, d_sae]


def test_aurocs_are_the_exact_rank_statistic_of_encode(shapes):
    """Default budget: every AUROC is the Mann-Whitney statistic (ties one half) of the scores from
    ``sae.encode``, to 1e-9, image and patch attributes alike."""
    model, saes, _data, pixels, _labels, attrs, analyses = shapes
    sae = saes[4]
    a = analyses[sae.cfg.metadata.hook_name]
    assert a.exact == [True] * len(attrs) and all((b == 0).all() for b in a.auroc_bound)
    acts = _encode(model, sae, pixels)
    image_scores = acts.amax(1)  # [n, d_sae]
    shape = next(x for x in attrs if x.name == "shape")
    k = a.attributes.index("shape")
    checked = 0
    for f in [*a.best_auroc.argsort(descending=True)[:20].tolist(), int(a.fires.argmin())]:
        for v in range(len(shape.names)):
            exact = _exact_auroc(image_scores[:, f], shape.values == v)
            assert float(a.auroc[k][f, v]) == pytest.approx(exact, abs=1e-9)
            checked += 1
    assert checked == 126
    # per-patch attribute: the patch position, scored by the activation at each patch
    kp = a.attributes.index("patch")
    f = int(a.auroc[kp].nan_to_num(0).max(1).values.argmax())
    v = int(a.auroc[kp][f].nan_to_num(0).argmax())
    patch_scores = acts[:, model.cfg.n_prefix_tokens :, f].flatten()
    positive = torch.zeros(acts.shape[0], model.cfg.n_patches, dtype=torch.bool)
    positive[:, v] = True
    assert float(a.auroc[kp][f, v]) == pytest.approx(_exact_auroc(patch_scores, positive.flatten()), abs=1e-9)


def test_rank_auroc_equals_pairwise_comparison_with_ties_unknowns_and_negative_scores():
    g = torch.Generator().manual_seed(0)
    m, n_feat = 57, 9
    scores = torch.randint(0, 4, (m, n_feat), generator=g).float() * 0.5  # heavy ties, zeros included
    scores[:, 3] = torch.randn(m, generator=g)  # negative scores
    scores[:, 4] = 1.0  # one tie group: every AUROC one half
    codes = [torch.randint(-1, 3, (m,), generator=g), torch.randint(0, 2, (m,), generator=g)]
    out = rank_auroc(scores, codes, [3, 2], work_bytes=1)  # one feature per block
    for c, o in zip(codes, out, strict=True):
        for f in range(n_feat):
            for v in range(o.shape[1]):
                known = c >= 0
                want = _exact_auroc(scores[known, f], c[known] == v)
                assert float(o[f, v]) == pytest.approx(want, abs=1e-9), (f, v)
    assert (out[0][4] == 0.5).all()


def test_streamed_aurocs_stay_within_their_stated_bound(shapes):
    """``max_exact_bytes=0``: histograms (recomputable from ``score_bins``), each AUROC within its
    ``auroc_bound`` of the exact one; a budget fitting only the image scores keeps those exact."""
    model, saes, _data, pixels, _labels, attrs, exact = shapes
    sub = saes[3:5]
    streamed = analyse_features(model, sub, pixels, attrs, max_exact_bytes=0)
    for sae in sub:
        h = sae.cfg.metadata.hook_name
        s, e = streamed[h], exact[h]
        assert s.exact == [False] * len(attrs)
        bounds = torch.cat([b.flatten() for b in s.auroc_bound])
        assert 0 < float(bounds.nan_to_num(0).max()) < 0.5
        for k in range(len(attrs)):
            gap = (s.auroc[k] - e.auroc[k]).abs()
            assert (gap <= s.auroc_bound[k] + 1e-12).all(), (h, attrs[k].name, float((gap - s.auroc_bound[k]).max()))
    # the histograms are the ones score_bins gives
    sae = saes[4]
    a = streamed[sae.cfg.metadata.hook_name]
    image_scores = _encode(model, sae, pixels).amax(1)
    shape = next(x for x in attrs if x.name == "shape")
    k = a.attributes.index("shape")
    for f in a.best_auroc.argsort(descending=True)[:5].tolist():
        for v in range(len(shape.names)):
            positive = shape.values == v
            bins = score_bins(image_scores[:, f])
            pos = torch.bincount(bins[positive], minlength=N_BINS)
            neg = torch.bincount(bins[~positive], minlength=N_BINS)
            assert float(auroc_from_histograms(pos, neg)) == pytest.approx(float(a.auroc[k][f, v]), abs=1e-12)
            assert float(histogram_bound(pos, neg)) == pytest.approx(float(a.auroc_bound[k][f, v]), abs=1e-12)
    image_only = 4 * len(pixels) * sum(s.cfg.d_sae for s in sub)
    mixed = analyse_features(model, sub, pixels, attrs, max_exact_bytes=image_only)
    a = mixed[sae.cfg.metadata.hook_name]
    assert a.exact == [x.level == "image" for x in attrs]
    for k, x in enumerate(attrs):
        if x.level == "image":
            torch.testing.assert_close(a.auroc[k], exact[sae.cfg.metadata.hook_name].auroc[k], rtol=0, atol=0)


def test_histogram_bound_counts_the_zero_bin_when_scores_go_negative():
    """A feature with negative scores: bin 0 holds distinct values, so its pairs count in the bound."""
    g = torch.Generator().manual_seed(1)
    m = 200
    scores = torch.cat([-torch.rand(m // 2, 1, generator=g), torch.rand(m // 2, 1, generator=g) * 1e-4])
    scores = torch.cat([scores, scores.abs() * 50], 1)  # feature 1: non-negative, same order
    codes = torch.randint(0, 2, (m,), generator=g)
    acc = AurocAccumulator(2, m, [codes], [2], exact=False, device=torch.device("cpu"))
    acc.add(0, scores)
    (streamed,), (bound,) = acc.result()
    (exact,) = rank_auroc(scores, [codes], [2])
    assert ((streamed - exact).abs() <= bound + 1e-12).all()
    assert (bound[0] > 0.2).all()  # bin 0 (100 distinct negatives, 100 tiny positives in bin 1) counted


def test_types_labels_and_trends_on_shapes_vit(shapes):
    *_, analyses = shapes
    rows = [a.summary() for a in analyses.values()]
    first, last = rows[0]["types"], rows[-1]["types"]
    # measured (docs/analysis.md): shape features grow with depth, colour features shrink
    assert last["class"] >= 25 and first["class"] <= 2
    assert first["colour"] >= 5 and first["colour"] > first["class"] and last["class"] > 5 * last["colour"]
    assert sum(r["types"]["class"] for r in rows[4:]) > sum(r["types"]["class"] for r in rows[:2])
    a = analyses["blocks.5.hook_resid_post"]
    f = next(i for i, t in enumerate(a.types) if t == "class")
    label = a.label(f)
    assert label.endswith(f"(shape), layer 5, AUROC {float(a.best_auroc[f]):.2f}")
    assert label.split(" (")[0] in sve.SHAPES and float(a.best_auroc[f]) >= 0.9
    assert "| blocks.0.hook_resid_post |" in analysis_table(analyses)


def test_biased_model_has_a_marker_feature_that_the_debiasing_search_selects():
    model, saes, data, pixels, labels, _attrs, analyses = _setup("shapes-vit-biased", 512, 21)
    marker = torch.from_numpy(data.factors["marker"]).long()
    found = sve.find_spurious_features(sve.ResidualReplacementModel(model, saes), pixels, labels, marker)
    hits = []
    for layer, f in found.selected:
        a = analyses[f"blocks.{layer}.hook_resid_post"]
        if a.attributes[int(a.best_attribute[f])] in ("marker", "marker patch") and float(a.best_auroc[f]) >= 0.95:
            hits.append((layer, f))
    assert hits, [(layer, f, analyses[f"blocks.{layer}.hook_resid_post"].label(f)) for layer, f in found.selected]


def test_bad_attributes_are_refused():
    with pytest.raises(ValueError, match="level must be"):
        Attribute("x", [0, 1], ["a", "b"], level="token")
    with pytest.raises(ValueError, match=r"patch values must have 2 dimension"):
        Attribute("x", [0, 1], ["a", "b"], level="patch")
    with pytest.raises(ValueError, match="has no name"):
        Attribute("x", [0, 2], ["a", "b"])
    model = sve.HookedViT.from_pretrained("sve:shapes-vit")
    sae = sve.load_sae("sve:shapes-vit/blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match="labels 3 images; pixels has 2"):
        analyse_features(model, [sae], torch.zeros(2, 3, 64, 64), [Attribute("x", [0, 1, 0], ["a", "b"])])
