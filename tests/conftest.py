"""Shared fixtures: tiny seeded models of every supported variant, keyed by adapter.

``VARIANTS`` maps a variant id to ``(adapter name, builder)``; builders return the *native* module
in eval mode. Every registered adapter must have at least one variant (``test_registry`` checks),
so a newly registered family gets the whole parity suite by adding one builder here.
Shapes annotated with jaxtyping are checked at runtime in tests (beartype import hook).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no machine here reaches a hub; fail fast, never retry
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from jaxtyping import install_import_hook

with install_import_hook("sae_vision_ext", "beartype.beartype"):  # imported under the hook so shapes are checked
    import sae_vision_ext.circuits.engine.aggregated
    import sae_vision_ext.circuits.engine.attribution
    import sae_vision_ext.circuits.evaluate.circuit
    import sae_vision_ext.circuits.evaluate.debias
    import sae_vision_ext.circuits.evaluate.logit_lens
    import sae_vision_ext.circuits.evaluate.seed_protocol
    import sae_vision_ext.circuits.models
    import sae_vision_ext.models
    import sae_vision_ext.saes.affine

import pytest
import torch
from helpers import VARIANTS, _timm, build_native, images, make_sae

from sae_vision_ext import HookedViT
from sae_vision_ext.circuits.models import ResidualReplacementModel


@pytest.fixture(params=list(VARIANTS))
def variant(request) -> str:
    return request.param


@pytest.fixture
def native_and_hooked(variant):
    from sae_vision_ext import HookedViT

    native = build_native(variant)
    hooked = HookedViT.from_model(native, model_name=variant)
    return native, hooked


@pytest.fixture(scope="module")
def seed_setup():
    """A 3-block float64 ViT with layer_norm TopK SAEs on blocks 0 and 1 (none after the last block,
    as in the paper), a reference set and one traced image."""
    torch.manual_seed(0)
    native = _timm(depth=3).eval()
    with torch.no_grad():
        for p in native.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model = HookedViT.from_model(native).double()
    saes = [make_sae("topk", "layer_norm", True, d_in=32, d_sae=24, seed=layer, hook=f"blocks.{layer}.hook_resid_post")
            for layer in (0, 1)]  # fmt: skip
    rrm = ResidualReplacementModel(model, saes)
    ref_pixels = images(6, seed=5).double()
    return (
        rrm,
        images(1).double(),
        rrm.reference_values(ref_pixels, "median"),
        rrm.reference_values(ref_pixels, "median", of="errors"),
    )
