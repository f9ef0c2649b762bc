"""NaFlex inputs: images at their own (height, width), as one padded batch of patch sequences.

``HookedViT`` takes ``pixels [batch, 3, H, W]`` for every family. NaFlex families (HF
``Siglip2VisionModel``, timm ``NaFlexVit``) patchify the images themselves and also take images of
different sizes, either as

- a list of ``[3, h_i, w_i]`` tensors, or
- a padded batch ``[batch, 3, H, W]`` with ``image_sizes=[(h_i, w_i), ...]`` (each image in the
  top-left corner of its slot; the rest is ignored).

Image ``i`` becomes ``rows_i * cols_i`` patch tokens (row-major, ``rows_i = h_i // patch``), padded
with zero patches to the longest sequence of the batch. :class:`NaFlexBatch` holds the patches,
which are real (``patch_valid``) and each image's ``(rows, cols)`` grid; after a forward
``HookedViT.token_mask`` (``[batch, pos]``, prefix tokens included, ``True`` for real tokens) and
``HookedViT.grid_sizes`` say the same per token position. Attention masks the padding keys, as the
native models do; padding tokens never enter a cache, a harvest, statistics or a graph.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

if TYPE_CHECKING:
    from .hooked_vit import HookedViT

ImageSizes = Sequence[tuple[int, int]] | Tensor | None
Pixels = Tensor | Sequence[Tensor]


@dataclass(eq=False)
class NaFlexBatch:
    """Patch sequences of images of their own sizes, padded to one length."""

    patches: Float[Tensor, "batch n_patches patch_dim"]
    """Each patch flattened channels-last (``patch_row, patch_col, channel``), as SigLIP 2 and timm
    NaFlex take them; padding patches are zero."""
    patch_valid: Bool[Tensor, "batch n_patches"]
    """``True`` for the real patches of each image (the first ``rows * cols``), ``False`` for padding."""
    patch_coord: Int[Tensor, "batch n_patches 2"]
    """``(row, col)`` of each patch in its image (zero for padding): timm's ``patch_coord``."""
    grid_sizes: list[tuple[int, int]]
    """``(rows, cols)`` of each image's patch grid."""

    @property
    def padded(self) -> bool:
        """True when some image has fewer patches than the sequence length (a mask is needed)."""
        return not bool(self.patch_valid.all())

    @property
    def spatial_shapes(self) -> Int[Tensor, "batch 2"]:
        """``(rows, cols)`` per image as a tensor (HF SigLIP 2's ``spatial_shapes``)."""
        return torch.tensor(self.grid_sizes, dtype=torch.long, device=self.patches.device)

    def token_mask(self, n_prefix: int) -> Bool[Tensor, "batch pos"]:
        """``True`` for the real tokens of each image: its prefix tokens, then its patches."""
        prefix = self.patch_valid.new_ones(self.patch_valid.shape[0], n_prefix)
        return torch.cat([prefix, self.patch_valid], dim=1)


def image_list(pixels: Pixels, image_sizes: ImageSizes = None) -> list[Tensor]:
    """The batch as a list of ``[chan, h, w]`` images: a list passes through, a padded batch is cut
    to ``image_sizes`` (pixels, per image), a plain batch is split. ``ValueError`` on a size that does
    not fit its slot or a count that does not match."""
    if isinstance(pixels, Tensor):
        if pixels.ndim != 4:
            raise ValueError(
                f"Expected images as a [batch, channels, height, width] tensor, got {tuple(pixels.shape)}; add a "
                "batch dim with x[None], or pass a list of [channels, height, width] images."
            )
        if image_sizes is None:
            return list(pixels.unbind(0))
        sizes = [
            tuple(int(v) for v in s) for s in (image_sizes.tolist() if isinstance(image_sizes, Tensor) else image_sizes)
        ]
        if len(sizes) != pixels.shape[0]:
            raise ValueError(
                f"image_sizes has {len(sizes)} entries for a batch of {pixels.shape[0]} images; give one (height, "
                "width) per image."
            )
        out = []
        for i, (h, w) in enumerate(sizes):
            if not (0 < h <= pixels.shape[-2] and 0 < w <= pixels.shape[-1]):
                raise ValueError(
                    f"image_sizes[{i}] = {(h, w)} does not fit the padded batch's {tuple(pixels.shape[-2:])} slots; "
                    "each image sits top-left in its slot, sizes in pixels."
                )
            out.append(pixels[i, :, :h, :w])
        return out
    if image_sizes is not None:
        raise ValueError("image_sizes goes with a padded batch tensor; a list of images carries its own sizes.")
    images = list(pixels)
    if not images or not all(isinstance(t, Tensor) for t in images):
        raise ValueError(
            "Expected a [batch, chan, h, w] tensor or a non-empty list of [chan, h, w] tensors, got "
            f"{type(pixels).__name__} of {[type(t).__name__ for t in images[:3]]}."
        )
    return [t[0] if t.ndim == 4 and t.shape[0] == 1 else t for t in images]


