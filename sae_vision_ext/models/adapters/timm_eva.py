"""timm ``Eva``: EVA-02, EVA-CLIP, DINOv3, Perception Encoder (PE-core) and the RoPE ViTs.

What differs from ``VisionTransformer`` and where it goes:

- **RoPE** (``m.rope``: ``cat``, ``mixed``, ``dinov3``) rotates q and k of the patch tokens (prefix
  tokens are left alone) after any q/k norm: ``attn.hook_rot_q``/``hook_rot_k``. The rotation table
  is computed once per forward from the patch grid, in :meth:`TimmEvaAdapter.embed`, exactly as
  ``Eva._pos_embed`` does, and read by every block.
- **SwiGLU**: packed (``GluMlp``, EVA-02) or separate (``SwiGLU``, EVA-CLIP) gate and linear
  projections: ``mlp.hook_pre`` (gate branch), ``mlp.hook_pre_linear``, ``mlp.hook_post``.
- **sub-LN** (``scale_mlp``) on the MLP's hidden activation: ``mlp.ln``; the norm on the attention
  output (``scale_attn_inner``): ``attn.ln``.
- **LayerScale** as bare parameters ``gamma_1``/``gamma_2`` (DINOv3).
- fused qkv with separate ``q_bias``/``v_bias`` and a zero ``k_bias`` buffer (EVA's layout).
- ``norm`` and ``fc_norm`` may both be on; the pool is ``Eva.pool`` (``avg`` over patches,
  ``token``, the attention pool ``map`` of PE-core).

Refused by name: post-norm blocks (``use_post_norm``), gated attention, grouped-query attention.
"""

from __future__ import annotations

import dataclasses
import sys

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from ..components import BlockParts, FusedQKV, LinearSlice, ParamScale, SeparateQKV
from ..config import HookedViTConfig
from .base import optional, register_adapter, unsupported
from .timm import TimmViTAdapter


def _eva_class() -> type | None:
    mod = sys.modules.get("timm.models.eva")
    return mod.Eva if mod is not None else None


