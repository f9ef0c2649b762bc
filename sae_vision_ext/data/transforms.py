"""Preprocessing built from a model family's data config (timm's ``resolve_data_config`` keys)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import Tensor

_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


def transform_from_data_config(cfg: dict[str, Any]) -> Callable[[Any], Tensor]:
    """Resize (to size / crop_pct), centre-crop, scale to [0, 1], normalise.

    Accepts PIL images and uint8 or float [0, 1] tensors ``[chan, h, w]`` or ``[batch, chan, h, w]``.
    """
    import torch
    from torchvision.transforms import InterpolationMode, v2

    _, h, w = cfg["input_size"]
    interp = cfg.get("interpolation", "bicubic")
    if interp not in _INTERPOLATIONS:
        raise ValueError(f"Unknown interpolation {interp!r}; valid: {_INTERPOLATIONS}.")
    crop_pct = float(cfg.get("crop_pct", 1.0) or 1.0)
    scale = (math.floor(h / crop_pct), math.floor(w / crop_pct))
    return v2.Compose(
        [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Resize(scale, interpolation=InterpolationMode(interp), antialias=True),
            v2.CenterCrop((h, w)),
            v2.Normalize(mean=list(cfg["mean"]), std=list(cfg["std"])),
        ]
    )
