"""Checks of what users pass as images and beside them: a non-empty batch, labels (one class id per image)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def check_labels(labels: Tensor | Sequence[int], n_images: int | None, n_classes: int | None = None) -> Tensor:
    """``labels`` as an int64 tensor ``[n_images]`` of class ids, or ``ValueError`` naming what is wrong:
    not 1-D, not integers (fractions are never truncated), negative, ``>= n_classes``, or a length other
    than ``n_images`` (when known)."""
    t = torch.as_tensor(labels)
    if t.ndim != 1:
        raise ValueError(f"labels must be 1-D (one class id per image), got shape {tuple(t.shape)}.")
    if t.is_floating_point():
        if not torch.equal(t, t.round()):
            raise ValueError("labels hold fractional values; pass integer class ids (one per image).")
        t = t.long()
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"labels are {t.dtype}; pass integer class ids (one per image).")
    t = t.long()
    if n_images is not None and len(t) != n_images:
        raise ValueError(f"labels has {len(t)} entries for {n_images} images; pass one label per image.")
    if len(t) and int(t.min()) < 0:
        raise ValueError(f"labels contain {int(t.min())}; class ids start at 0.")
    if n_classes is not None and len(t) and int(t.max()) >= n_classes:
        raise ValueError(f"labels contain class {int(t.max())} but n_classes={n_classes} (ids 0..{n_classes - 1}).")
    return t


def check_images(
    what: str, pixels: Tensor, labels: Tensor | Sequence[int] | None = None, batch_size: int | None = None
) -> Tensor | None:
    """The one check of an image set a function reads: ``ValueError`` (naming ``what``) for 0 images or a
    ``batch_size`` below 1; returns ``labels`` checked by :func:`check_labels` (or ``None``)."""
    if len(pixels) == 0:
        raise ValueError(f"{what} got 0 images; pass at least one preprocessed image [n, chan, h, w].")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1.")
    return None if labels is None else check_labels(labels, len(pixels))
