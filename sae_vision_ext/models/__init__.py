"""Hooked ViTs: one generic forward (``hooked_vit``) and one small adapter file per family."""

from __future__ import annotations

from .adapters.base import ADAPTERS, LOADERS, ViTAdapter, adapter_for, register_adapter, register_loader
from .config import HookedViTConfig
from .embedded import EMBEDDED_MODELS
from .hooked_vit import HookedViT


def list_adapters() -> list[dict[str, object]]:
    """Registered adapters: ``{"name", "supported_types"}`` each, in lookup order."""
    return [{"name": name, "supported_types": list(cls.supported_types)} for name, cls in ADAPTERS.items()]


def list_embedded_models() -> dict[str, str]:
    """Embedded ``sve:`` model names with a one-line description."""
    return dict(EMBEDDED_MODELS.items())


__all__ = [
    "ADAPTERS",
    "EMBEDDED_MODELS",
    "LOADERS",
    "HookedViT",
    "HookedViTConfig",
    "ViTAdapter",
    "adapter_for",
    "list_adapters",
    "list_embedded_models",
    "register_adapter",
    "register_loader",
]
