"""Every registered adapter has a test variant; registries reject duplicates and unknown names."""

from __future__ import annotations

import pytest
from helpers import VARIANTS, build_native

import sae_vision_ext as sve
from sae_vision_ext._registry import Registry
from sae_vision_ext.models import ADAPTERS, adapter_for


def test_every_adapter_has_a_test_variant():
    covered = {adapter for adapter, _ in VARIANTS.values()}
    missing = set(ADAPTERS.names()) - covered
    assert not missing, f"add a builder to tests/helpers.py VARIANTS for adapters {missing}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_is_claimed_by_its_adapter(variant):
    expected = VARIANTS[variant][0]
    module = build_native(variant)
    if variant == "open_clip_full_clip":
        module = module.visual
    assert adapter_for(module).name == expected


def test_list_adapters_names_each_family():
    names = [a["name"] for a in sve.list_adapters()]
    assert {"timm", "open_clip", "open_clip_timm", "hf_vit", "hf_clip", "hf_dinov2", "hf_siglip"} <= set(names)
    assert all(a["supported_types"] for a in sve.list_adapters())


def test_registry_duplicate_and_unknown():
    r: Registry[int] = Registry("widget")
    r.register("alpha")(1)
    r.register("beta")(2)
    with pytest.raises(ValueError, match="already registered"):
        r.register("alpha")(3)
    with pytest.raises(ValueError, match=r"Unknown widget 'alpah'\. Did you mean 'alpha'\?.*'alpha', 'beta'"):
        r.get("alpah")
    assert r.get("beta") == 2 and "alpha" in r and len(r) == 2
