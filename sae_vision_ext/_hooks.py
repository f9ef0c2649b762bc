"""Hook names, built and read in one place (TransformerLens's names, as its ``utils.get_act_name`` does).

``resid_post(3)`` is ``"blocks.3.hook_resid_post"``; an SAE spliced at hook ``h`` exposes
SAELens's ``f"{h}.hook_sae_acts_post"`` (``sae_acts(h)``) and ``f"{h}.hook_sae_error"``
(``sae_error(h)``); ``layer_of("blocks.3.hook_resid_post")`` is ``3`` (``None`` for hooks outside
the blocks, such as ``hook_embed``).
"""

from __future__ import annotations

import re

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def block_hook(layer: int, name: str) -> str:
    """``blocks.{layer}.{name}``, e.g. ``block_hook(2, "attn.hook_pattern")``."""
    return f"blocks.{layer}.{name}"


def resid_post(layer: int) -> str:
    """The residual stream after block ``layer``: ``blocks.{layer}.hook_resid_post``."""
    return block_hook(layer, "hook_resid_post")


def sae_acts(hook_name: str) -> str:
    """SAELens's feature activations of an SAE spliced at ``hook_name``."""
    return f"{hook_name}.hook_sae_acts_post"


def sae_error(hook_name: str) -> str:
    """SAELens's error term of an SAE spliced at ``hook_name`` (``use_error_term=True``)."""
    return f"{hook_name}.hook_sae_error"


def layer_of(hook_name: str) -> int | None:
    """The block number a hook name belongs to, or ``None`` outside the blocks."""
    m = _BLOCK.match(hook_name)
    return int(m.group(1)) if m else None
