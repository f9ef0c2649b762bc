"""Finding the four SAE tensors inside another project's state dict."""

from __future__ import annotations

from typing import Any

import torch

WEIGHT_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")


def find_weights(obj: Any, what: str, extra: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` (and any ``extra`` keys present) from ``obj``: a state
    dict, or a dict holding one under ``state_dict``/``autoencoder``/``model``, or keys with a module
    prefix (``sae.W_enc``). ``ValueError`` naming the keys found otherwise."""
    if isinstance(obj, dict) and all(k in obj for k in WEIGHT_KEYS):
        return {k: obj[k] for k in (*WEIGHT_KEYS, *extra) if k in obj}
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "autoencoder", "model"):
            if isinstance(obj.get(key), dict):
                return find_weights(obj[key], what, extra)
        wanted = (*WEIGHT_KEYS, *extra)
        suffixed = {k.rsplit(".", 1)[-1]: v for k, v in obj.items() if k.rsplit(".", 1)[-1] in wanted}
        if all(k in suffixed for k in WEIGHT_KEYS):
            return suffixed
    found = ", ".join(sorted(map(str, obj))[:12]) if isinstance(obj, dict) else type(obj).__name__
    raise ValueError(f"No SAE weights ({', '.join(WEIGHT_KEYS)}) in {what}; it holds: {found}.")
