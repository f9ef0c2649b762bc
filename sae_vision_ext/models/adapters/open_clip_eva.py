"""open_clip ``TimmModel`` towers whose timm trunk is an ``Eva`` (EVA-02, DINOv3, PE-core trunks): the
Eva adapter on ``.trunk``, then the tower's own ``.head`` (projection)."""

from __future__ import annotations

import sys
from typing import Any

from torch import Tensor, nn

from .base import register_adapter
from .open_clip import _open_clip_data_config
from .timm_eva import TimmEvaAdapter


@register_adapter("open_clip_timm_eva")
class OpenClipTimmEvaAdapter(TimmEvaAdapter):
    supported_types = ("open_clip.timm_model.TimmModel with a timm Eva trunk",)

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        mod = sys.modules.get("open_clip.timm_model")
        return mod is not None and isinstance(module, mod.TimmModel) and TimmEvaAdapter.matches(module.trunk)

    @property
    def vit(self) -> nn.Module:
        return self.module.trunk

    def head(self, pooled: Tensor) -> Tensor:
        return self.module.head(super().head(pooled))

    def output_kind(self) -> str:
        return "embedding"

    def data_config(self) -> dict[str, Any]:
        return _open_clip_data_config(self.module, tuple(self.vit.patch_embed.img_size))
