"""Labelled attributes of images for ``analyse_features`` (``vis/analysis.py``): :class:`Attribute`
(codes checked at construction: integer class ids or strings mapped through the value names, every
value with a positive and a negative) and the shapes set's ground truth (:func:`shapes_attributes`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from ..data.shapes import ShapesData

logger = logging.getLogger(__name__)

Kind = Literal["class", "colour", "texture", "position", "other"]
KINDS = ("class", "colour", "texture", "position", "other")


def _codes_from_strings(name: str, arr: np.ndarray, names: Sequence[str]) -> np.ndarray:
    lookup = {str(n): i for i, n in enumerate(names)}
    flat = [str(v) for v in arr.ravel()]
    bad = next((v for v in flat if v not in lookup), None)
    if bad is not None:
        raise ValueError(
            f"Attribute {name!r}: value {bad!r} is not one of its names {list(names)}. String values are "
            "mapped to codes through `names`; give every string a name, or pass integer class ids (-1: "
            "unknown), e.g. `names, codes = np.unique(strings, return_inverse=True)`."
        )
    return np.array([lookup[v] for v in flat], dtype=np.int64).reshape(arr.shape)


def _as_codes(name: str, values: Any, names: Sequence[str]) -> Tensor:
    """Integer codes from ints, bools, integral floats or strings (mapped through ``names``)."""
    arr = values.detach().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values)
    if arr.dtype.kind == "O" and all(isinstance(v, str) for v in arr.ravel()):
        arr = arr.astype(str)
    if arr.dtype.kind in "US":
        return torch.from_numpy(_codes_from_strings(name, arr, names))
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            raise ValueError(
                f"Attribute {name!r}: codes must be integer class ids (-1: unknown); got {float(arr[bad][0])!r} at "
                f"index {tuple(int(i) for i in np.argwhere(bad)[0])}. Round or bin the values first "
                "(e.g. `np.digitize`)."
            )
    elif arr.dtype.kind not in "iub":
        raise ValueError(
            f"Attribute {name!r}: codes must be integer class ids (-1: unknown) or strings from `names`; "
            f"got an array of dtype {arr.dtype}. Map labels to ids with "
            "`names, codes = np.unique(labels, return_inverse=True)`."
        )
    return torch.from_numpy(arr.astype(np.int64))


@dataclass
class Attribute:
    """One labelled attribute of the images."""

    name: str
    """Shown in labels and tables, e.g. ``shape``."""
    values: Any
    """Codes: ``[n]`` per image or ``[n, n_patches]`` per patch. Integer class ids (``-1``: unknown;
    integral floats and bools accepted) or strings, mapped to ids through ``names``."""
    names: Sequence[str]
    """Name of each code (at least two)."""
    level: Literal["image", "patch"] = "image"
    """Whether a feature is scored per image (its maximum over tokens) or per patch."""
    kind: Kind = "other"
    """Feature type a best match on this attribute gives."""
    not_a_label: tuple[int, ...] = ()
    """Codes scored but never a feature's best match (the absent value of a yes/no attribute, whose
    one-against-the-rest AUROC only mirrors the present value's)."""

    def __post_init__(self) -> None:
        if self.level not in ("image", "patch"):
            raise ValueError(f"Attribute {self.name!r}: level must be 'image' or 'patch'; got {self.level!r}.")
        if self.kind not in KINDS:
            raise ValueError(f"Attribute {self.name!r}: kind must be one of {list(KINDS)}; got {self.kind!r}.")
        if len(self.names) < 2:
            raise ValueError(
                f"Attribute {self.name!r} has {len(self.names)} value name(s) {list(self.names)}; at least two "
                "values are needed (each value's AUROC compares it with the others)."
            )
        self.values = _as_codes(self.name, self.values, self.names)
        self._validate()

    def _validate(self) -> None:
        """Shape, code range and a defined AUROC for every value (a positive and a negative)."""
        want = 1 if self.level == "image" else 2
        if self.values.ndim != want:
            raise ValueError(
                f"Attribute {self.name!r}: {self.level} values must have {want} dimension(s) "
                f"([n]{'' if want == 1 else ', n_patches'}); got shape {tuple(self.values.shape)}."
            )
        k = len(self.names)
        if self.values.numel() and int(self.values.max()) >= k:
            raise ValueError(f"Attribute {self.name!r}: code {int(self.values.max())} has no name ({k} names).")
        if self.values.numel() and int(self.values.min()) < -1:
            raise ValueError(
                f"Attribute {self.name!r}: code {int(self.values.min())} is invalid; codes are 0 .. {k - 1}, "
                "-1 for unknown."
            )
        bad = [c for c in self.not_a_label if not 0 <= c < k]
        if bad:
            raise ValueError(f"Attribute {self.name!r}: not_a_label code {bad[0]} is not in 0 .. {k - 1}.")
        known = self.values[self.values >= 0]
        counts = torch.bincount(known, minlength=k).tolist()
        present = [self.names[c] for c in range(k) if counts[c]]
        if len(present) < 2:
            raise ValueError(
                f"Attribute {self.name!r}: only {present or 'no value'} occurs among {len(known)} labelled "
                f"{self.level}s; at least two values are needed for an AUROC."
            )
        lacking = counts.index(0) if 0 in counts else None
        if lacking is not None:
            raise ValueError(
                f"Attribute {self.name!r}: value {self.names[lacking]!r} (code {lacking}) labels none of the "
                f"{len(known)} labelled {self.level}s, so its AUROC is undefined (each value needs a positive "
                "and a negative). Add samples with it or drop it from `names` (and renumber the codes)."
            )


