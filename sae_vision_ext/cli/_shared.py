"""Helpers every command uses: progress lines, images, SAE references, labels, the replacement model."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..models import HookedViT

_OUT_FLAGS = {"out": "--out", "output_dir": "--output-dir", "cache_dir": "--cache-dir"}
"""Arguments naming a folder a command writes into (checked by :func:`_preflight` before any work)."""


def _step(message: str) -> None:
    """One progress line on stderr (stdout keeps the results)."""
    print(f"[sae-vision] {message}...", file=sys.stderr, flush=True)


def _load_images(model, dataset: str, n_images: int, seed: int):
    """Preprocessed images of an image source, and its labels and class names where the source has
    them (the registered shapes sets), for eval and dashboard commands."""
    import torch

    from ..data.sources import open_image_source

    ds = open_image_source(dataset, model.preprocess, n_images, seed)
    n = min(n_images, len(ds))
    pixels = torch.stack([ds[i] for i in range(n)])
    labels, names = ds.labels(n) if hasattr(ds, "labels") else (None, None)
    return pixels, labels, names


def _sae_refs(spec: str, model_id: str, n_layers: int) -> list[str]:
    """``sve`` (the shipped SAEs of an embedded model), a folder of SAE folders, or comma-separated refs."""
    from pathlib import Path

    if spec == "sve":
        return [f"{model_id}/blocks.{layer}.hook_resid_post" for layer in range(n_layers)]
    path = Path(spec)
    if path.is_dir() and not (path / "cfg.json").exists():
        refs = sorted(str(p.parent) for p in path.glob("*/cfg.json"))
        if not refs:
            raise ValueError(f"No SAE folders (cfg.json) inside {path}.")
        return refs
    return spec.split(",")


def _read_labels(path: str | None) -> dict[str, dict[int, str]] | None:
    """``labels.json`` of ``sae-vision analyse``: ``{hook: {feature: label}}``."""
    if path is None:
        return None
    import json

    fix = "write one with sae-vision analyse"
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--labels {path!r}: not a readable labels.json ({e}); {fix}.") from e
    try:
        if not isinstance(raw, dict) or not all(isinstance(feats, dict) for feats in raw.values()):
            raise TypeError("expected {hook: {feature: label}}")
        return {hook: {int(f): str(label) for f, label in feats.items()} for hook, feats in raw.items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"--labels {path!r}: not a labels.json of {{hook: {{feature: label}}}} ({e}); {fix}.") from e


def _check_out_dir(path: str | Path | None, flag: str = "--out") -> None:
    """Refuse an output folder that cannot be created, before any work: an existing file, a parent
    that is a file, or a parent without write permission. Every command that writes calls it (through
    :func:`_preflight`), so a bad path fails in a second, not after the run."""
    if path is None:
        return
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a file, not a folder; pass a folder path (created if missing).")
    parent = folder
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(
            f"{flag} {str(path)!r} cannot be created: {str(parent)!r} is a file, not a folder; "
            "pass a path under a folder."
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(
            f"{flag} {str(path)!r} cannot be created: no write permission in {str(parent)!r}; "
            "pass a folder you can write to."
        )


def _check_image_file(path: str, flag: str = "--image") -> None:
    """Refuse a path that is not an image file PIL can read, naming it (before the model loads)."""
    from PIL import Image

    if not Path(path).is_file():
        what = "a folder" if Path(path).is_dir() else "no such file"
        raise ValueError(f"{flag} {path!r}: {what}; pass one image file (PNG, JPEG, ...).")
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # PIL raises several kinds (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise ValueError(
            f"{flag} {path!r} is not an image PIL can read ({type(e).__name__}: {e}); pass a PNG, JPEG or "
            "other image file."
        ) from e


def _preflight(args: argparse.Namespace) -> None:
    """The checks every command gets before any work: output folders creatable, ``--image`` an image,
    ``--labels`` a labels.json."""
    for key, flag in _OUT_FLAGS.items():
        _check_out_dir(getattr(args, key, None), flag)
    if getattr(args, "image", None):
        _check_image_file(args.image)
    _read_labels(getattr(args, "labels", None))


def _check_class_id(model: Any, target: int | None) -> None:
    """``--target`` against the classes of a loaded classifier (before its SAEs load and the attribution)."""
    names = tuple(model.cfg.class_names)
    if target is None or not names or target < len(names):
        return
    listed = f" ({', '.join(names)})" if len(names) <= 20 else ""
    raise ValueError(
        f"--target {target}: {model.cfg.model_name} has {len(names)} classes, so class ids run "
        f"0..{len(names) - 1}{listed}. Pass one of those, or leave out --target for the predicted class."
    )


RANDOM_WEIGHTS_TAG = "@random-weights-seed0"
"""Appended to the model name of a cache harvested from ``--random-weights`` (its key then differs from the
pretrained model's, so neither cache is ever read for the other)."""


def load_model(model_id: str, random_weights: bool = False, device: str | None = None) -> HookedViT:
    """``HookedViT.from_pretrained(model_id)``; with ``random_weights`` the architecture with random weights
    (``pretrained=False``, seeded with 0 so every run builds the same model), downloading nothing."""
    import torch

    from ..models import HookedViT

    if not random_weights:
        return HookedViT.from_pretrained(model_id, device=device)
    torch.manual_seed(0)
    return HookedViT.from_pretrained(model_id, pretrained=False, device=device)


def _rrm(args: argparse.Namespace):
    """The replacement model of ``--model`` and ``--saes``; ``--target`` (trace) is checked against the
    model's classes before the SAEs load."""
    from ..circuits.models import ResidualReplacementModel
    from ..saes.loading import load_sae

    model = load_model(args.model, random_weights=getattr(args, "random_weights", False))
    _check_class_id(model, getattr(args, "target", None))
    return ResidualReplacementModel(model, [load_sae(r) for r in _sae_refs(args.saes, args.model, model.cfg.n_layers)])
