"""open_clip visual towers: the native ``VisionTransformer`` and ``TimmModel`` (a timm trunk + head).

Native tower: CLS token, ``ln_pre``, blocks with ``nn.MultiheadAttention`` (fused ``in_proj``),
optional LayerScale, QuickGELU or GELU, ``ln_post`` before or after pooling
(``final_ln_after_pool``), ``tok``/``avg`` pooling and the output projection ``proj``.
``TimmModel`` towers (SigLIP, ViTamin, ...) reuse the timm adapter for the trunk and append the
tower's own head. Whole CLIP models are accepted by ``HookedViT.from_model`` (it uses ``.visual``).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor, nn

from ..components import BlockParts, FusedQKV, act_fn_name
from ..config import HookedViTConfig
from .base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ViTAdapter,
    optional,
    register_adapter,
    register_loader,
    unsupported,
)
from .timm import TimmViTAdapter


def _open_clip_data_config(visual: nn.Module, image_size: tuple[int, int]) -> dict[str, Any]:
    cfg = dict(getattr(visual, "preprocess_cfg", {}) or {})
    return {
        "input_size": (3, *image_size),
        "mean": tuple(cfg.get("mean", getattr(visual, "image_mean", None) or OPENAI_CLIP_MEAN)),
        "std": tuple(cfg.get("std", getattr(visual, "image_std", None) or OPENAI_CLIP_STD)),
        "interpolation": cfg.get("interpolation", "bicubic"),
        "crop_pct": 1.0,
    }


def _block_parts(block: nn.Module) -> BlockParts:
    fix = "Only open_clip's ResidualAttentionBlock (nn.MultiheadAttention) is supported."
    if type(block).__name__ != "ResidualAttentionBlock" or not isinstance(block.attn, nn.MultiheadAttention):
        raise unsupported(f"open_clip block type {type(block).__name__}", block, fix)
    attn = block.attn
    if attn.in_proj_weight is None:
        raise unsupported("nn.MultiheadAttention with separate q/k/v weights", block, fix)
    return BlockParts(
        ln1=block.ln_1,
        qkv=FusedQKV(attn, "in_proj_weight", "in_proj_bias"),
        out_proj=attn.out_proj,
        ln2=block.ln_2,
        fc1=block.mlp.c_fc,
        act=block.mlp.gelu,
        fc2=block.mlp.c_proj,
        n_heads=attn.num_heads,
        d_head=attn.head_dim,
        attn_scale=attn.head_dim**-0.5,
        ls1=optional(block.ls_1),
        ls2=optional(block.ls_2),
        block=block,
    )


@register_adapter("open_clip")
class OpenClipViTAdapter(ViTAdapter):
    supported_types = ("open_clip.transformer.VisionTransformer", "open_clip.CLIP (uses .visual)")

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        mod = sys.modules.get("open_clip.transformer")
        return mod is not None and isinstance(module, mod.VisionTransformer)

    def config(self) -> HookedViTConfig:
        m = self.module
        if m.attn_pool is not None:
            raise unsupported("open_clip attentional pooling (CoCa)", m)
        blocks = self.blocks()
        return HookedViTConfig(
            n_layers=len(blocks),
            d_model=m.conv1.out_channels,
            n_heads=blocks[0].n_heads,
            d_head=blocks[0].d_head,
            d_mlp=blocks[0].fc1.out_features,
            patch_size=m.patch_size[0],
            image_size=tuple(m.image_size),
            n_prefix_tokens=1,
            has_cls_token=True,
            in_chans=m.conv1.in_channels,
            act_fn=act_fn_name(blocks[0].act),
            final_norm_after_pool=bool(m.final_ln_after_pool),
            source=self.name,
            extra={"pool_type": m.pool_type, "output_dim": m.output_dim},
        )

    def embed(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        m = self.module
        x = m.conv1(pixels)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = m.class_embedding.to(x.dtype).reshape(1, 1, -1).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1), m.positional_embedding.to(x.dtype).unsqueeze(0)

    def ln_pre(self) -> nn.Module | None:
        return optional(self.module.ln_pre)

    def blocks(self) -> list[BlockParts]:
        return [_block_parts(b) for b in self.module.transformer.resblocks]

    def ln_final(self) -> nn.Module | None:
        return optional(self.module.ln_post)

    def pool(self, x: Tensor) -> Tensor:
        return self.module._global_pool(x)[0]

    def head(self, pooled: Tensor) -> Tensor:
        proj = self.module.proj
        return pooled if proj is None else pooled @ proj

    def native_forward(self, pixels: Tensor) -> Tensor:
        out = self.module(pixels)
        return out[0] if isinstance(out, tuple) else out

    def data_config(self) -> dict[str, Any]:
        return _open_clip_data_config(self.module, tuple(self.module.image_size))


@register_adapter("open_clip_timm")
class OpenClipTimmAdapter(TimmViTAdapter):
    """open_clip ``TimmModel`` tower: the timm adapter on ``.trunk``, then the tower's ``.head``."""

    supported_types = ("open_clip.timm_model.TimmModel with a timm VisionTransformer trunk",)

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        mod = sys.modules.get("open_clip.timm_model")
        return mod is not None and isinstance(module, mod.TimmModel) and TimmViTAdapter.matches(module.trunk)

    @property
    def vit(self) -> nn.Module:
        return self.module.trunk

    def head(self, pooled: Tensor) -> Tensor:
        return self.module.head(super().head(pooled))

    def output_kind(self) -> str:
        return "embedding"

    def data_config(self) -> dict[str, Any]:
        return _open_clip_data_config(self.module, tuple(self.vit.patch_embed.img_size))


@register_loader("open_clip")
def load_open_clip(name: str, pretrained: bool = True, **kwargs: Any) -> nn.Module:
    """``"ARCH/TAG"`` (e.g. ``ViT-B-32/laion2b_s34b_b79k``) or ``hf-hub:org/repo``; returns ``.visual``.

    ``pretrained=False`` builds the architecture with random weights and downloads nothing.
    """
    import open_clip

    arch, _, tag = name.partition("/") if not name.startswith(("hf-hub:", "local-dir:")) else (name, "", "")
    if pretrained and not tag and not arch.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(
            f"open_clip model {name!r} names no pretrained tag. Use 'ARCH/TAG' such as "
            f"'ViT-B-32/laion2b_s34b_b79k' (see open_clip.list_pretrained()), or pretrained=False."
        )
    model = open_clip.create_model(
        arch, pretrained=(tag or None) if pretrained else None, load_weights=pretrained, **kwargs
    )
    return model.visual