def shapes_attributes(data: ShapesData, grid: tuple[int, int], image_size: int) -> list[Attribute]:
    """The shapes set's ground truth as attributes: per image shape, colour, background, marker, size
    (three bins), rotation (four), the object's cell on a 3x3 grid; per patch the patch position and
    whether the patch holds the marker (top-left patch of marked images). Values absent from these
    images are left out (a small set misses object cells), and so is an attribute left with one value
    (the marker on unmarked images); both logged at INFO."""
    from ..data.shapes import BACKGROUNDS, COLOURS, SHAPES

    f = data.factors
    n = len(data.labels)
    gh, gw = grid
    size = np.digitize(f["size"], np.quantile(f["size"], [1 / 3, 2 / 3]))
    rotation = (np.asarray(f["rotation"]) // (np.pi / 2)).astype(int) % 4
    cell = (
        np.minimum(np.asarray(f["cy"]) * 3 // image_size, 2) * 3 + np.minimum(np.asarray(f["cx"]) * 3 // image_size, 2)
    ).astype(int)
    patch = np.broadcast_to(np.arange(gh * gw), (n, gh * gw))
    marker_patch = np.zeros((n, gh * gw), dtype=int)
    marker_patch[:, 0] = np.asarray(f["marker"]).astype(int)
    specs = [
        ("shape", data.labels, list(SHAPES), {"kind": "class"}),
        ("colour", f["colour"], list(COLOURS), {"kind": "colour"}),
        ("background", f["background"], list(BACKGROUNDS), {"kind": "texture"}),
        ("marker", f["marker"], ["no marker", "marker"], {"not_a_label": (0,)}),
        ("size", size, ["small", "medium", "large"], {}),
        ("rotation", rotation, ["0-90°", "90-180°", "180-270°", "270-360°"], {}),
        ("object cell", cell, [f"cell ({r},{c})" for r in range(3) for c in range(3)], {"kind": "position"}),
        ("patch", patch, [f"p({r},{c})" for r in range(gh) for c in range(gw)], {"level": "patch", "kind": "position"}),
        ("marker patch", marker_patch, ["other patch", "marker patch"], {"level": "patch", "not_a_label": (0,)}),
    ]
    out = []
    for name, codes, names, kw in specs:
        codes = np.asarray(codes).astype(np.int64)
        present = np.flatnonzero(np.bincount(codes.ravel(), minlength=len(names)))
        if len(present) < 2:
            logger.info("shapes_attributes: %r takes one value on these %d images; left out", name, n)
            continue
        if len(present) < len(names):  # a small set misses some values (e.g. object cells): keep those present
            logger.info("shapes_attributes: %r keeps the %d of %d values present", name, len(present), len(names))
            new = np.full(len(names), -1)
            new[present] = np.arange(len(present))
            kw = dict(kw, not_a_label=tuple(int(new[c]) for c in kw.get("not_a_label", ()) if new[c] >= 0))
            codes, names = new[codes], [names[c] for c in present]
        out.append(Attribute(name, codes, names, **kw))
    return out
