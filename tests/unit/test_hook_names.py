"""Hook names are built and read in one place (``sae_vision_ext/_hooks.py``) and agree with the model."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from sae_vision_ext._hooks import block_hook, layer_of, resid_post, sae_acts, sae_error

PACKAGE = Path(__file__).resolve().parents[2] / "sae_vision_ext"


def test_helpers_round_trip_and_match_the_hooked_model():
    from helpers import build_native

    from sae_vision_ext import HookedViT

    model = HookedViT.from_model(build_native("timm_cls"))
    for layer in range(model.cfg.n_layers):
        assert resid_post(layer) in model.hook_dict and layer_of(resid_post(layer)) == layer
        assert block_hook(layer, "attn.hook_pattern") in model.hook_dict
    assert sae_acts("blocks.3.hook_resid_post") == "blocks.3.hook_resid_post.hook_sae_acts_post"
    assert sae_error("blocks.3.hook_resid_post") == "blocks.3.hook_resid_post.hook_sae_error"
    assert layer_of("hook_embed") is None and layer_of("blocks.x.hook_resid_post") is None
    assert layer_of("blocks.12.mlp.hook_post") == 12


@pytest.mark.parametrize("module", sorted(p for p in PACKAGE.rglob("*.py") if p.name != "_hooks.py"), ids=str)
def test_no_module_builds_residual_or_sae_hook_names_by_hand(module):
    """f-strings that spell ``blocks.{...}.hook_resid_post`` or ``{...}.hook_sae_*`` belong in _hooks.py."""
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
            has_expr = any(isinstance(v, ast.FormattedValue) for v in node.values)
            if has_expr and text.startswith(("blocks.", ".hook_resid_post")) and text.endswith(".hook_resid_post"):
                pytest.fail(f"{module.relative_to(PACKAGE)}:{node.lineno} builds a resid_post name by hand")
            if has_expr and (text.endswith(".hook_sae_acts_post") or text.endswith(".hook_sae_error")):
                pytest.fail(f"{module.relative_to(PACKAGE)}:{node.lineno} builds an SAE hook name by hand")
