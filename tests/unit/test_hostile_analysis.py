"""Hostile inputs to the feature analysis (``vis/attributes.py``, ``vis/analysis.py``): each refused
with a message that names the bad value and says what is valid, before any forward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sae_vision_ext as sve
from sae_vision_ext.vis.analysis import Attribute, analyse_features


@pytest.fixture(scope="module")
def shapes_model():
    model = sve.HookedViT.from_pretrained("sve:shapes-vit")
    return model, sve.load_sae("sve:shapes-vit/blocks.0.hook_resid_post")


ATTRIBUTES = [
    ("one_name", dict(values=[0, 0, 0], names=["a"]), r"has 1 value name\(s\) \['a'\]; at least two values"),
    ("one_value_present", dict(values=[0, 0, -1], names=["a", "b"]), r"only \['a'\] occurs .*at least two values"),
    ("nothing_labelled", dict(values=[-1, -1], names=["a", "b"]), r"only no value occurs among 0 labelled"),
    ("value_never_present", dict(values=[0, 1, 0], names=["a", "b", "c"]), r"value 'c' \(code 2\) labels none"),
    (
        "patch_value_never_present",
        dict(values=[[0, 1], [1, 0]], names=["a", "b", "c"], level="patch"),
        r"value 'c' \(code 2\) labels none of the 4 labelled patchs",
    ),
    ("string_not_a_name", dict(values=["a", "c", "a"], names=["a", "b"]), r"value 'c' is not one of .*np\.unique"),
    (
        "fractional_code",
        dict(values=[0, 2.5, 1], names=["a", "b", "c"]),
        r"integer class ids .*got 2\.5 at index \(1,\)",
    ),
    ("nan_code", dict(values=[0.0, 1.0, float("nan")], names=["a", "b"]), r"got nan at index \(2,\)"),
    ("complex_codes", dict(values=np.array([0, 1j]), names=["a", "b"]), r"got an array of dtype complex128"),
    ("code_below_minus_one", dict(values=[0, 1, -2], names=["a", "b"]), r"code -2 is invalid; codes are 0 \.\. 1, -1"),
    ("not_a_label_out_of_range", dict(values=[0, 1], names=["a", "b"], not_a_label=(5,)), r"not_a_label code 5"),
    ("unknown_kind", dict(values=[0, 1], names=["a", "b"], kind="shape"), r"kind must be one of \['class'"),
]


@pytest.mark.parametrize(("kw", "match"), [row[1:] for row in ATTRIBUTES], ids=[row[0] for row in ATTRIBUTES])
def test_bad_attributes_are_refused_at_construction(kw, match):
    with pytest.raises(ValueError, match=match) as info:
        Attribute("x", **kw)
    assert "Attribute 'x'" in str(info.value)


def _mutated() -> Attribute:
    a = Attribute("x", [0, 1], ["a", "b"])
    a.values = torch.tensor([0, 0])  # edited after construction: only one value left
    return a


ANALYSES = [
    ("threshold_at_chance", dict(threshold=0.5), r"threshold must be in \(0\.5, 1\] .*got 0\.5"),
    ("threshold_above_one", dict(threshold=1.5), r"threshold must be in \(0\.5, 1\] .*got 1\.5"),
    ("threshold_nan", dict(threshold=float("nan")), r"threshold must be in \(0\.5, 1\] .*got nan"),
    ("batch_size_zero", dict(batch_size=0), r"batch_size must be >= 1; got 0"),
    ("negative_budget", dict(max_exact_bytes=-1), r"max_exact_bytes must be >= 0 .*got -1"),
    ("no_saes", dict(saes="none"), r"needs at least one SAE"),
    ("no_attributes", dict(attributes="none"), r"needs at least one Attribute"),
    ("two_saes_one_hook", dict(saes="twice"), r"Two SAEs read 'blocks\.0\.hook_resid_post'"),
    ("value_lost_after_construction", dict(attributes="mutated"), r"Attribute 'x': only \['a'\] occurs"),
]


@pytest.mark.parametrize(("kw", "match"), [row[1:] for row in ANALYSES], ids=[row[0] for row in ANALYSES])
def test_bad_analysis_inputs_are_refused(shapes_model, kw, match):
    model, sae = shapes_model
    kw = dict(kw)
    saes = {"none": [], "twice": [sae, sae]}.get(kw.pop("saes", ""), [sae])
    attrs = {"none": [], "mutated": [_mutated()]}.get(kw.pop("attributes", ""), [Attribute("x", [0, 1], ["a", "b"])])
    with pytest.raises(ValueError, match=match):
        analyse_features(model, saes, torch.zeros(2, 3, 64, 64), attrs, **kw)


def test_string_and_integral_codes_are_accepted():
    assert Attribute("x", ["b", "a", "b"], ["a", "b"]).values.tolist() == [1, 0, 1]
    assert Attribute("x", np.array(["b", "a"], dtype=object), ["a", "b"]).values.tolist() == [1, 0]
    assert Attribute("x", [1.0, 0.0, -1.0], ["a", "b"]).values.tolist() == [1, 0, -1]
    assert Attribute("x", [True, False], ["no", "yes"]).values.tolist() == [1, 0]


def test_shapes_attributes_leave_out_values_a_small_set_misses(caplog):
    """16 unbalanced images miss object cells and every marker: the values present are kept, the
    one-valued attributes left out (logged), so the README's example runs."""
    data = sve.make_shapes(16, seed=0)
    with caplog.at_level("INFO", logger="sae_vision_ext.vis.attributes"):
        attrs = sve.shapes_attributes(data, (8, 8), 64)
    names = [a.name for a in attrs]
    assert "marker" not in names and "marker patch" not in names
    assert "takes one value on these 16 images" in caplog.text
    cell = attrs[names.index("object cell")]
    assert len(cell.names) < 9 and sorted(set(cell.values.tolist())) == list(range(len(cell.names)))
