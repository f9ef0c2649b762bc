"""TransformerLens ``TransformerBridge`` support for HF CLIP, SigLIP, DINOv2, DINOv3, AIMv2 and SigLIP 2.

TransformerLens 3.x/4.x bridges HF ``ViTModel``/DeiT only. This module adds architecture adapters
for ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``SiglipVisionModel``, ``Dinov2Model``,
``Dinov2WithRegistersModel``, ``DINOv3ViTModel``, ``Aimv2VisionModel`` and ``Siglip2VisionModel`` so
that ``TransformerBridge.boot_transformers(name, hf_model=model)`` gives the same hook names on them
(``blocks.{l}.hook_resid_post``, ``blocks.{l}.attn.hook_pattern``, ...). The bridge's MLP and
attention components delegate to HF's forwards (SigLIP 2's NaFlex embeddings and mask included),
except DINOv3's RoPE attention: :class:`PrefixRopeAttentionBridge` computes it with
``attn.hook_rot_q``/``hook_rot_k``, leaving the CLS and register tokens unrotated.
SwiGLU MLPs use ``GatedMLPBridge`` (``mlp.hook_pre``, ``mlp.hook_pre_linear``, ``mlp.hook_post``);
LayerScale (DINOv2/v3) is wrapped so ``hook_attn_out``/``hook_mlp_out`` are the scaled outputs.

How registration works (and why a call is needed): the package declares the adapters under
TransformerLens's entry-point group ``transformer_lens.architectures``, which fills the adapter
factory, but ``boot_transformers`` first looks the architecture name up in the static table
``transformer_lens.factories.architecture_adapter_factory.SUPPORTED_ARCHITECTURES``.
:func:`register_tl_bridge_adapters` adds the names to both (idempotent); :func:`boot_vision_bridge`
calls it, sets ``config.architectures`` and eager attention (patterns only exist in eager mode),
and boots the bridge without touching the network.

This is the one module that imports TransformerLens's bridge internals; it is imported only on use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge.generalized_components import (
    AttentionBridge,
    BlockBridge,
    GatedMLPBridge,
    LinearBridge,
    MLPBridge,
    NormalizationBridge,
    RMSNormalizationBridge,
)
from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
    PositionEmbeddingsAttentionBridge,
)
from transformer_lens.model_bridge.supported_architectures.vit import ViTArchitectureAdapter

from .adapters.hf import base_prefix

if TYPE_CHECKING:
    from torch import nn


class PixelEmbeddingsBridge(GeneralizedComponent):
    """Wraps an HF vision embeddings module; passes pixels positionally and other arguments through
    (TransformerLens's ``VisionEmbeddingsBridge`` always sends ``bool_masked_pos``, which CLIP and
    SigLIP embeddings do not accept)."""

    def forward(self, pixel_values: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return super().forward(pixel_values, *args, **kwargs)


class PrefixRopeAttentionBridge(PositionEmbeddingsAttentionBridge):
    """Bidirectional RoPE attention whose prefix tokens (CLS, registers) are left unrotated (HF DINOv3).

    TransformerLens's bridge rotates every token with Llama's rotate-half formula, which is DINOv3's;
    the prefix tokens get ``cos = 1, sin = 0`` (an exact identity), so ``hook_rot_q``/``hook_rot_k``
    fire on the rotated queries and keys of all tokens."""

    def __init__(self, name: str, config: Any, submodules: dict[str, Any]) -> None:
        super().__init__(name, config, submodules=submodules, requires_attention_mask=False, is_causal=False)
        if not hasattr(self, "hook_rot_q"):  # TL adds them only for cfg.positional_embedding_type "rotary"
            self.hook_rot_q, self.hook_rot_k = HookPoint(), HookPoint()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        cos, sin = kwargs["position_embeddings"]
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        n_prefix = hidden.shape[-2] - cos.shape[-2]
        if cos.ndim == 2:  # [patches, d_head] -> [1, tokens, d_head] (unsqueezed to broadcast over heads)
            cos, sin = cos[None], sin[None]
        pad = (*cos.shape[:-2], n_prefix, cos.shape[-1])
        kwargs["position_embeddings"] = (
            torch.cat([cos.new_ones(pad), cos], dim=-2),
            torch.cat([sin.new_zeros(pad), sin], dim=-2),
        )
        return super().forward(*args, **kwargs)


class _VisionEncoderAdapter(ViTArchitectureAdapter):
    """Shared mapping; subclasses name the layer list, norms, attention and final norm."""

    layers = "encoder.layers"
    ln1, ln2, attn, out_proj, final_norm = "layer_norm1", "layer_norm2", "self_attn", "out_proj", "post_layernorm"
    mlp, fc_in, fc_out = "mlp", "fc1", "fc2"
    norm_bridge: type[NormalizationBridge] = NormalizationBridge
    attn_bridge: type[AttentionBridge] = AttentionBridge
    gated = False  # SwiGLU MLP: ``gate`` (act branch), ``in`` (linear branch), ``out``
    layer_scale = False  # ``layer_scale1``/``layer_scale2`` wrapped as ``ls1``/``ls2``

    def _norm(self, name: str) -> NormalizationBridge:
        if self.norm_bridge is RMSNormalizationBridge:
            return RMSNormalizationBridge(name=name, config=self.cfg)
        return NormalizationBridge(name=name, config=self.cfg, use_native_layernorm_autograd=True)

    def _mlp(self) -> MLPBridge:
        if self.gated:
            linears = {"gate": "gate_proj", "in": "up_proj", "out": "down_proj"}
            subs = {k: LinearBridge(name=v) for k, v in linears.items()}
            return GatedMLPBridge(name=self.mlp, config=self.cfg, submodules=subs)
        subs = {"in": LinearBridge(name=self.fc_in), "out": LinearBridge(name=self.fc_out)}
        return MLPBridge(name=self.mlp, config=self.cfg, submodules=subs)

    def _block_aliases(self) -> dict[str, str]:
        aliases = {"hook_mlp_out": "mlp.out.hook_out", "hook_mlp_in": "mlp.in.hook_in"}
        if self.layer_scale:  # the block's outputs are the LayerScaled ones (as HookedViT's)
            aliases |= {"hook_attn_out": "ls1.hook_out", "hook_mlp_out": "ls2.hook_out"}
        return aliases

    def _layer_scales(self) -> dict[str, GeneralizedComponent]:
        if not self.layer_scale:
            return {}
        return {"ls1": GeneralizedComponent(name="layer_scale1"), "ls2": GeneralizedComponent(name="layer_scale2")}

    def _build_component_mapping(self, prefix: str, with_classifier: bool) -> dict[str, Any]:
        p = prefix
        return {
            "embed": PixelEmbeddingsBridge(name=f"{p}embeddings"),
            "blocks": BlockBridge(
                name=f"{p}{self.layers}",
                hook_alias_overrides=self._block_aliases(),
                submodules={
                    **self._layer_scales(),
                    "ln1": self._norm(self.ln1),
                    "ln2": self._norm(self.ln2),
                    "attn": self.attn_bridge(
                        name=self.attn,
                        config=self.cfg,
                        submodules={
                            "q": LinearBridge(name="q_proj"),
                            "k": LinearBridge(name="k_proj"),
                            "v": LinearBridge(name="v_proj"),
                            "o": LinearBridge(name=self.out_proj),
                        },
                    ),
                    "mlp": self._mlp(),
                },
            ),
            "ln_final": self._norm(f"{p}{self.final_norm}"),
        }

    def prepare_model(self, hf_model: Any) -> None:
        self.component_mapping = self._build_component_mapping(base_prefix(hf_model), with_classifier=False)


class CLIPVisionArchitectureAdapter(_VisionEncoderAdapter):
    """HF ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` (``ln_final`` acts on the pooled CLS)."""


class SiglipVisionArchitectureAdapter(_VisionEncoderAdapter):
    """HF ``SiglipVisionModel`` (no CLS token; the attention-pool head is left unhooked)."""


class Dinov2ArchitectureAdapter(_VisionEncoderAdapter):
    """HF ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (transformers 5 attribute names)."""

    layers, ln1, ln2, attn, out_proj, final_norm = "encoder.layer", "norm1", "norm2", "attention", "o_proj", "layernorm"
    layer_scale = True


class DINOv3ViTArchitectureAdapter(Dinov2ArchitectureAdapter):
    """HF ``DINOv3ViTModel``: RoPE is applied inside HF's attention forward (the bridge delegates to
    it, so outputs are exact, but ``attn.hook_rot_q``/``hook_rot_k`` do not exist); GELU or SwiGLU MLP."""

    layers, final_norm, fc_in, fc_out = "model.layer", "norm", "up_proj", "down_proj"
    attn_bridge = PrefixRopeAttentionBridge

    def prepare_model(self, hf_model: Any) -> None:
        self.gated = bool(getattr(hf_model.config, "use_gated_mlp", False))
        super().prepare_model(hf_model)


class Aimv2VisionArchitectureAdapter(_VisionEncoderAdapter):
    """HF ``Aimv2VisionModel``: RMSNorm, SwiGLU ``ffn``; the attention-pool head is left unhooked."""

    ln1, ln2, attn, mlp, final_norm = "rms_norm1", "rms_norm2", "attention", "ffn", "rms_norm"
    norm_bridge, gated = RMSNormalizationBridge, True


class Siglip2VisionArchitectureAdapter(_VisionEncoderAdapter):
    """HF ``Siglip2VisionModel``: pass ``pixel_values`` patchified with ``spatial_shapes`` and
    ``pixel_attention_mask`` as HF takes them; the embeddings bridge forwards both."""


BRIDGE_ADAPTERS: dict[str, type[ViTArchitectureAdapter]] = {
    "CLIPVisionModel": CLIPVisionArchitectureAdapter,
    "CLIPVisionModelWithProjection": CLIPVisionArchitectureAdapter,
    "SiglipVisionModel": SiglipVisionArchitectureAdapter,
    "Dinov2Model": Dinov2ArchitectureAdapter,
    "Dinov2WithRegistersModel": Dinov2ArchitectureAdapter,
    "DINOv3ViTModel": DINOv3ViTArchitectureAdapter,
    "Aimv2VisionModel": Aimv2VisionArchitectureAdapter,
    "Siglip2VisionModel": Siglip2VisionArchitectureAdapter,
}


def register_tl_bridge_adapters() -> list[str]:
    """Add this package's adapters to TransformerLens's factory and static table; return the names."""
    from transformer_lens.factories import architecture_adapter_factory as factory

    factory.ArchitectureAdapterFactory.discover_entry_points()  # loads ours via the entry points, once
    for name, adapter in BRIDGE_ADAPTERS.items():
        factory.SUPPORTED_ARCHITECTURES.setdefault(name, adapter)
        if factory.ArchitectureAdapterFactory._adapters.get(name) is not adapter:
            factory.ArchitectureAdapterFactory.register_adapter(name, adapter)
    return list(BRIDGE_ADAPTERS)


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Make transformers/huggingface_hub answer from local files only (no retries against a hub)."""
    import huggingface_hub.constants as hub_constants

    old = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = old


def boot_vision_bridge(hf_model: nn.Module, model_name: str | None = None, offline: bool = True) -> nn.Module:
    """A ``TransformerBridge`` over an already-built HF vision encoder (any class TL or we support).

    Sets ``hf_model.config.architectures`` to the model's class name when missing and switches the
    model to eager attention so ``hook_pattern`` fires. ``offline`` keeps the boot from contacting
    a model hub (it otherwise looks for an image processor under ``model_name``).
    """
    from transformer_lens.model_bridge import TransformerBridge

    register_tl_bridge_adapters()
    cls_name = type(hf_model).__name__
    if not getattr(hf_model.config, "architectures", None):
        hf_model.config.architectures = [cls_name]
    if hasattr(hf_model, "set_attn_implementation"):
        hf_model.set_attn_implementation("eager")
    else:
        hf_model.config._attn_implementation = "eager"
    ctx = _hub_offline() if offline else contextlib.nullcontext()
    with ctx:
        return TransformerBridge.boot_transformers(model_name or cls_name, hf_model=hf_model)
