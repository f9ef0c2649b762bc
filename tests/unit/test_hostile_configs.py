"""Hostile config files and values: each refusal names the file or field, what was found and the fix."""

from __future__ import annotations

import dataclasses

import pytest

from sae_vision_ext.models.config import HookedViTConfig
from sae_vision_ext.training.config import VisionSAETrainingConfig

BAD_FILES = [
    ("list.yaml", "- n_images\n- 512\n", r"list\.yaml' holds a list at its top level.*mapping of field names"),
    ("scalar.yml", "just a string\n", r"scalar\.yml' holds a str at its top level.*mapping of field names"),
    ("list.json", "[1, 2]", r"list\.json' holds a list at its top level.*mapping of field names"),
    ("cfg.txt", "n_images: 4\n", r"cfg\.txt'\): the suffix '\.txt' is not a config format; use a \.yaml/\.yml/\.json"),
    ("noext", "n_images: 4\n", r"the suffix '\(none\)' is not a config format"),
    ("syntax.yaml", "n_images: [4\nk: 3\n", r"syntax\.yaml' is not valid YAML: .* at line 2, column \d+; fix"),
    ("syntax.json", '{"n_images": 4,}', r"syntax\.json' is not valid JSON: .* at line 1, column 16; fix the syntax"),
    ("keys.yaml", "1: 2\n", r"keys must be field names \(strings\); got \[1\]"),
]


@pytest.mark.parametrize(("name", "text", "match"), BAD_FILES, ids=[row[0] for row in BAD_FILES])
def test_bad_config_files_raise_value_error_naming_the_file(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=match):
        VisionSAETrainingConfig.from_file(tmp_path / name)


def test_missing_config_file_names_it(tmp_path):
    with pytest.raises(ValueError, match=r"cannot read '.*nope\.yaml'.*check the path"):
        VisionSAETrainingConfig.from_file(tmp_path / "nope.yaml")


_BOOL_FIELDS = [f.name for f in dataclasses.fields(VisionSAETrainingConfig) if f.type == "bool"]

BOOL_SPELLINGS = [
    ("quoted-no", "'no'", False),
    ("quoted-yes", "'yes'", True),
    ("string-False", "'False'", False),
    ("string-true", "'true'", True),
    ("string-0", "'0'", False),
    ("string-off", "'off'", False),
    ("int-1", "1", True),
]


@pytest.mark.parametrize("field", _BOOL_FIELDS)
@pytest.mark.parametrize(("spelling", "expected"), [r[1:] for r in BOOL_SPELLINGS], ids=[r[0] for r in BOOL_SPELLINGS])
def test_bool_fields_parse_spellings_strictly_from_yaml(tmp_path, field, spelling, expected):
    (tmp_path / "c.yaml").write_text(f"{field}: {spelling}\n")
    value = getattr(VisionSAETrainingConfig.from_file(tmp_path / "c.yaml"), field)
    assert value is expected


BAD_BOOLS = [("maybe", "maybe"), ("two", 2), ("float", 0.5), ("list", [True])]


@pytest.mark.parametrize("field", _BOOL_FIELDS)
@pytest.mark.parametrize("value", [r[1] for r in BAD_BOOLS], ids=[r[0] for r in BAD_BOOLS])
def test_bool_fields_refuse_non_booleans_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"{field} must be a boolean, got .*use true or false"):
        VisionSAETrainingConfig(**{field: value})


def test_training_config_has_a_bool_field():  # the tables above must not run empty
    assert _BOOL_FIELDS == ["stream", "data_parallel", "log_to_wandb"]


_VIT = dict(n_layers=1, d_model=4, n_heads=1, d_head=4, d_mlp=4, patch_size=4, image_size=[8, 8])
_VIT_BOOLS = [f.name for f in dataclasses.fields(HookedViTConfig) if f.type == "bool"]


@pytest.mark.parametrize("field", _VIT_BOOLS)
def test_every_config_mixin_bool_field_is_parsed_by_from_dict(field):
    """The mixin coerces by field type, so HookedViTConfig's bool fields get the same treatment."""
    assert getattr(HookedViTConfig.from_dict({**_VIT, "n_prefix_tokens": 1, field: "no"}), field) is False
    with pytest.raises(ValueError, match=rf"{field} must be a boolean, got 'maybe'"):
        HookedViTConfig.from_dict({**_VIT, field: "maybe"})
