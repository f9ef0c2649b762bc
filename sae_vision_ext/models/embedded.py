"""Embedded models (``sve:<name>``): small timm ViTs trained by ``examples/train_shapes_vit.py``.

Each ships as ``sae_vision_ext/checkpoints/<name>.json`` (timm architecture kwargs, data config,
training facts) beside ``<name>.safetensors`` (float16 weights, a few MB), so loading needs no
network. ``pretrained=False`` builds the same architecture with random weights.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from torch import nn

from .._registry import Registry
from .adapters.base import register_loader

EMBEDDED_MODELS: Registry[str] = Registry("embedded model")
EMBEDDED_MODELS.register("shapes-vit")(
    "6-layer ViT (d_model 128, 64x64, patch 8, 6 classes); the corner marker on half the images, class-balanced"
)
EMBEDDED_MODELS.register("shapes-vit-biased")(
    "same architecture, trained with the corner marker on 90% of circles and 2% of the other classes"
)


def checkpoint_dir() -> Path:
    """Folder holding the embedded checkpoints inside the installed package."""
    return Path(str(resources.files("sae_vision_ext") / "checkpoints"))


def embedded_metadata(name: str) -> dict[str, Any]:
    """The JSON beside an embedded checkpoint: ``arch`` (timm kwargs), ``data_config``, ``training``."""
    EMBEDDED_MODELS.get(name)
    path = checkpoint_dir() / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(
            f"Embedded model {name!r} is registered but {path} is missing; reinstall the package or "
            f"rebuild it with `python examples/train_shapes_vit.py --name {name}`."
        )
    return json.loads(path.read_text())


def build_shapes_vit(arch: dict[str, Any], data_config: dict[str, Any] | None = None) -> nn.Module:
    """A timm ``VisionTransformer`` from ``arch`` kwargs, with ``pretrained_cfg`` set from ``data_config``."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(**arch)
    if data_config is not None:
        model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), **data_config}
    return model


@register_loader("sve")
def load_embedded(name: str, pretrained: bool = True, **kwargs: Any) -> nn.Module:
    """Build ``sve:<name>``; with ``pretrained`` load the shipped float16 weights as float32."""
    if kwargs:
        raise ValueError(f"Embedded models take no extra arguments, got {sorted(kwargs)}.")
    meta = embedded_metadata(name)
    model = build_shapes_vit(meta["arch"], {**meta["data_config"], "label_names": list(meta["classes"])})
    if pretrained:
        from safetensors.torch import load_file

        state = load_file(str(checkpoint_dir() / f"{name}.safetensors"))
        model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()
