"""Hugging Face ``DINOv3ViTModel``: CLS, registers, RoPE on the patch tokens, LayerScale, GELU or gated
(SwiGLU) MLP, any image size that is a multiple of the patch size.

The RoPE ``(cos, sin)`` table is the model's own ``rope_embeddings(pixels)``, computed once per forward
in :meth:`HFDinov3Adapter.embed` and read by every block (``attn.hook_rot_q``/``hook_rot_k``). The
output is ``pooler_output``: the final-normed CLS token.
"""

from __future__ import annotations

import dataclasses

import torch
from jaxtyping import Float
from torch import Tensor, nn

from ..components import BlockParts, SeparateQKV
from ..config import HookedViTConfig
from .base import register_adapter, unsupported
from .hf import IMAGENET_MEAN, IMAGENET_STD, _HFAdapter


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class HFRotary:
    """HF's ``apply_rotary_pos_emb`` on ``[batch, pos, head, d_head]``: the last ``len(cos)`` tokens (the
    patches) rotated, the prefix tokens left alone."""

    def __init__(self, adapter: _HFAdapter) -> None:
        self.adapter = adapter

    def __call__(self, t: Float[Tensor, "batch pos head d_head"]) -> Float[Tensor, "batch pos head d_head"]:
        table = self.adapter.rope_table
        if table is None:
            raise RuntimeError("The rotary table is computed by the adapter's embed(); run the HookedViT forward.")
        cos, sin = (c[:, None, :] for c in table)  # [patches, 1, d_head]
        n_prefix = t.shape[1] - cos.shape[0]
        prefix, patches = t[:, :n_prefix], t[:, n_prefix:]
        return torch.cat((prefix, patches * cos + _rotate_half(patches) * sin), dim=1)


def dinov3_layer_parts(layer: nn.Module, rotary: HFRotary) -> BlockParts:
    attn, mlp = layer.attention, layer.mlp
    gated = hasattr(mlp, "gate_proj")
    if not hasattr(mlp, "up_proj"):
        raise unsupported(f"DINOv3 MLP type {type(mlp).__name__}", layer)
    return BlockParts(
        ln1=layer.norm1,
        qkv=SeparateQKV(attn.q_proj, attn.k_proj, attn.v_proj),
        out_proj=attn.o_proj,
        ln2=layer.norm2,
        fc1=mlp.gate_proj if gated else mlp.up_proj,
        fc1_linear=mlp.up_proj if gated else None,
        act=mlp.act_fn,
        fc2=mlp.down_proj,
        n_heads=attn.num_heads,
        d_head=attn.head_dim,
        attn_scale=float(attn.scaling),
        ls1=layer.layer_scale1,
        ls2=layer.layer_scale2,
        block=layer,
        rotary=rotary,
    )


@register_adapter("hf_dinov3")
class HFDinov3Adapter(_HFAdapter):
    class_names = ("DINOv3ViTModel",)
    supported_types = ("transformers.DINOv3ViTModel",)
    default_mean, default_std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self.rope_table: tuple[Tensor, Tensor] | None = None
        """``(cos, sin)`` of the current forward, ``[patches, d_head]`` each (set by :meth:`embed`)."""

    def _layers(self) -> nn.ModuleList:
        return self.base.model.layer

    def blocks(self) -> list[BlockParts]:
        rotary = HFRotary(self)
        return [dinov3_layer_parts(layer, rotary) for layer in self._layers()]

    def config(self) -> HookedViTConfig:
        return dataclasses.replace(super().config(), dynamic_img_size=True, positional_embedding_type="rotary")

    def embed(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        base = self.base
        emb = base.embeddings
        pixels = pixels.to(emb.patch_embeddings.weight.dtype)
        x = emb.patch_embeddings(pixels).flatten(2).transpose(1, 2)
        b = x.shape[0]
        tok = torch.cat([emb.cls_token.expand(b, -1, -1), emb.register_tokens.expand(b, -1, -1), x], dim=1)
        self.rope_table = base.rope_embeddings(pixels)
        return tok, tok.new_zeros(1, tok.shape[1], tok.shape[-1])

    def ln_final(self) -> nn.Module | None:
        return self.base.norm

    def native_forward(self, pixels: Tensor) -> Tensor:
        return self.module(pixel_values=pixels).pooler_output
