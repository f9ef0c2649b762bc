"""TransformerLens ``TransformerBridge`` support for HF CLIP, SigLIP and DINOv2 vision encoders.

TransformerLens 3.x/4.x bridges HF ``ViTModel``/DeiT only. This module adds architecture adapters
for ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``SiglipVisionModel``, ``Dinov2Model``
and ``Dinov2WithRegistersModel`` so that
``TransformerBridge.boot_transformers(name, hf_model=model)`` gives the same hook names on them
(``blocks.{l}.hook_resid_post``, ``blocks.{l}.attn.hook_pattern``, ...).

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

from torch import Tensor
from transformer_lens.model_bridge.generalized_components import (
    AttentionBridge,
    BlockBridge,
    LinearBridge,
    MLPBridge,
    NormalizationBridge,
)
from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
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


class _VisionEncoderAdapter(ViTArchitectureAdapter):
    """Shared mapping; subclasses name the layer list, norms, attention and final norm."""

    layers = "encoder.layers"
    ln1, ln2, attn, out_proj, final_norm = "layer_norm1", "layer_norm2", "self_attn", "out_proj", "post_layernorm"

    def _build_component_mapping(self, prefix: str, with_classifier: bool) -> dict[str, Any]:
        p = prefix
        return {
            "embed": PixelEmbeddingsBridge(name=f"{p}embeddings"),
            "blocks": BlockBridge(
                name=f"{p}{self.layers}",
                hook_alias_overrides={"hook_mlp_out": "mlp.out.hook_out", "hook_mlp_in": "mlp.in.hook_in"},
                submodules={
                    "ln1": NormalizationBridge(name=self.ln1, config=self.cfg, use_native_layernorm_autograd=True),
                    "ln2": NormalizationBridge(name=self.ln2, config=self.cfg, use_native_layernorm_autograd=True),
                    "attn": AttentionBridge(
                        name=self.attn,
                        config=self.cfg,
                        submodules={
                            "q": LinearBridge(name="q_proj"),
                            "k": LinearBridge(name="k_proj"),
                            "v": LinearBridge(name="v_proj"),
                            "o": LinearBridge(name=self.out_proj),
                        },
                    ),
                    "mlp": MLPBridge(
                        name="mlp",
                        config=self.cfg,
                        submodules={"in": LinearBridge(name="fc1"), "out": LinearBridge(name="fc2")},
                    ),
                },
            ),
            "ln_final": NormalizationBridge(
                name=f"{p}{self.final_norm}", config=self.cfg, use_native_layernorm_autograd=True
            ),
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


BRIDGE_ADAPTERS: dict[str, type[ViTArchitectureAdapter]] = {
    "CLIPVisionModel": CLIPVisionArchitectureAdapter,
    "CLIPVisionModelWithProjection": CLIPVisionArchitectureAdapter,
    "SiglipVisionModel": SiglipVisionArchitectureAdapter,
    "Dinov2Model": Dinov2ArchitectureAdapter,
    "Dinov2WithRegistersModel": Dinov2ArchitectureAdapter,
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
