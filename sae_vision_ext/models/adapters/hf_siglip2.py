"""Hugging Face ``Siglip2VisionModel`` (NaFlex): each image at its own size and aspect ratio.

SigLIP 2 takes images already patchified (``pixel_values [batch, max_patches, 3 * p * p]``, each patch
channels-last), a ``pixel_attention_mask`` of the real patches and ``spatial_shapes`` (each image's
``(rows, cols)``). The hooked model patchifies ``pixels`` itself (``models/naflex.py``), resizes the
learned position table to each image's grid with the model's own ``resize_positional_embeddings``,
masks the padding keys in every attention and passes the mask to the attention-pool head. No CLS
token; the output is ``pooler_output`` (the attention-pool head), else the masked mean of the tokens.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor, nn

from ..components import BlockParts
from ..config import HookedViTConfig
from ..naflex import NaFlexBatch, image_list, patchify
from .base import register_adapter
from .hf import _hf_layer_parts, _HFAdapter


def masked_mean(x: Tensor, valid: Tensor) -> Tensor:
    """Mean over the real tokens (``valid [batch, pos]``) of ``x [batch, pos, d]``."""
    w = valid.to(x.dtype)[..., None]
    return (x * w).sum(1) / w.sum(1)


@register_adapter("hf_siglip2")
class HFSiglip2Adapter(_HFAdapter):
    class_names = ("Siglip2VisionModel",)
    supported_types = ("transformers.Siglip2VisionModel (NaFlex)",)
    has_cls = False

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self.batch: NaFlexBatch | None = None
        """The NaFlex batch of the current forward (set by :meth:`embed`)."""

    def _key_mask(self) -> Tensor | None:
        return self.batch.patch_valid if self.batch is not None and self.batch.padded else None

    def blocks(self) -> list[BlockParts]:
        return [dataclasses.replace(_hf_layer_parts(layer), key_mask=self._key_mask) for layer in self._layers()]

    def config(self) -> HookedViTConfig:
        c, blocks = self.hf_config, self.blocks()
        side = round(c.num_patches**0.5) * c.patch_size
        return HookedViTConfig(
            n_layers=len(blocks),
            d_model=c.hidden_size,
            n_heads=blocks[0].n_heads,
            d_head=blocks[0].d_head,
            d_mlp=blocks[0].fc1.out_features,
            patch_size=c.patch_size,
            image_size=(side, side),
            n_prefix_tokens=0,
            has_cls_token=False,
            in_chans=c.num_channels,
            act_fn="gelu_tanh" if "tanh" in c.hidden_act else "gelu",
            dynamic_img_size=True,
            naflex=True,
            source=self.name,
            extra={"hf_class": type(self.module).__name__, "max_num_patches": c.num_patches},
        )

    def embed(self, batch: NaFlexBatch) -> tuple[Tensor, Tensor]:
        emb = self.base.embeddings
        self.batch = batch
        tok = emb.patch_embedding(batch.patches.to(emb.patch_embedding.weight.dtype))
        table = emb.position_embedding.weight.reshape(emb.position_embedding_size, emb.position_embedding_size, -1)
        pos = emb.resize_positional_embeddings(table, batch.spatial_shapes, max_length=tok.shape[1])
        return tok, pos

    def ln_final(self) -> nn.Module | None:
        return self.base.post_layernorm

    def pool(self, x: Tensor) -> Tensor:
        valid = self.batch.patch_valid
        return self.base.head(x, valid.long()) if self.base.use_head else masked_mean(x, valid)

    def nonlinear_readout(self) -> str | None:
        return "the SigLIP 2 attention-pool head (vision_use_head=True)" if self.base.use_head else None

    def native_inputs(self, pixels: Tensor | list[Tensor], image_sizes: list[tuple[int, int]] | None = None) -> dict:
        """``pixel_values``, ``pixel_attention_mask`` and ``spatial_shapes`` as SigLIP 2's processor builds them."""
        batch = patchify(image_list(pixels, image_sizes), self.hf_config.patch_size)
        return {
            "pixel_values": batch.patches,
            "pixel_attention_mask": batch.patch_valid.long(),
            "spatial_shapes": batch.spatial_shapes,
        }

    def native_forward(self, pixels: Tensor) -> Tensor:
        inputs = self.native_inputs(pixels)
        out = self.module(**inputs)
        if out.pooler_output is not None:
            return out.pooler_output
        return masked_mean(out.last_hidden_state, inputs["pixel_attention_mask"].bool())