class EvaQKV(FusedQKV):
    """EVA's fused projection: ``qkv.weight`` with the bias ``cat(q_bias, k_bias, v_bias)`` (``k_bias`` a
    zero buffer)."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__(attn.qkv)
        self.attn = attn

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a = self.attn
        bias = torch.cat((a.q_bias, a.k_bias, a.v_bias))
        q, k, v = F.linear(x, a.qkv.weight, bias).chunk(3, dim=-1)
        return q, k, v


class TimmRotary:
    """Rotates ``[batch, pos, head, d_head]`` queries or keys past the prefix tokens with the table the
    adapter computed for this forward (per block for ``mixed`` RoPE)."""

    def __init__(self, adapter: TimmEvaAdapter, layer: int, n_prefix: int, half: bool) -> None:
        self.adapter, self.layer, self.n_prefix, self.half = adapter, layer, n_prefix, half

    def __call__(self, t: Float[Tensor, "batch pos head d_head"]) -> Float[Tensor, "batch pos head d_head"]:
        from timm.layers import apply_rot_embed_cat

        rope = self.adapter.rope_table
        if rope is None:
            raise RuntimeError("The rotary table is computed by the adapter's embed(); run the HookedViT forward.")
        if self.adapter.vit.rope_mixed:
            rope = rope[self.layer]
        npt = self.n_prefix
        x = t.transpose(1, 2)  # timm's [batch, head, pos, d_head]
        rotated = apply_rot_embed_cat(x[:, :, npt:], rope, half=self.half)
        return torch.cat([x[:, :, :npt], rotated], dim=2).type_as(t).transpose(1, 2)


def _mlp_parts(mlp: nn.Module) -> dict[str, nn.Module | None]:
    kind = type(mlp).__name__
    norm = optional(getattr(mlp, "norm", None))
    if kind == "Mlp":
        return {"fc1": mlp.fc1, "act": mlp.act, "fc2": mlp.fc2, "mlp_norm": norm}
    if kind == "GluMlp":  # packed: fc1 -> (x1, x2), act on the first half unless gate_last
        if getattr(mlp, "chunk_dim", -1) != -1:
            raise unsupported("timm GluMlp chunked on a dim other than the last", mlp)
        h = mlp.fc1.out_features // 2
        first, second = LinearSlice(mlp.fc1, 0, h), LinearSlice(mlp.fc1, h, 2 * h)
        gate, lin = (second, first) if mlp.gate_last else (first, second)
        return {"fc1": gate, "fc1_linear": lin, "act": mlp.act, "fc2": mlp.fc2, "mlp_norm": norm}
    if kind == "SwiGLU":
        return {"fc1": mlp.fc1_g, "fc1_linear": mlp.fc1_x, "act": mlp.act, "fc2": mlp.fc2, "mlp_norm": norm}
    raise unsupported(f"timm MLP type {kind}", mlp, "Supported in Eva blocks: Mlp, GluMlp (SwiGLU packed), SwiGLU.")


def eva_block_parts(block: nn.Module, rotary: TimmRotary | None) -> BlockParts:
    """Map one timm ``EvaBlock`` onto :class:`BlockParts`; raise for the wirings it cannot express."""
    if type(block).__name__ != "EvaBlock":
        raise unsupported(
            f"timm Eva block type {type(block).__name__} (post-norm, use_post_norm=True)",
            block,
            "Use a pre-norm Eva (EVA-02, DINOv3, PE-core).",
        )
    attn = block.attn
    if getattr(attn, "gate", None) is not None:
        raise unsupported("Gated attention (timm Eva gated_attn=True)", block)
    if int(getattr(attn, "num_kv_groups", 1)) != 1:
        raise unsupported("Grouped-query attention (timm Eva num_kv_heads)", block)
    if attn.qkv is None:
        qkv = SeparateQKV(attn.q_proj, attn.k_proj, attn.v_proj)
    elif getattr(attn, "q_bias", None) is not None:
        qkv = EvaQKV(attn)
    else:
        qkv = FusedQKV(attn.qkv)
    return BlockParts(
        ln1=block.norm1,
        qkv=qkv,
        out_proj=attn.proj,
        ln2=block.norm2,
        n_heads=attn.num_heads,
        d_head=attn.head_dim,
        attn_scale=float(attn.scale),
        q_norm=optional(attn.q_norm),
        k_norm=optional(attn.k_norm),
        attn_out_norm=optional(attn.norm),
        ls1=ParamScale(block, "gamma_1") if block.gamma_1 is not None else None,
        ls2=ParamScale(block, "gamma_2") if block.gamma_2 is not None else None,
        block=block,
        rotary=rotary,
        **_mlp_parts(block.mlp),
    )


@register_adapter("timm_eva")
class TimmEvaAdapter(TimmViTAdapter):
    supported_types = ("timm.models.eva.Eva (EVA-02, EVA-CLIP, DINOv3, PE-core, RoPE ViTs)",)

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self.rope_table: Tensor | None = None
        """The rotary table of the current forward (set by :meth:`embed`)."""

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        eva = _eva_class()
        return eva is not None and isinstance(module, eva)

    @property
    def distilled(self) -> bool:
        return False

    def config(self) -> HookedViTConfig:
        m = self.vit
        cfg = super().config()
        reg = getattr(m, "reg_token", None)
        extra = dict(cfg.extra, rope=type(m.rope).__name__ if m.rope is not None else None)
        extra["mlp"] = type(m.blocks[0].mlp).__name__
        return dataclasses.replace(
            cfg,
            n_registers=0 if reg is None else int(reg.shape[1]),
            final_norm_after_pool=optional(m.norm) is None and optional(m.fc_norm) is not None,
            positional_embedding_type="rotary" if m.pos_embed is None and m.rope is not None else "standard",
            extra=extra,
        )

    def blocks(self) -> list[BlockParts]:
        m = self.vit
        parts = []
        for layer, block in enumerate(m.blocks):
            half = bool(getattr(block.attn, "rotate_half", False))
            rotary = TimmRotary(self, layer, m.num_prefix_tokens, half) if m.rope is not None else None
            parts.append(eva_block_parts(block, rotary))
        return parts

    def embed(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens and absolute position embeddings as ``Eva._pos_embed`` builds them; the RoPE table
        for this grid is stored in ``rope_table`` for the blocks."""
        m = self.vit
        x = m.patch_embed(pixels)
        if m.dynamic_img_size:
            b, h, w, d = x.shape
            grid = (h, w)
            x = x.reshape(b, h * w, d)
        else:
            b, d, grid = x.shape[0], x.shape[-1], tuple(m.patch_embed.grid_size)
        prefix = [t.expand(b, -1, -1) for t in (m.cls_token, m.reg_token) if t is not None]
        tok = torch.cat([*prefix, x], dim=1)
        n_prefix = tok.shape[1] - x.shape[1]
        self.rope_table = self._rope(grid)
        pe = m.pos_embed
        if pe is None:
            return tok, tok.new_zeros(1, tok.shape[1], d)
        if m.dynamic_img_size:
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

    def _rope(self, grid: tuple[int, int]) -> Tensor | None:
        rope = self.vit.rope
        if rope is None:
            return None
        if self.vit.dynamic_img_size or not hasattr(rope, "feat_shape"):
            return rope.get_embed(shape=grid)
        return rope.get_embed()

    def ln_final(self) -> nn.Module | None:
        m = self.vit
        return optional(m.norm) or optional(m.fc_norm)

    def head(self, pooled: Tensor) -> Tensor:
        m = self.vit
        if optional(m.norm) is not None and optional(m.fc_norm) is not None:
            pooled = m.fc_norm(pooled)
        return m.head(pooled)

    def nonlinear_readout(self) -> str | None:
        m = self.vit
        if m.attn_pool is not None:
            return "the attention-pool head (timm Eva global_pool='map', PE-core)"
        if m.global_pool in ("max", "avgmax"):
            return f"max pooling (timm Eva global_pool={m.global_pool!r})"
        if optional(m.norm) is not None and optional(m.fc_norm) is not None:
            return "fc_norm after the per-token norm (timm Eva with both norm and fc_norm)"
        return None
