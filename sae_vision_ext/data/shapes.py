"""A procedural, seeded image set of coloured geometric shapes on textured backgrounds.

Image ``i`` of a set depends only on ``(seed, i)`` and the set's options, so any subset can be
regenerated exactly. Each image has a class (its shape) and factors: colour, centre, size,
rotation, background kind, and whether the spurious marker (a small magenta square in the top-left
corner) is present. With ``spurious_class`` set, the marker appears on ``spurious_rate`` of that
class's images and ``other_marker_rate`` of the rest: a shortcut a classifier can learn. With
``balanced=True`` the marker is on half of every class's images, independent of the class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 40),
    "green": (40, 180, 60),
    "blue": (40, 90, 230),
    "yellow": (235, 210, 40),
    "cyan": (40, 200, 210),
    "orange": (245, 130, 30),
    "white": (240, 240, 240),
}
BACKGROUNDS: tuple[str, ...] = ("noise", "stripes", "checker", "gradient")
MARKER_COLOUR = (255, 0, 255)


@dataclass
class ShapesData:
    """``images`` uint8 ``[n, h, w, 3]``; ``labels`` int64 ``[n]`` (index into :data:`SHAPES`);
    ``factors`` maps a factor name to an ``[n]`` array."""

    images: np.ndarray
    labels: np.ndarray
    factors: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def tensors(self) -> tuple[Any, Any]:
        """``(images float [n, 3, h, w] in [0, 1], labels int64 [n])`` as torch tensors."""
        import torch

        x = torch.from_numpy(self.images).permute(0, 3, 1, 2).float().div_(255.0)
        return x, torch.from_numpy(self.labels)

    def groups(self) -> np.ndarray:
        """Group id ``2 * label + marker`` for worst-group accuracy."""
        return 2 * self.labels + self.factors["marker"].astype(np.int64)


def _shape_sdf(kind: str, px: np.ndarray, py: np.ndarray, r: float) -> np.ndarray:
    """Approximate signed distance (negative inside) of a shape of radius ``r`` at the origin."""
    if kind == "circle":
        return np.hypot(px, py) - r
    if kind == "square":
        s = 0.8 * r
        qx, qy = np.abs(px) - s, np.abs(py) - s
        return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)
    if kind == "triangle":
        angles = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        d = [px * np.cos(a + np.pi) + py * np.sin(a + np.pi) for a in angles]
        return np.max(np.stack(d), axis=0) - 0.5 * r
    if kind == "star":
        theta = np.arctan2(py, px)
        return np.hypot(px, py) - r * (0.62 + 0.38 * np.cos(5 * theta))
    if kind == "cross":
        w = 0.3 * r
        bar1 = np.maximum(np.abs(px) - r, np.abs(py) - w)
        bar2 = np.maximum(np.abs(px) - w, np.abs(py) - r)
        return np.minimum(bar1, bar2)
    if kind == "ring":
        return np.abs(np.hypot(px, py) - 0.75 * r) - 0.22 * r
    raise ValueError(f"Unknown shape {kind!r}; valid: {SHAPES}.")


def _background(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    c1 = rng.uniform(20, 120, 3)
    c2 = c1 + rng.uniform(-50, 50, 3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == "noise":
        t = rng.uniform(0, 1, (size, size))
    elif kind == "stripes":
        angle, period = rng.uniform(0, np.pi), rng.uniform(4, 12)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    elif kind == "checker":
        cell = int(rng.integers(4, 12))
        t = ((xx // cell + yy // cell) % 2).astype(np.float32)
    else:
        angle = rng.uniform(0, 2 * np.pi)
        t = (xx * np.cos(angle) + yy * np.sin(angle)) / size
        t = (t - t.min()) / (t.max() - t.min() + 1e-6)
    return c1 + t[..., None] * (c2 - c1)


def _marker_prob(label: int, spurious_class: int | None, rate: float, other_rate: float, balanced: bool) -> float:
    if balanced:
        return 0.5
    if spurious_class is None:
        return 0.0
    return rate if label == spurious_class else other_rate


def render_image(
    seed: int,
    index: int,
    image_size: int = 64,
    spurious_class: int | None = None,
    spurious_rate: float = 0.95,
    *,
    other_marker_rate: float = 0.0,
    balanced: bool = False,
    marker_size: int = 6,
) -> tuple[np.ndarray, int, dict[str, float]]:
    """Image ``index`` of the set with ``seed``: ``(uint8 [h, w, 3], label, factors)``."""
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(len(SHAPES)))
    colour = int(rng.integers(len(COLOURS)))
    bg = int(rng.integers(len(BACKGROUNDS)))
    radius = rng.uniform(0.14, 0.28) * image_size
    margin = radius + 1
    cx, cy = rng.uniform(margin, image_size - margin, 2)
    rot = rng.uniform(0, 2 * np.pi)
    marker = rng.uniform() < _marker_prob(label, spurious_class, spurious_rate, other_marker_rate, balanced)

    img = _background(rng, BACKGROUNDS[bg], image_size)
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    px, py = dx * np.cos(rot) + dy * np.sin(rot), -dx * np.sin(rot) + dy * np.cos(rot)
    alpha = np.clip(0.5 - _shape_sdf(SHAPES[label], px, py, radius), 0.0, 1.0)[..., None]
    fg = np.asarray(list(COLOURS.values())[colour], dtype=np.float32) * rng.uniform(0.8, 1.0)
    img = img * (1 - alpha) + fg * alpha
    img = img + rng.normal(0, 6, img.shape)
    if marker:
        img[1 : 1 + marker_size, 1 : 1 + marker_size] = MARKER_COLOUR
    factors = {
        "colour": colour, "background": bg, "cx": cx, "cy": cy,
        "size": radius, "rotation": rot, "marker": float(marker),
    }  # fmt: skip
    return np.clip(img, 0, 255).astype(np.uint8), label, factors


def make_shapes(
    n: int,
    seed: int = 0,
    image_size: int = 64,
    spurious_class: int | None = None,
    spurious_rate: float = 0.95,
    *,
    other_marker_rate: float = 0.0,
    balanced: bool = False,
    start: int = 0,
) -> ShapesData:
    """Images ``start .. start + n - 1`` of the set; see the module docstring for the options."""
    if n < 0 or image_size < 16:
        raise ValueError(f"Need n >= 0 and image_size >= 16, got n={n}, image_size={image_size}.")
    if spurious_class is not None and not 0 <= spurious_class < len(SHAPES):
        raise ValueError(f"spurious_class must be in [0, {len(SHAPES)}), got {spurious_class}.")
    for name, rate in (("spurious_rate", spurious_rate), ("other_marker_rate", other_marker_rate)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {rate}.")
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    factors: dict[str, list[float]] = {}
    for j in range(n):
        img, label, f = render_image(
            seed,
            start + j,
            image_size,
            spurious_class,
            spurious_rate,
            other_marker_rate=other_marker_rate,
            balanced=balanced,
        )
        images[j], labels[j] = img, label
        for k, v in f.items():
            factors.setdefault(k, []).append(v)
    arrays = {k: np.asarray(v) for k, v in factors.items()}
    arrays["shape"] = labels.copy()
    return ShapesData(images, labels, arrays)
