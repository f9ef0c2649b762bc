"""Preprocessing built from a model family's data config (timm's ``resolve_data_config`` keys).

:class:`Preprocess` is what ``HookedViT.preprocess`` returns. Its contract (docs/hooked_vit.md, "Input
checks"):

- one image -> ``[chan, h, w]``; a list/tuple of images, a ``[n, chan, h, w]`` tensor or a ``[n, h, w, chan]``
  numpy array -> ``[n, chan, h, w]`` (float32, normalised with the model's mean and std);
- PIL images of any mode are converted to RGB as timm's and torchvision's loaders do (RGBA and LA drop
  alpha, L and P are expanded); numpy arrays are channels-last (``[h, w, chan]``, numpy's and PIL's
  convention), tensors channels-first (``[chan, h, w]``, torch's): a channels-last tensor is refused with
  the ``permute`` that fixes it; one channel is repeated to three, a fourth channel is dropped as alpha
  with a warning;
- ``uint8`` is scaled by 1/255; floats are taken as ``[0, 1]`` pixels. Floats well outside ``[0, 1]`` look
  already preprocessed: normalising them again moves them by about 2, so this warns (pass such
  tensors straight to the model); other integer dtypes and empty inputs raise ``ValueError``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
_OUT_OF_RANGE = 1e-3
"""How far outside ``[0, 1]`` a float image may reach before it is taken as already normalised."""


class Preprocess:
    """Resize (to size / crop_pct), centre-crop, scale to [0, 1], normalise; see the module docstring for
    what it accepts. Picklable, so it can be a ``Dataset``'s transform in data-loader workers."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        from torchvision.transforms import InterpolationMode, v2

        c, h, w = cfg["input_size"]
        interp = cfg.get("interpolation", "bicubic")
        if interp not in _INTERPOLATIONS:
            raise ValueError(f"Unknown interpolation {interp!r}; valid: {_INTERPOLATIONS}.")
        crop_pct = float(cfg.get("crop_pct", 1.0) or 1.0)
        scale = (math.floor(h / crop_pct), math.floor(w / crop_pct))
        self.in_chans, self.size = int(c), (int(h), int(w))
        self.mean, self.std = list(cfg["mean"]), list(cfg["std"])
        self.transform = v2.Compose(
            [
                v2.Resize(scale, interpolation=InterpolationMode(interp), antialias=True),
                v2.CenterCrop((h, w)),
                v2.Normalize(mean=self.mean, std=self.std),
            ]
        )

    def __repr__(self) -> str:
        return f"Preprocess(size={self.size}, mean={self.mean}, std={self.std}, transform={self.transform})"

    def __call__(self, images: Any) -> Tensor:
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("preprocess got an empty list of images; pass at least one image.")
            return torch.stack([self.transform(self._to_unit(im, f"image {i}")) for i, im in enumerate(images)])
        return self.transform(self._to_unit(images, "the image"))

    # ------------------------------------------------------------------ conversion to [chan, h, w] in [0, 1]
    def _to_unit(self, image: Any, what: str) -> Tensor:
        """``image`` as float32 ``[.., chan, h, w]`` in [0, 1] with ``self.in_chans`` channels."""
        import numpy as np
        from PIL import Image

        if isinstance(image, Image.Image):
            if self.in_chans == 3 and image.mode != "RGB":
                image = image.convert("RGB")
            image = np.array(image)  # a writable copy (np.asarray of a PIL image is read-only)
        if isinstance(image, np.ndarray):
            t = torch.from_numpy(np.ascontiguousarray(image) if image.flags.writeable else np.array(image))
            if t.ndim == 2:
                t = t[..., None]
            if t.ndim not in (3, 4):
                raise ValueError(f"preprocess: {what} is a numpy array of shape {image.shape}; expected [h, w, chan].")
            t = t.movedim(-1, -3)  # numpy images are channels-last
        elif isinstance(image, Tensor):
            t = image if image.ndim != 2 else image[None]
            if t.ndim not in (3, 4):
                raise ValueError(
                    f"preprocess: {what} is a tensor of shape {tuple(image.shape)}; expected [chan, h, w] or "
                    "[n, chan, h, w]."
                )
            if t.shape[-3] not in (1, 3, 4) and t.shape[-1] in (1, 3, 4):
                order = "(0, 3, 1, 2)" if t.ndim == 4 else "(2, 0, 1)"
                raise ValueError(
                    f"preprocess: {what} is a channels-last tensor {tuple(t.shape)}; tensors are [chan, h, w]: "
                    f"use x.permute{order}."
                )
        else:
            raise ValueError(
                f"preprocess: {what} is a {type(image).__name__}; pass a PIL image, a numpy array [h, w, chan], "
                "a tensor [chan, h, w] or a list of them."
            )
        if t.ndim == 4 and len(t) == 0:
            raise ValueError("preprocess got an empty batch (0 images); pass at least one image.")
        return self._fix_channels(self._scale(t, what), what)

    def _scale(self, t: Tensor, what: str) -> Tensor:
        if t.dtype == torch.uint8:
            return t.to(torch.float32) / 255.0
        if not t.is_floating_point():
            raise ValueError(
                f"preprocess: {what} is {t.dtype}; pass uint8 (0..255) or float pixels in [0, 1] "
                "(e.g. (x / x.max()).float() for 16-bit images)."
            )
        t = t.to(torch.float32)
        lo, hi = float(t.min()), float(t.max())
        if lo < -_OUT_OF_RANGE or hi > 1 + _OUT_OF_RANGE:
            warnings.warn(
                f"preprocess: {what} has float values in [{lo:.3g}, {hi:.3g}], outside [0, 1]: it looks already "
                "preprocessed (normalised), and normalising it again moves its values by about 2. Pass "
                "preprocessed pixels straight to the model; give preprocess uint8 or [0, 1] images.",
                UserWarning,
                stacklevel=4,
            )
        return t

    def _fix_channels(self, t: Tensor, what: str) -> Tensor:
        c = t.shape[-3]
        if c == self.in_chans:
            return t
        if c == 1:
            return t.expand(*t.shape[:-3], self.in_chans, *t.shape[-2:])
        if c == 4 and self.in_chans == 3:
            warnings.warn(
                f"preprocess: {what} has 4 channels; taking them as RGBA and dropping alpha (as PIL's "
                "convert('RGB') does).",
                UserWarning,
                stacklevel=4,
            )
            return t[..., :3, :, :]
        raise ValueError(f"preprocess: {what} has {c} channels; this model takes {self.in_chans}.")


def transform_from_data_config(cfg: dict[str, Any]) -> Preprocess:
    """The :class:`Preprocess` for a data config (``input_size``, ``mean``, ``std``, ``interpolation``,
    ``crop_pct``)."""
    return Preprocess(cfg)
