"""``HookedViTConfig``: the shape facts of a wrapped ViT, in TransformerLens's vocabulary."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .._config import ConfigMixin

ActFn = Literal["gelu", "gelu_tanh", "quick_gelu", "relu", "silu", "other"]
Normalization = Literal["LN", "RMS"]


@dataclass
class HookedViTConfig(ConfigMixin):
    """Architecture facts of a hooked ViT. Built by the adapter from the wrapped module; read-only."""

    n_layers: int
    """Number of transformer blocks."""
    d_model: int
    """Width of the residual stream."""
    n_heads: int
    """Attention heads per block."""
    d_head: int
    """Width of one head's query/key/value."""
    d_mlp: int
    """Hidden width of the MLP."""
    patch_size: int
    """Side of one square patch in pixels."""
    image_size: tuple[int, int]
    """(height, width) the model was built for."""
    n_prefix_tokens: int = 1
    """Tokens before the patches (timm's ``num_prefix_tokens``): CLS, then registers or distillation."""
    has_cls_token: bool = True
    """Whether position 0 is a class token."""
    n_registers: int = 0
    """Register tokens (after the CLS token, before the patches)."""
    in_chans: int = 3
    """Input channels."""
    act_fn: ActFn = "gelu"
    """MLP activation, TransformerLens spelling ('gelu' is exact erf GELU)."""
    normalization: Normalization = "LN"
    """Normalisation layer kind."""
    final_norm_after_pool: bool = False
    """True when the final norm acts on the pooled vector (timm ``fc_norm``, HF CLIP) not per token."""
    dynamic_img_size: bool = False
    """True when the model accepts other image sizes (position embeddings resampled)."""
    naflex: bool = False
    """True for NaFlex models (HF SigLIP 2, timm NaFlexVit): each image of a batch at its own size, padded
    patch sequences with an attention mask (``models/naflex.py``)."""
    model_name: str = "unknown"
    """Name the model was loaded under, e.g. ``timm:vit_base_patch16_224``."""
    source: str = "unknown"
    """Adapter that wraps it, e.g. ``timm``, ``open_clip``, ``hf_clip``."""
    device: str = "cpu"
    """Device of the parameters when the model was wrapped (TransformerLens reads ``cfg.device``)."""
    class_names: tuple[str, ...] = ()
    """Name of each output class, when the model knows them (HF ``id2label``, timm ImageNet heads, the
    embedded models); empty otherwise. Graph targets and dashboards use them."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Family-specific facts (pooling type, head kind, ...), for display only."""

    # TransformerLens's ActivationCache helpers read these HookedTransformerConfig fields.
    attn_only: bool = False
    """Always False: every block has an MLP."""
    positional_embedding_type: str = "standard"
    """``"standard"``: absolute position embeddings added once before the first block (with or without
    RoPE inside attention); ``"rotary"``: RoPE only, ``hook_pos_embed`` is zero (DINOv3)."""

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "patch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"HookedViTConfig.{name} must be a positive int, got {value!r}.")
        self.image_size = tuple(int(s) for s in self.image_size)  # type: ignore[assignment]
        if len(self.image_size) != 2:
            raise ValueError(f"HookedViTConfig.image_size must be (height, width), got {self.image_size!r}.")
        if self.n_prefix_tokens < int(self.has_cls_token) + self.n_registers:
            raise ValueError(
                f"n_prefix_tokens={self.n_prefix_tokens} is fewer than CLS ({self.has_cls_token}) "
                f"plus {self.n_registers} registers."
            )

    @property
    def normalization_type(self) -> str:
        """TransformerLens name for :attr:`normalization`."""
        return self.normalization

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patches per (column, row) at :attr:`image_size`."""
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    @property
    def n_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def n_ctx(self) -> int:
        """Tokens per image: prefix tokens then patches."""
        return self.n_prefix_tokens + self.n_patches

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HookedViTConfig:
        """As :class:`ConfigMixin`, accepting ``image_size`` as a list (JSON has no tuples)."""
        if "image_size" in d:
            d = {**d, "image_size": tuple(d["image_size"])}
        if "class_names" in d:
            d = {**d, "class_names": tuple(d["class_names"])}
        return super().from_dict(d)
