"""Feature analysis: numbers recompute from ``sae.encode``, and the embedded models' known ground truth
shows up (a marker feature in the biased model, shape features late and colour features early)."""

from __future__ import annotations

import pytest
import torch

import sae_vision_ext as sve
from sae_vision_ext.vis.analysis import (
    N_BINS,
    Attribute,
    analyse_features,
    analysis_table,
    auroc_from_histograms,
    score_bins,
    shapes_attributes,
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


def test_numbers_recompute_from_encode(shapes):
    model, saes, _data, pixels, _labels, attrs, analyses = shapes
    sae = saes[4]
    hook = sae.cfg.metadata.hook_name
    a = analyses[hook]
    with torch.no_grad():
        _, cache = model.run_with_cache(pixels, names_filter=[hook], return_cache_object=False)
        acts = sae.encode(cache[hook]).float()
    image_scores = acts.amax(1)  # [n, d_sae]
    shape = next(x for x in attrs if x.name == "shape")
    k = a.attributes.index("shape")
    checked = 0
    for f in a.best_auroc.argsort(descending=True)[:20].tolist():
        for v in range(len(shape.names)):
            positive = shape.values == v
            bins = score_bins(image_scores[:, f])
            pos = torch.bincount(bins[positive], minlength=N_BINS)
            neg = torch.bincount(bins[~positive], minlength=N_BINS)
            assert float(auroc_from_histograms(pos, neg)) == pytest.approx(float(a.auroc[k][f, v]), abs=1e-6)
            assert abs(_exact_auroc(image_scores[:, f], positive) - float(a.auroc[k][f, v])) < 0.02  # binning
            checked += 1
    assert checked == 120
    # per-patch attribute: the patch position, scored by the activation at each patch
    kp = a.attributes.index("patch")
    f = int(a.auroc[kp].nan_to_num(0).max(1).values.argmax())
    v = int(a.auroc[kp][f].nan_to_num(0).argmax())
    patch_scores = acts[:, model.cfg.n_prefix_tokens :, f].flatten()
    positive = torch.zeros(acts.shape[0], model.cfg.n_patches, dtype=torch.bool)
    positive[:, v] = True
    assert abs(_exact_auroc(patch_scores, positive.flatten()) - float(a.auroc[kp][f, v])) < 0.02


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
