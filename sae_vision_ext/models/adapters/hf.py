"""Hugging Face ``transformers`` vision encoders: ViT, CLIP, DINOv2 (with or without registers), SigLIP.

One layer mapping serves all of them (attribute spellings of transformers 4.x and 5.x are both
listed, see ``_compat.first_attr``); each model class differs only in embeddings, final norm,
pooling and head, which the small subclasses below state. ``HookedViT.forward`` returns the tensor
that matters for each class: ``logits`` for classifiers, ``image_embeds`` for
``CLIPVisionModelWithProjection``, ``pooler_output`` otherwise.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from ..._compat import first_attr
from ..components import BlockParts, SeparateQKV, act_fn_name
from ..config import HookedViTConfig
from .base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ViTAdapter, register_adapter, register_loader, unsupported

if TYPE_CHECKING:
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _hf_layer_parts(layer: nn.Module) -> BlockParts:
    attn = first_attr(layer, "self_attn", "attention.attention", "attention")
    mlp_fc1 = first_attr(layer, "mlp.fc1", "intermediate.dense", default=None)
    if mlp_fc1 is None:
        raise unsupported(f"HF MLP type {type(getattr(layer, 'mlp', None)).__name__} (SwiGLU)", layer)
    n_heads = first_attr(attn, "num_heads", "num_attention_heads")
    d_head = first_attr(attn, "head_dim", "attention_head_size")
    ls1, ls2 = getattr(layer, "layer_scale1", None), getattr(layer, "layer_scale2", None)
    return BlockParts(
        ln1=first_attr(layer, "layer_norm1", "layernorm_before", "norm1"),
        qkv=SeparateQKV(
            first_attr(attn, "q_proj", "query"), first_attr(attn, "k_proj", "key"), first_attr(attn, "v_proj", "value")
        ),
        out_proj=first_attr(layer, "self_attn.out_proj", "attention.o_proj", "attention.output.dense"),
        ln2=first_attr(layer, "layer_norm2", "layernorm_after", "norm2"),
        fc1=mlp_fc1,
        act=first_attr(layer, "mlp.activation_fn", "intermediate.intermediate_act_fn"),
        fc2=first_attr(layer, "mlp.fc2", "output.dense"),
        n_heads=n_heads,
        d_head=d_head,
        attn_scale=float(first_attr(attn, "scaling", "scale", default=d_head**-0.5)),
        ls1=ls1,
        ls2=ls2,
        block=layer,
    )


BASE_ATTRS = ("vision_model", "vit", "dinov2", "dinov2_with_registers")
"""Attributes under which Hugging Face vision models nest the module holding ``embeddings``."""


def base_prefix(module: nn.Module) -> str:
    """The dotted path (``""``, ``"vision_model."``, ``"vision_model.vision_model."``, ``"dinov2."``, ...)
    of the submodule that holds ``embeddings`` and the layers: the one place the HF base module is
    found (the adapters' ``base`` and the TransformerLens bridge use it)."""
    prefix, m = "", module
    for _ in range(3):
        if hasattr(m, "embeddings"):
            return prefix
        inner = next((getattr(m, a) for a in BASE_ATTRS if isinstance(getattr(m, a, None), nn.Module)), None)
        if inner is None:
            break
        attr = next(a for a in BASE_ATTRS if getattr(m, a, None) is inner)
        m, prefix = inner, f"{prefix}{attr}."
    raise ValueError(
        f"No `embeddings` module found in {type(module).__name__} (looked under {', '.join(BASE_ATTRS)}); "
        "is this a Hugging Face vision model?"
    )


class _HFAdapter(ViTAdapter):
    """Shared HF logic; subclasses name their classes and state embeddings, pooling and head."""

    class_names: ClassVar[tuple[str, ...]] = ()
    default_mean: ClassVar[tuple[float, ...]] = (0.5, 0.5, 0.5)
    default_std: ClassVar[tuple[float, ...]] = (0.5, 0.5, 0.5)

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        if "transformers" not in sys.modules:
            return False
        return type(module).__name__ in cls.class_names and type(module).__module__.startswith("transformers.")

    @property
    def base(self) -> nn.Module:
        """The module holding ``embeddings`` and the layers (:func:`base_prefix`; the model itself in
        transformers 5)."""
        return self.module.get_submodule(base_prefix(self.module).rstrip("."))

    @property
    def hf_config(self) -> Any:
        return getattr(self.base, "config", self.module.config)

    def _layers(self) -> nn.ModuleList:
        return first_attr(self.base, "encoder.layers", "encoder.layer", "layers")

    def blocks(self) -> list[BlockParts]:
        return [_hf_layer_parts(layer) for layer in self._layers()]

    def config(self) -> HookedViTConfig:
        c, blocks = self.hf_config, self.blocks()
        n_reg = int(getattr(c, "num_register_tokens", 0) or 0)
        has_cls = self.has_cls
        size = c.image_size if isinstance(c.image_size, (tuple, list)) else (c.image_size, c.image_size)
        return HookedViTConfig(
            n_layers=len(blocks),
            d_model=c.hidden_size,
            n_heads=blocks[0].n_heads,
            d_head=blocks[0].d_head,
            d_mlp=blocks[0].fc1.out_features,
            patch_size=c.patch_size if isinstance(c.patch_size, int) else c.patch_size[0],
            image_size=tuple(size),
            n_prefix_tokens=int(has_cls) + n_reg,
            has_cls_token=has_cls,
            n_registers=n_reg,
            in_chans=getattr(c, "num_channels", 3),
            act_fn=act_fn_name(blocks[0].act),
            final_norm_after_pool=self.final_norm_after_pool,
            source=self.name,
            class_names=hf_class_names(c, int(getattr(c, "num_labels", 0)) if self.output_kind() == "logits" else 0),
            extra={"hf_class": type(self.module).__name__},
        )

    has_cls: ClassVar[bool] = True
    final_norm_after_pool: ClassVar[bool] = False

    def pool(self, x: Tensor) -> Tensor:
        return x[:, 0]

    def output_kind(self) -> str:
        return "logits" if hasattr(self.module, "classifier") else "embedding"

    def data_config(self) -> dict[str, Any]:
        """The family's defaults, overridden by the model's own image-processor settings when
        ``from_pretrained("hf:...")`` found them (``module.sve_data_config``)."""
        c = self.config()
        cfg = {
            "input_size": (c.in_chans, *c.image_size),
            "mean": self.default_mean,
            "std": self.default_std,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
        }
        return cfg | (getattr(self.module, "sve_data_config", None) or {})


@register_adapter("hf_vit")
class HFViTAdapter(_HFAdapter):
    class_names = ("ViTModel", "ViTForImageClassification")
    supported_types = tuple(f"transformers.{n}" for n in class_names)

    def embed(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        emb = self.base.embeddings
        x = emb.patch_embeddings(pixels)
        tok = torch.cat([emb.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return tok, emb.position_embeddings

    def ln_final(self) -> nn.Module | None:
        return self.base.layernorm

    def head(self, pooled: Tensor) -> Tensor:
        if hasattr(self.module, "classifier"):
            return self.module.classifier(pooled)
        pooler = getattr(self.base, "pooler", None)
        return pooled if pooler is None else pooler.activation(pooler.dense(pooled))

    def nonlinear_readout(self) -> str | None:
        if hasattr(self.module, "classifier") or getattr(self.base, "pooler", None) is None:
            return None
        return "the HF ViT pooler (dense + tanh on the CLS token)"

    def native_forward(self, pixels: Tensor) -> Tensor:
        out = self.module(pixel_values=pixels)
        if hasattr(out, "logits"):
            return out.logits
        return out.pooler_output if out.pooler_output is not None else out.last_hidden_state[:, 0]


@register_adapter("hf_clip")
class HFCLIPAdapter(_HFAdapter):
    class_names = ("CLIPVisionModel", "CLIPVisionModelWithProjection")
    supported_types = tuple(f"transformers.{n}" for n in class_names)
    default_mean = OPENAI_CLIP_MEAN
    default_std = OPENAI_CLIP_STD
    final_norm_after_pool = True

    def embed(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        emb = self.base.embeddings
        x = emb.patch_embedding(pixels.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        tok = torch.cat([emb.class_embedding.reshape(1, 1, -1).expand(x.shape[0], -1, -1), x], dim=1)
        return tok, emb.position_embedding.weight.unsqueeze(0)

    def ln_pre(self) -> nn.Module | None:
        return self.base.pre_layrnorm

    def ln_final(self) -> nn.Module | None:
        return self.base.post_layernorm

    def head(self, pooled: Tensor) -> Tensor:
        proj = getattr(self.module, "visual_projection", None)
        return pooled if proj is None else proj(pooled)

    def native_forward(self, pixels: Tensor) -> Tensor:
        out = self.module(pixel_values=pixels)
        return out.image_embeds if hasattr(out, "image_embeds") else out.pooler_output


@register_adapter("hf_dinov2")
class HFDinov2Adapter(_HFAdapter):
    """DINOv2; the classifier reads CLS concatenated with the mean of patch tokens (registers excluded)."""

    class_names = (
        "Dinov2Model", "Dinov2WithRegistersModel",
        "Dinov2ForImageClassification", "Dinov2WithRegistersForImageClassification",
    )  # fmt: skip
    supported_types = tuple(f"transformers.{n}" for n in class_names)
    default_mean, default_std = IMAGENET_MEAN, IMAGENET_STD

    def embed(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        emb = self.base.embeddings
        x = emb.patch_embeddings(pixels.to(emb.patch_embeddings.projection.weight.dtype))
        tok = torch.cat([emb.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        pos = emb.interpolate_pos_encoding(tok, pixels.shape[-2], pixels.shape[-1])
        reg = getattr(emb, "register_tokens", None)
        if reg is not None:  # registers sit after CLS and get no position embedding
            tok = torch.cat([tok[:, :1], reg.expand(x.shape[0], -1, -1), tok[:, 1:]], dim=1)
            pos = torch.cat([pos[:, :1], pos.new_zeros(1, reg.shape[1], pos.shape[-1]), pos[:, 1:]], dim=1)
        return tok, pos

    def ln_final(self) -> nn.Module | None:
        return self.base.layernorm

    def pool(self, x: Tensor) -> Tensor:
        if not hasattr(self.module, "classifier"):
            return x[:, 0]
        n_prefix = 1 + int(getattr(self.hf_config, "num_register_tokens", 0) or 0)
        return torch.cat([x[:, 0], x[:, n_prefix:].mean(dim=1)], dim=-1)

    def head(self, pooled: Tensor) -> Tensor:
        return self.module.classifier(pooled) if hasattr(self.module, "classifier") else pooled

    def native_forward(self, pixels: Tensor) -> Tensor:
        out = self.module(pixel_values=pixels)
        return out.logits if hasattr(out, "logits") else out.pooler_output


@register_adapter("hf_siglip")
class HFSiglipAdapter(_HFAdapter):
    """SigLIP: no CLS token; the pooled vector is the attention-pool head's output."""

    class_names = ("SiglipVisionModel",)
    supported_types = ("transformers.SiglipVisionModel",)
    has_cls = False

    def embed(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        emb = self.base.embeddings
        x = emb.patch_embedding(pixels.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        return x, emb.position_embedding.weight.unsqueeze(0)

    def ln_final(self) -> nn.Module | None:
        return self.base.post_layernorm

    def pool(self, x: Tensor) -> Tensor:
        head = getattr(self.base, "head", None)
        return x.mean(dim=1) if head is None else head(x)

    def nonlinear_readout(self) -> str | None:
        return None if getattr(self.base, "head", None) is None else "the SigLIP attention-pool head"

    def native_forward(self, pixels: Tensor) -> Tensor:
        out = self.module(pixel_values=pixels)
        return out.pooler_output if out.pooler_output is not None else out.last_hidden_state.mean(dim=1)


@register_loader("hf")
def load_hf(name: str, pretrained: bool = True, **kwargs: Any) -> nn.Module:
    """A Hub id or local folder. Picks the vision class from the config (CLIP/SigLIP -> vision tower).

    ``pretrained=False`` builds the architecture from its config with random weights (the config
    itself must be local or cached).
    """
    import transformers

    config = transformers.AutoConfig.from_pretrained(name)
    model_type = config.model_type
    vision_classes = {
        "clip": transformers.CLIPVisionModelWithProjection, "clip_vision_model": transformers.CLIPVisionModel,
        "siglip": transformers.SiglipVisionModel, "siglip_vision_model": transformers.SiglipVisionModel,
    }  # fmt: skip
    cls = vision_classes.get(model_type)
    if cls is None:
        archs = getattr(config, "architectures", None) or []
        cls = getattr(transformers, archs[0]) if archs and hasattr(transformers, archs[0]) else transformers.AutoModel
    if model_type in ("clip", "siglip"):  # the vision tower of a two-tower repo
        vision = config.vision_config
        if model_type == "clip":  # the true projection width lives in the top-level config
            vision.projection_dim = config.projection_dim
        config = vision
    if pretrained:
        model = cls.from_pretrained(name, config=config, **kwargs)
    else:
        model = cls._from_config(config, **kwargs) if cls is not transformers.AutoModel else cls.from_config(config)
    model.sve_data_config = _image_processor_config(name)
    return model


_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def _image_processor_config(name: str) -> dict[str, Any] | None:
    """Mean, std, interpolation and crop fraction from the repo's image processor, if it has one."""
    import transformers

    try:
        proc = transformers.AutoImageProcessor.from_pretrained(name)
    except Exception as e:  # no processor config (or offline): the family's defaults apply
        logger.info("no image processor for %s (%s); using the family's default preprocessing", name, e)
        return None
    cfg: dict[str, Any] = {}
    if getattr(proc, "image_mean", None) is not None:
        cfg["mean"], cfg["std"] = tuple(proc.image_mean), tuple(proc.image_std)
    if getattr(proc, "resample", None) is not None:
        cfg["interpolation"] = _RESAMPLE.get(int(proc.resample), "bicubic")
    size, crop = dict(getattr(proc, "size", None) or {}), dict(getattr(proc, "crop_size", None) or {})
    if "shortest_edge" in size and crop.get("height") and getattr(proc, "do_center_crop", False):
        cfg["crop_pct"] = crop["height"] / size["shortest_edge"]
    return cfg


def hf_class_names(config: PretrainedConfig, n_classes: int) -> tuple[str, ...]:
    """``config.id2label`` of an HF classifier, unless it holds only the ``LABEL_<i>`` placeholders."""
    id2label = getattr(config, "id2label", None) or {}
    names = [str(id2label.get(i, id2label.get(str(i), ""))) for i in range(n_classes)]
    if not n_classes or any(not n for n in names) or all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        return ()
    return tuple(names)
