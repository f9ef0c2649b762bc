"""The procedural shapes set: determinism, marker rates, factors, validation."""

from __future__ import annotations

import numpy as np
import pytest

from sae_vision_ext.data.shapes import MARKER_COLOUR, SHAPES, make_shapes


def test_image_depends_only_on_seed_and_index():
    a = make_shapes(12, seed=3)
    b = make_shapes(5, seed=3, start=7)
    np.testing.assert_array_equal(a.images[7:], b.images)
    np.testing.assert_array_equal(a.labels[7:], b.labels)
    assert not np.array_equal(make_shapes(12, seed=4).images, a.images)


def test_spurious_marker_rates_and_pixels():
    biased = make_shapes(1200, seed=0, spurious_class=2, spurious_rate=0.9)
    marker, labels = biased.factors["marker"].astype(bool), biased.labels
    assert abs(marker[labels == 2].mean() - 0.9) < 0.06
    assert marker[labels != 2].sum() == 0
    corner = biased.images[:, 1:7, 1:7]
    assert (corner[marker] == MARKER_COLOUR).all()
    assert not (corner[~marker] == MARKER_COLOUR).all(axis=(1, 2, 3)).any()

    balanced = make_shapes(1200, seed=0, balanced=True)
    for c in range(len(SHAPES)):
        rate = balanced.factors["marker"][balanced.labels == c].mean()
        assert 0.35 < rate < 0.65, f"class {c} marker rate {rate}"
    assert set(np.unique(balanced.groups())) == set(range(2 * len(SHAPES)))


def test_factors_and_tensors():
    d = make_shapes(16, seed=1, image_size=48)
    x, y = d.tensors()
    assert x.shape == (16, 3, 48, 48) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert y.tolist() == d.labels.tolist()
    for key in ("shape", "colour", "background", "cx", "cy", "size", "rotation", "marker"):
        assert d.factors[key].shape == (16,)
    assert (d.factors["cx"] > d.factors["size"]).all() and (d.factors["cx"] < 48 - d.factors["size"]).all()


def test_classes_are_balanced_enough():
    counts = np.bincount(make_shapes(1200, seed=5).labels, minlength=len(SHAPES))
    assert counts.min() > 150


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": -1}, "n >= 0"),
        ({"n": 2, "spurious_class": 9}, "spurious_class"),
        ({"n": 2, "spurious_rate": 1.5}, "rate"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_shapes(**kwargs)
