"""timm ``NaFlexVit`` (NaFlex): each image at its own size, standard pre-norm ViT blocks.

The hooked model patchifies ``pixels`` itself (``models/naflex.py``, channels-last patches as timm's
``batch_patchify``), embeds them with the model's linear ``embeds.proj`` (after ``norm_input``, before
``embeds.norm``), and adds the learned or factorized position embedding resized to each image's grid
by timm's own NaFlex code (``hook_pos_embed``; prefix tokens get none). Padding keys are masked in
every attention and pooling (``avg``, ``max``, ``token``, the ``map`` attention pool) is timm's
``_pool`` with the patch mask, as ``NaFlexVit.forward`` with ``patch_coord``/``patch_valid`` does.

Refused by name: the convolutional patch embedding (``embed_proj_type='conv'``), RoPE / EVA blocks
(``rope_type``, ``swiglu_mlp``, ``attn_type='eva'``), variable patch sizes.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor, nn

from ..components import BlockParts, act_fn_name
from ..config import HookedViTConfig
from ..naflex import NaFlexBatch, image_list, patchify
from .base import ViTAdapter, optional, register_adapter, unsupported
from .timm import timm_block_parts, timm_class_names


def _naflex_class() -> type | None:
    mod = sys.modules.get("timm.models.naflexvit")
    return mod.NaFlexVit if mod is not None else None


@register_adapter("timm_naflex")
class TimmNaFlexAdapter(ViTAdapter):
    supported_types = ("timm.models.naflexvit.NaFlexVit (NaFlex, standard blocks)",)

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self.batch: NaFlexBatch | None = None
        """The NaFlex batch of the current forward (set by :meth:`embed`)."""
        emb = module.embeds
        if not emb.is_linear:
            raise unsupported("NaFlexVit with a convolutional patch embedding (embed_proj_type='conv')", module)
        if getattr(emb, "patch_interpolator", None) is not None:
            raise unsupported("NaFlexVit variable patch sizes (enable_patch_interpolator)", module)
        if not getattr(emb, "channels_last", True):
            raise unsupported("NaFlexVit channels-first patches (patchify_channels_last=False)", module)

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        naflex = _naflex_class()
        return naflex is not None and isinstance(module, naflex)

    def _key_mask(self) -> Tensor | None:
        if self.batch is None or not self.batch.padded:
            return None
        return self.batch.token_mask(self.module.num_prefix_tokens)

    def blocks(self) -> list[BlockParts]:
        m = self.module
        if m.rope is not None:
            raise unsupported(
                f"NaFlexVit with RoPE (rope_type, {type(m.rope).__name__})",
                m,
                "Use pos_embed='learned' or 'factorized'.",
            )
        parts = []
        for block in m.blocks:
            part = timm_block_parts(block)
            part.key_mask = self._key_mask
            parts.append(part)
        return parts

    def config(self) -> HookedViTConfig:
        m, blocks = self.module, self.blocks()
        emb = m.embeds
        p = emb.patch_size[0]
        grid = emb.pos_embed_grid_size or (16, 16)
        return HookedViTConfig(
            n_layers=len(blocks),
            d_model=m.embed_dim,
            n_heads=blocks[0].n_heads,
            d_head=blocks[0].d_head,
            d_mlp=blocks[0].fc1.out_features,
            patch_size=p,
            image_size=tuple(emb.default_img_size or (grid[0] * p, grid[1] * p)),
            n_prefix_tokens=m.num_prefix_tokens,
            has_cls_token=m.has_class_token,
            n_registers=m.num_reg_tokens,
            in_chans=m.in_chans,
            act_fn=act_fn_name(blocks[0].act),
            normalization="RMS" if "rms" in type(m.blocks[0].norm1).__name__.lower() else "LN",
            final_norm_after_pool=optional(m.norm) is None and optional(m.fc_norm) is not None,
            dynamic_img_size=True,
            naflex=True,
            source=self.name,
            class_names=timm_class_names(m),
            extra={"global_pool": m.global_pool, "pos_embed": emb.pos_embed_type},
        )

    def embed(self, batch: NaFlexBatch) -> tuple[Tensor, Tensor]:
        emb = self.module.embeds
        self.batch = batch
        x = batch.patches.to(emb.proj.weight.dtype)
        if emb.norm_input is not None:
            x = emb.norm_input(x)
        tok = emb.norm(emb.proj(x))
        pos = torch.zeros_like(tok)
        if emb.pos_embed_type == "learned":  # timm's NaFlex code adds in place; onto zeros it is the embedding
            add = emb._apply_learned_naflex_pos_embed_grid_sample if emb.pos_embed_use_grid_sample else None
            (add or emb._apply_learned_naflex_pos_embed)(pos, patch_coord=batch.patch_coord)
        elif emb.pos_embed_type == "factorized":
            add = emb._apply_factorized_naflex_pos_embed_grid_sample if emb.pos_embed_use_grid_sample else None
            (add or emb._apply_factorized_naflex_pos_embed)(pos, patch_coord=batch.patch_coord)
        prefix = [t.expand(tok.shape[0], -1, -1) for t in (emb.cls_token, emb.reg_token) if t is not None]
        if prefix:
            tok = torch.cat([*prefix, tok], dim=1)
            pos = torch.cat([pos.new_zeros(pos.shape[0], tok.shape[1] - pos.shape[1], pos.shape[2]), pos], dim=1)
        return tok, pos

    def ln_pre(self) -> nn.Module | None:
        return optional(self.module.norm_pre)

    def ln_final(self) -> nn.Module | None:
        m = self.module
        return optional(m.norm) or optional(m.fc_norm)

    def pool(self, x: Tensor) -> Tensor:
        batch = self.batch
        return self.module._pool(x, patch_valid=batch.patch_valid if batch is not None and batch.padded else None)

    def head(self, pooled: Tensor) -> Tensor:
        m = self.module
        if optional(m.norm) is not None and optional(m.fc_norm) is not None:
            pooled = m.fc_norm(pooled)
        return m.head(pooled)

    def nonlinear_readout(self) -> str | None:
        m = self.module
        if m.attn_pool is not None:
            return "the attention-pool head (timm NaFlexVit global_pool='map')"
        if m.global_pool in ("max", "avgmax"):
            return f"max pooling (timm NaFlexVit global_pool={m.global_pool!r})"
        return None

    def output_kind(self) -> str:
        return "logits" if int(getattr(self.module, "num_classes", 0) or 0) > 0 else "embedding"

    def native_inputs(self, pixels: Tensor | list[Tensor], image_sizes: list[tuple[int, int]] | None = None) -> dict:
        """``patches``, ``patch_coord`` and ``patch_valid`` as timm's NaFlex collator builds them."""
        batch = patchify(image_list(pixels, image_sizes), self.module.embeds.patch_size[0])
        return {"x": batch.patches, "patch_coord": batch.patch_coord, "patch_valid": batch.patch_valid}

    def native_forward(self, pixels: Tensor) -> Tensor:
        if isinstance(pixels, Tensor) and pixels.ndim == 4:
            return self.module(pixels)  # timm's standard (fixed-grid) path
        return self.module(**self.native_inputs(pixels))

    def data_config(self) -> dict[str, Any]:
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=self.module)
        cfg = {k: cfg[k] for k in ("input_size", "mean", "std", "interpolation", "crop_pct")}
        return cfg | {"input_size": (self.module.in_chans, *self.config().image_size)}
