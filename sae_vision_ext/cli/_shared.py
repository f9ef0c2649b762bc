"""Helpers every command uses: progress lines, images, SAE references, labels, the replacement model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


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

    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(
            f"--labels {path!r}: not a readable labels.json ({e}); write one with sae-vision analyse."
        ) from e
    return {hook: {int(f): label for f, label in feats.items()} for hook, feats in raw.items()}


def _rrm(args: argparse.Namespace):
    from ..circuits.replacement import ResidualReplacementModel
    from ..models import HookedViT
    from ..saes.loading import load_sae

    model = HookedViT.from_pretrained(args.model)
    return ResidualReplacementModel(model, [load_sae(r) for r in _sae_refs(args.saes, args.model, model.cfg.n_layers)])