def stack_same_size(pixels: Pixels, image_sizes: ImageSizes = None) -> Tensor:
    """For a fixed-grid model: a batch tensor, or ``ValueError`` when the images differ in size."""
    if isinstance(pixels, Tensor) and image_sizes is None:
        return pixels
    images = image_list(pixels, image_sizes)
    sizes = sorted({tuple(t.shape[-2:]) for t in images})
    if len(sizes) > 1:
        raise ValueError(
            f"Images of {len(sizes)} different sizes {sizes[:4]}: this model takes one size per batch. Resize "
            "them with model.preprocess, or use a NaFlex model (HF Siglip2VisionModel, timm NaFlexVit), which "
            "takes each image at its own size."
        )
    return torch.stack(images)


def patchify(images: Sequence[Tensor], patch_size: int, n_patches: int | None = None) -> NaFlexBatch:
    """Patch sequences of ``images`` (each height and width a multiple of ``patch_size``), padded to
    ``n_patches`` (default: the longest). Patches are flattened channels-last, row-major."""
    p = patch_size
    seqs, grids = [], []
    for i, img in enumerate(images):
        c, h, w = img.shape
        if h % p or w % p:
            raise ValueError(
                f"Image {i} is {h}x{w}, not a multiple of the patch size {p}. Resize or crop it to a multiple "
                f"(e.g. {max(p, h // p * p)}x{max(p, w // p * p)})."
            )
        rows, cols = h // p, w // p
        seqs.append(img.reshape(c, rows, p, cols, p).permute(1, 3, 2, 4, 0).reshape(rows * cols, p * p * c))
        grids.append((rows, cols))
    length = max(len(s) for s in seqs) if n_patches is None else n_patches
    if max(len(s) for s in seqs) > length:
        raise ValueError(f"An image has {max(len(s) for s in seqs)} patches, more than n_patches={length}.")
    first = seqs[0]
    patches = first.new_zeros(len(seqs), length, first.shape[-1])
    valid = torch.zeros(len(seqs), length, dtype=torch.bool, device=first.device)
    coord = torch.zeros(len(seqs), length, 2, dtype=torch.long, device=first.device)
    for i, (seq, (_rows, cols)) in enumerate(zip(seqs, grids, strict=True)):
        n = len(seq)
        patches[i, :n], valid[i, :n] = seq, True
        index = torch.arange(n, device=first.device)
        coord[i, :n, 0], coord[i, :n, 1] = index // cols, index % cols
    return NaFlexBatch(patches=patches, patch_valid=valid, patch_coord=coord, grid_sizes=grids)


def is_image_list(pixels: object) -> bool:
    """True for a list of ``[chan, h, w]`` images (sizes may differ), as opposed to a batch tensor or a
    list of batches."""
    return (
        isinstance(pixels, (list, tuple))
        and bool(pixels)
        and all(isinstance(t, Tensor) and t.ndim == 3 for t in pixels)
    )


def take(pixels: Pixels, index: Sequence[int] | slice) -> Pixels:
    """Images ``index`` of a batch tensor (a tensor) or of a list of images (a list)."""
    if isinstance(pixels, Tensor):
        return pixels[index] if isinstance(index, slice) else pixels[list(index)]
    return list(pixels[index]) if isinstance(index, slice) else [pixels[i] for i in index]


def patch_maps(patch_values: Tensor, grid_sizes: Sequence[tuple[int, int]]) -> Tensor | list[Tensor]:
    """``[batch, n_patches]`` values -> each image's ``[rows, cols]`` map (padding dropped): one stacked
    tensor when every grid is the same, else a list."""
    maps = [patch_values[i, : r * c].reshape(r, c) for i, (r, c) in enumerate(grid_sizes)]
    return torch.stack(maps) if len(set(grid_sizes)) == 1 else maps


def naflex_size(height: int, width: int, patch_size: int, max_patches: int) -> tuple[int, int]:
    """The (height, width) SigLIP 2's processor resizes an image to: the largest scale whose size, each side
    rounded up to a multiple of ``patch_size`` (at least one patch), has at most ``max_patches`` patches
    (``get_image_size_for_max_num_patches``: the same binary search)."""

    def side(scale: float, size: int) -> int:
        return max(patch_size, math.ceil(size * scale / patch_size) * patch_size)

    lo, hi = 1e-6, 100.0
    while hi - lo >= 1e-5:
        mid = (lo + hi) / 2
        if (side(mid, height) // patch_size) * (side(mid, width) // patch_size) <= max_patches:
            lo = mid
        else:
            hi = mid
    return side(lo, height), side(lo, width)


def preprocess_naflex(model: HookedViT, images: Sequence[object], max_patches: int | None = None) -> list[Tensor]:
    """Each image (PIL, ``[h, w, c]`` numpy or ``[c, h, w]`` tensor) resized to its :func:`naflex_size`
    (aspect ratio kept, at most ``max_patches`` patches; default the model's ``cfg.n_patches``) and
    normalised by the model's own preprocessing: a list for ``model(list)`` and the harvest."""
    from ..data.transforms import transform_from_data_config

    cfg, p = model.cfg, model.cfg.patch_size
    budget = max_patches or cfg.n_patches
    out = []
    for img in images:
        if hasattr(img, "size") and not isinstance(img, Tensor) and not hasattr(img, "shape"):  # PIL
            w, h = img.size
        else:
            shape = tuple(img.shape)
            h, w = shape[-2:] if isinstance(img, Tensor) else shape[:2]
        size = naflex_size(int(h), int(w), p, budget)
        data = model.data_config | {"input_size": (cfg.in_chans, *size), "crop_pct": 1.0}
        out.append(transform_from_data_config(data)(img))
    return out
