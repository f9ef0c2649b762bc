"""The adapter contract: how one model family maps onto the generic hooked forward.

``HookedViT`` runs one forward for every family::

    tok, pos = adapter.embed(pixels)          -> hook_embed, hook_pos_embed   [batch pos d_model]
    x = ln_pre(tok + pos)                     -> ln_pre.hook_normalized (if the model has ln_pre)
    x = blocks[l](x)  for l < n_layers        -> blocks.{l}.*
    x = ln_final(x)   (per token, unless cfg.final_norm_after_pool)
    pooled = adapter.pool(x)                  (ln_final here instead when final_norm_after_pool)
    out = adapter.head(pooled)                -> hook_pooled, hook_out

An adapter only says *where* each piece lives in the wrapped module (and any quirk: prefix
tokens, pooling, projection); it never copies weights. Register a new family with
``@register_adapter("name")`` and it gets the whole test suite (tests parametrise over the registry).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from jaxtyping import Float
from torch import Tensor, nn

from ..._compat import is_identity
from ..._registry import Registry
from ..components import BlockParts
from ..config import HookedViTConfig

ADAPTERS: Registry[type[ViTAdapter]] = Registry("adapter")
LOADERS: Registry[Callable[..., nn.Module]] = Registry("model source")


def register_adapter(name: str) -> Callable[[type[ViTAdapter]], type[ViTAdapter]]:
    """Class decorator registering a :class:`ViTAdapter` subclass under ``name``."""

    def deco(cls: type[ViTAdapter]) -> type[ViTAdapter]:
        cls.name = name
        return ADAPTERS.register(name)(cls)

    return deco


def register_loader(prefix: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register ``fn(name, pretrained=True, **kwargs) -> nn.Module`` for ``"<prefix>:<name>"`` ids."""
    return LOADERS.register(prefix)


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""CLIP's normalisation (the values of ``timm.data.OPENAI_CLIP_MEAN``, kept here so that wrapping a
model does not import timm); the open_clip and HF CLIP adapters use them."""
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ViTAdapter:
    """Base class: one instance wraps one module. Subclasses fill in the methods below."""

    name: ClassVar[str] = "base"
    supported_types: ClassVar[tuple[str, ...]] = ()
    """Human-readable module types this adapter accepts (listed in errors and ``list_adapters``)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        """True if this adapter can wrap ``module``. Must not import heavy libraries."""
        raise NotImplementedError

    def config(self) -> HookedViTConfig:
        raise NotImplementedError

    def embed(self, pixels: Float[Tensor, "batch chan h w"]) -> tuple[Tensor, Tensor]:
        """``(token_embed, pos_embed)``, both ``[batch or 1, pos, d_model]``, summing to the first residual.

        ``token_embed`` holds the prefix tokens (CLS, registers, distillation) and the patch
        embeddings; ``pos_embed`` is zero where a token gets no position embedding.
        """
        raise NotImplementedError

    def ln_pre(self) -> nn.Module | None:
        return None

    def blocks(self) -> list[BlockParts]:
        raise NotImplementedError

    def ln_final(self) -> nn.Module | None:
        return None

    def pool(self, x: Tensor) -> Tensor:
        """The vector(s) the head reads, from the (final-normed) residual stream."""
        raise NotImplementedError

    def head(self, pooled: Tensor) -> Tensor:
        return pooled

    def nonlinear_readout(self) -> str | None:
        """``None`` when pooling and head are affine in the final residual once ``ln_final``'s scale is
        frozen (what exact attribution needs); otherwise what is not (an attention pool, a ``tanh``
        pooler), named for the error message. A capability, so circuits code never tests class names."""
        return None

    def output_kind(self) -> str:
        """``"logits"`` for classifiers, ``"embedding"`` for feature/embedding outputs (picks eval metrics)."""
        return "embedding"

    def native_forward(self, pixels: Tensor) -> Tensor:
        """The wrapped module's own forward, reduced to the tensor ``HookedViT.forward`` returns."""
        raise NotImplementedError

    def data_config(self) -> dict[str, Any]:
        """Preprocessing facts: ``input_size`` (C, H, W), ``mean``, ``std``, ``interpolation``, ``crop_pct``."""
        raise NotImplementedError


def adapter_for(module: nn.Module) -> ViTAdapter:
    """Instantiate the first registered adapter that accepts ``module``; ``ValueError`` if none."""
    for _, cls in ADAPTERS.items():
        if cls.matches(module):
            return cls(module)
    supported = [t for _, cls in ADAPTERS.items() for t in cls.supported_types]
    raise ValueError(
        f"No adapter wraps a {type(module).__module__}.{type(module).__name__}. Supported module types: "
        f"{', '.join(supported)}. Pass one of these (for an open_clip CLIP model its `.visual` is used), "
        "or register an adapter with @sae_vision_ext.register_adapter."
    )


def optional(module: nn.Module | None) -> nn.Module | None:
    """``None`` for a missing or identity module, else the module."""
    return None if is_identity(module) else module


def unsupported(what: str, module: nn.Module, fix: str = "") -> ValueError:
    return ValueError(f"{what} is not supported (in {type(module).__name__}). {fix}".strip())
