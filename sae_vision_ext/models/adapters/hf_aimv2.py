"""Hugging Face ``Aimv2VisionModel``: no CLS token, an RMSNorm on the patch embeddings, learned or (with
``is_native``) 2-D sinusoidal position embeddings at any size, RMSNorm blocks with a SwiGLU MLP, a final
RMSNorm, and an attention-pool head (``use_head``) or none.

``hook_embed`` is the normed patch embedding (AIMv2 norms before adding positions). The output is
``pooler_output`` (the attention-pool head), else the mean of the final tokens.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ..components import BlockParts, SeparateQKV
from ..config import HookedViTConfig
from .base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, register_adapter
from .hf import _HFAdapter


def aimv2_layer_parts(layer: nn.Module) -> BlockParts:
    attn, mlp = layer.attention, layer.ffn
    return BlockParts(
        ln1=layer.rms_norm1,
        qkv=SeparateQKV(attn.q_proj, attn.k_proj, attn.v_proj),
        out_proj=attn.out_proj,
        ln2=layer.rms_norm2,
        fc1=mlp.gate_proj,
        fc1_linear=mlp.up_proj,
        act=mlp.act_fn,
        fc2=mlp.down_proj,
        n_heads=attn.num_heads,
        d_head=attn.head_dim,
        attn_scale=float(attn.scale),
        block=layer,
    )


@register_adapter("hf_aimv2")
class HFAimv2Adapter(_HFAdapter):
    class_names = ("Aimv2VisionModel",)
    supported_types = ("transformers.Aimv2VisionModel",)
    has_cls = False
    default_mean, default_std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    def blocks(self) -> list[BlockParts]:
        return [aimv2_layer_parts(layer) for layer in self._layers()]

    def config(self) -> HookedViTConfig:
        native = bool(self.hf_config.is_native)
        return dataclasses.replace(super().config(), normalization="RMS", dynamic_img_size=native)

    def embed(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        emb = self.base.embeddings
        h, w = pixels.shape[-2:]
        tok = emb.rms_norm(emb.patch_embed(pixels).flatten(2).transpose(1, 2))
        if not emb.config.is_native:
            return tok, emb.position_embedding(emb.position_ids)
        from transformers.models.aimv2.modeling_aimv2 import build_2d_sinusoidal_position_embedding

        pe = build_2d_sinusoidal_position_embedding(
            height=h // emb.patch_size, width=w // emb.patch_size, embed_dim=tok.shape[-1], device=tok.device,
            dtype=tok.dtype,
        )  # fmt: skip
        half = pe.shape[-1] // 2  # AIMv2's [w | h] layout, as its embeddings do
        return tok, torch.cat([pe[..., half:], pe[..., :half]], dim=-1)[None]

    def ln_final(self) -> nn.Module | None:
        return self.base.rms_norm

    def pool(self, x: Tensor) -> Tensor:
        return self.base.head(x) if self.base.use_head else x.mean(dim=1)

    def nonlinear_readout(self) -> str | None:
        return "the AIMv2 attention-pool head (use_head=True)" if self.base.use_head else None

    def native_forward(self, pixels: Tensor) -> Tensor:
        out = self.module(pixel_values=pixels)
        return out.pooler_output if out.pooler_output is not None else out.last_hidden_state.mean(dim=1)
