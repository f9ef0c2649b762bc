"""Built-in adapters; importing this package registers them (no heavy imports happen here)."""

from . import hf, hf_aimv2, hf_dinov3, hf_siglip2, open_clip, open_clip_eva, timm, timm_eva, timm_naflex  # noqa: F401
from .base import ADAPTERS, LOADERS, ViTAdapter, adapter_for, register_adapter, register_loader

__all__ = ["ADAPTERS", "LOADERS", "ViTAdapter", "adapter_for", "register_adapter", "register_loader"]
