"""``VisionSAETrainingConfig``: everything one ``train_saes`` run needs, with working defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from .._config import ConfigMixin
from ..activations.harvest import TOKEN_SELECTIONS, TokenSelection

Architecture = Literal["standard", "topk", "batchtopk", "jumprelu", "matryoshka_batchtopk", "gated"]
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)
Normalization = Literal["none", "expected_average_only_in", "layer_norm"]
LrScheduler = Literal["constant", "cosineannealing", "cosineannealingwarmrestarts"]


@dataclass
class VisionSAETrainingConfig(ConfigMixin):
    """One SAE per hook, all trained from one activation stream (one model forward per image batch)."""

    model_name: str = "sve:shapes-vit"
    """Model id for ``HookedViT.from_pretrained`` (``timm:``, ``open_clip:``, ``hf:``, ``sve:``)."""
    hook_names: str | list[str] = "all_resid_post"
    """``all_resid_post`` (or ``all_resid_pre|mid``, ``all_attn_out``, ``all_mlp_out``), one name or a list."""
    layers: list[int] | None = None
    """With an ``all_*`` group: only these layers (``None``: every layer)."""
    dataset: str = "sve:shapes"
    """``sve:shapes``, an image folder, or a ``datasets.save_to_disk`` folder with an ``image`` column."""
    n_images: int = 20_000
    """Images to draw from ``sve:shapes`` (folders use all their images); cycled when training needs more."""
    token_selection: TokenSelection = "all"
    """Which tokens train the SAEs: all | patches | cls | prefix | no_registers."""
    patches_per_image: int | None = None
    """Keep a random subset of this many patch tokens per image (``None``: all selected patches)."""
    architecture: Architecture = "topk"
    """SAELens training architecture."""
    d_sae: int | None = None
    """SAE width; ``None`` uses ``expansion_factor * d_in``."""
    expansion_factor: float = 4.0
    """Width multiple of ``d_in`` when ``d_sae`` is not given."""
    k: int = 32
    """Active features per token for topk, batchtopk and matryoshka_batchtopk."""
    l1_coefficient: float = 5.0
    """Sparsity coefficient for standard and gated SAEs (``l0_coefficient`` for jumprelu)."""
    per_layer: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-hook overrides of ``k``, ``d_sae``, ``expansion_factor``, ``l1_coefficient`` (hook name -> dict)."""
    normalize_activations: Normalization = "expected_average_only_in"
    """SAELens input normalisation (``layer_norm``: per-token standardisation, as the seed paper)."""
    lr: float = 4e-4
    """Adam learning rate."""
    lr_end: float | None = None
    """Final learning rate for decaying schedules (``None``: ``lr / 10``). Always passed to SAELens."""
    lr_scheduler_name: LrScheduler = "constant"
    """SAELens learning-rate schedule."""
    lr_warm_up_steps: int = 0
    """Linear warm-up steps."""
    train_batch_size: int = 1024
    """Tokens per SAE training step."""
    training_tokens: int = 2_000_000
    """Tokens each SAE sees in total."""
    image_batch_size: int = 64
    """Images per model forward while harvesting."""
    shuffle_buffer_tokens: int = 65_536
    """Tokens mixed across images before batches are drawn (at least twice the batch size)."""
    num_workers: int = 0
    """DataLoader workers for image loading."""
    device: str = "cpu"
    """Device for the model and the SAEs."""
    dtype: str = "float32"
    """SAE dtype."""
    seed: int = 0
    """Seed for SAE initialisation, shuffling and patch subsampling."""
    cache_dir: str | None = None
    """Harvest once into an on-disk cache under this folder and train from it (``None``: harvest live)."""
    cache_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Storage dtype of the activation cache (float16/bfloat16 halve disk and read volume)."""
    images_per_shard: int = 256
    """Images per cache shard (the unit of resumption)."""
    output_dir: str = "runs/sae"
    """Each SAE is saved in SAELens format under ``output_dir/<hook_name>``."""
    n_checkpoints: int = 0
    """Intermediate SAELens checkpoints under ``output_dir/checkpoints``."""
    log_to_wandb: bool = False
    """Log to Weights & Biases through SAELens."""
    wandb_project: str = "sae_vision_ext"
    """W&B project when ``log_to_wandb``."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"Unknown architecture {self.architecture!r}; valid: {ARCHITECTURES}.")
        if self.token_selection not in TOKEN_SELECTIONS:
            raise ValueError(f"Unknown token_selection {self.token_selection!r}; valid: {TOKEN_SELECTIONS}.")
        if self.normalize_activations not in get_args(Normalization):
            raise ValueError(
                f"Unknown normalize_activations {self.normalize_activations!r}; valid: {get_args(Normalization)}."
            )
        for name in ("k", "train_batch_size", "training_tokens", "image_batch_size", "n_images"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}.")
        if self.expansion_factor <= 0 or (self.d_sae is not None and self.d_sae <= 0):
            raise ValueError(
                f"SAE width must be positive (d_sae={self.d_sae}, expansion_factor={self.expansion_factor})."
            )
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}.")
        if self.shuffle_buffer_tokens < 2 * self.train_batch_size:
            raise ValueError(
                f"shuffle_buffer_tokens={self.shuffle_buffer_tokens} must be at least twice "
                f"train_batch_size={self.train_batch_size}."
            )
        if self.patches_per_image is not None and self.patches_per_image <= 0:
            raise ValueError(f"patches_per_image must be positive or None, got {self.patches_per_image!r}.")
        allowed = {"k", "d_sae", "expansion_factor", "l1_coefficient"}
        for hook, over in self.per_layer.items():
            bad = set(over) - allowed
            if bad:
                raise ValueError(f"per_layer[{hook!r}] has unknown keys {sorted(bad)}; valid: {sorted(allowed)}.")

    def for_hook(self, hook: str, key: str) -> Any:
        """``key`` for ``hook``: its per-layer override if any, else the run-wide value."""
        return self.per_layer.get(hook, {}).get(key, getattr(self, key))

    @property
    def effective_lr_end(self) -> float:
        return self.lr / 10 if self.lr_end is None else self.lr_end
