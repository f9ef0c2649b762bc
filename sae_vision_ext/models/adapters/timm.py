"""timm ``VisionTransformer`` (and ``VisionTransformerDistilled``).

Covers CLS or no-CLS (avg pooling), register tokens, ``no_embed_class``, LayerScale, ``norm_pre``,
``fc_norm``, attention-pool heads (``global_pool='map'``), ``qk_norm`` and DeiT distillation tokens.
Prefix token order is timm's: CLS, then registers (or the distillation token).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor, nn

from ..components import BlockParts, FusedQKV, act_fn_name
from ..config import HookedViTConfig
from .base import ViTAdapter, optional, register_adapter, register_loader, unsupported


def _timm_vit_classes() -> tuple[type, ...]:
    mod = sys.modules.get("timm.models.vision_transformer")
    return (mod.VisionTransformer,) if mod is not None else ()


def timm_block_parts(block: nn.Module) -> BlockParts:
    """Map one timm ``Block`` onto :class:`BlockParts`; raise for block types with another wiring."""
    fix = "Use a model built from timm's standard `Block` (e.g. vit_*, deit_*, vit_*_reg*)."
    if type(block).__name__ != "Block":
        raise unsupported(f"timm block type {type(block).__name__}", block, fix)
    attn, mlp = block.attn, block.mlp
    if not hasattr(attn, "qkv") or getattr(attn, "gate", None) is not None:
        raise unsupported(f"timm attention type {type(attn).__name__}", block, fix)
    if not all(hasattr(mlp, n) for n in ("fc1", "act", "fc2")) or type(mlp).__name__ != "Mlp":
        raise unsupported(f"timm MLP type {type(mlp).__name__}", block, fix)
    return BlockParts(
        ln1=block.norm1,
        qkv=FusedQKV(attn.qkv),
        out_proj=attn.proj,
        ln2=block.norm2,
        fc1=mlp.fc1,
        act=mlp.act,
        fc2=mlp.fc2,
        n_heads=attn.num_heads,
        d_head=attn.head_dim,
        attn_scale=float(attn.scale),
        q_norm=optional(attn.q_norm),
        k_norm=optional(attn.k_norm),
        attn_out_norm=optional(getattr(attn, "norm", None)),
        mlp_norm=optional(getattr(mlp, "norm", None)),
        ls1=optional(block.ls1),
        ls2=optional(block.ls2),
        block=block,
    )


@register_adapter("timm")
class TimmViTAdapter(ViTAdapter):
    supported_types = ("timm.models.VisionTransformer", "timm.models.VisionTransformerDistilled")

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        classes = _timm_vit_classes()
        return bool(classes) and isinstance(module, classes)

    @property
    def vit(self) -> nn.Module:
        """The timm VisionTransformer (subclasses wrapping a trunk override this)."""
        return self.module

    @property
    def distilled(self) -> bool:
        return getattr(self.vit, "dist_token", None) is not None

    def config(self) -> HookedViTConfig:
        m = self.vit
        blocks = self.blocks()
        if not blocks:
            raise unsupported("A ViT with no blocks", m)
        norm = m.blocks[0].norm1
        ps = m.patch_embed.patch_size
        n_reg = int(getattr(m, "num_reg_tokens", 0) or 0)
        if self.distilled and n_reg:
            raise unsupported("Distillation plus register tokens", m)
        return HookedViTConfig(
            n_layers=len(blocks),
            d_model=m.embed_dim,
            n_heads=blocks[0].n_heads,
            d_head=blocks[0].d_head,
            d_mlp=blocks[0].fc1.out_features,
            patch_size=ps[0] if isinstance(ps, tuple) else int(ps),
            image_size=tuple(m.patch_embed.img_size),
            n_prefix_tokens=m.num_prefix_tokens,
            has_cls_token=m.cls_token is not None,
            n_registers=n_reg,
            in_chans=m.patch_embed.proj.in_channels,
            act_fn=act_fn_name(blocks[0].act),
            normalization="RMS" if "rms" in type(norm).__name__.lower() else "LN",
            final_norm_after_pool=self.ln_final() is not None and optional(m.norm) is None,
            dynamic_img_size=bool(getattr(m, "dynamic_img_size", False)),
            source=self.name,
            class_names=timm_class_names(m),
            extra={"global_pool": m.global_pool, "distilled": self.distilled, "no_embed_class": m.no_embed_class},
        )

    def embed(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        m = self.vit
        x = m.patch_embed(pixels)
        b, d = x.shape[0], x.shape[-1]
        grid = tuple(x.shape[1:3]) if x.ndim == 4 else tuple(m.patch_embed.grid_size)
        x = x.reshape(b, -1, d)
        prefix = [t for t in (m.cls_token, getattr(m, "dist_token", None), m.reg_token) if t is not None]
        tok = torch.cat([t.expand(b, -1, -1) for t in prefix] + [x], dim=1)
        n_prefix = tok.shape[1] - x.shape[1]
        if m.pos_embed is None:
            return tok, tok.new_zeros(1, tok.shape[1], d)
        pe = m.pos_embed
        if getattr(m, "dynamic_img_size", False):
            from timm.layers import resample_abs_pos_embed

            pe = resample_abs_pos_embed(
                pe,
                new_size=grid,
                old_size=m.patch_embed.grid_size,
                num_prefix_tokens=0 if m.no_embed_class else n_prefix,
            )
        if m.no_embed_class:
            pe = torch.cat([pe.new_zeros(1, n_prefix, d), pe], dim=1)
        return tok, pe

    def ln_pre(self) -> nn.Module | None:
        return optional(self.vit.norm_pre)

    def blocks(self) -> list[BlockParts]:
        return [timm_block_parts(b) for b in self.vit.blocks]

    def ln_final(self) -> nn.Module | None:
        m = self.vit
        return optional(m.norm) or optional(getattr(m, "fc_norm", None))

    def nonlinear_readout(self) -> str | None:
        return "timm's attention-pool head (global_pool='map')" if self.vit.global_pool == "map" else None

    def pool(self, x: Tensor) -> Tensor:
        if self.distilled:
            return x[:, :2]  # [batch, 2, d_model]: CLS and distillation token, averaged after the heads
        return self.vit.pool(x)

    def head(self, pooled: Tensor) -> Tensor:
        m = self.vit
        if self.distilled:
            return (m.head(pooled[:, 0]) + m.head_dist(pooled[:, 1])) / 2
        return m.head(pooled)

    def output_kind(self) -> str:
        return "logits" if int(getattr(self.module, "num_classes", 0) or 0) > 0 else "embedding"

    def native_forward(self, pixels: Tensor) -> Tensor:
        return self.module(pixels)

    def data_config(self) -> dict[str, Any]:
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=self.vit)
        return {k: cfg[k] for k in ("input_size", "mean", "std", "interpolation", "crop_pct")}


@register_loader("timm")
def load_timm(name: str, pretrained: bool = True, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=...)``; kwargs go to timm (e.g. ``num_classes``, ``depth``)."""
    import timm

    return timm.create_model(name, pretrained=pretrained, **kwargs)


def timm_class_names(model: nn.Module) -> tuple[str, ...]:
    """Class names of a timm classifier: ``pretrained_cfg["label_names"]`` when set, else timm's own
    ImageNet label descriptions (first synonym) when the head matches the inferred subset."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    n_classes = int(getattr(model, "num_classes", 0) or 0)
    names = cfg.get("label_names")
    if names and len(names) == n_classes:
        return tuple(str(n) for n in names)
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if subset is None:
            return ()
        info = ImageNetInfo(subset)
        if info.num_classes() != n_classes:
            return ()
        return tuple(d.split(",")[0] for d in info.label_descriptions())
    except (ImportError, ValueError, KeyError, OSError):
        return ()
