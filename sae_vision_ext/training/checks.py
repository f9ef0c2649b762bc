"""Checks of a training config against the loaded model, run before any harvest or cache build: every
hook exists, ``per_layer`` names trained hooks, the device is usable, and ``k <= d_sae`` per hook."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..models.hooked_vit import HookedViT
    from .config import VisionSAETrainingConfig


def sae_width(cfg: VisionSAETrainingConfig, hook: str, d_in: int) -> int:
    """``d_sae`` of ``hook``'s SAE: its (per-layer) ``d_sae``, else ``expansion_factor x d_in``."""
    return int(cfg.for_hook(hook, "d_sae") or round(cfg.for_hook(hook, "expansion_factor") * d_in))


def check_widths(cfg: VisionSAETrainingConfig, model: HookedViT, hooks: list[str]) -> None:
    """For architectures with a ``k``: ``k <= d_sae`` for every hook, checked as soon as the model is known
    (before any harvesting or cache build); ``ValueError`` naming the hook, k, d_sae and d_in."""
    import dataclasses

    from sae_lens.registry import get_sae_training_class

    config_cls = get_sae_training_class(cfg.architecture)[1] if cfg.architecture != "topk" else None
    if config_cls is not None and "k" not in {f.name for f in dataclasses.fields(config_cls)}:
        return
    widths = model.hook_shapes(batch_size=1)
    for hook in hooks:
        d_in, k = widths[hook][-1], int(cfg.for_hook(hook, "k"))
        d_sae = sae_width(cfg, hook, d_in)
        if k > d_sae:
            raise ValueError(
                f"{hook}: k={k} is larger than its d_sae={d_sae} (expansion_factor "
                f"{cfg.for_hook(hook, 'expansion_factor')} x d_in {d_in}, or d_sae): a token cannot have more active "
                f"features than the SAE has. Lower k to at most {d_sae}, or widen the SAE (d_sae / expansion_factor)."
            )


def check_hooks(cfg: VisionSAETrainingConfig, model: HookedViT, hooks: list[str]) -> None:
    """Every hook to train exists on ``model`` and every ``per_layer`` key names one of them; the device
    is usable. ``ValueError`` naming the value, with close valid names."""
    from .._registry import unknown_name_message

    valid = list(model.hook_dict)
    for hook in hooks:
        if hook not in model.hook_dict:
            raise ValueError(unknown_name_message(f"hook of {cfg.model_name}", hook, valid))
    for hook in cfg.per_layer:
        if hook not in hooks:
            raise ValueError(
                f"per_layer names {hook!r}, which this run does not train; "
                + unknown_name_message("trained hook", hook, hooks).split(". ", 1)[-1]
            )
    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device!r} but torch sees no CUDA device here; use device='cpu'.")
