"""``VisionSAETrainingConfig``: everything one ``train_saes`` run needs, with working defaults."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from .._config import ConfigMixin, coerce_fields
from .._hooks import resid_post
from .._registry import unknown_name_message
from ..activations.harvest import TOKEN_SELECTIONS, TokenSelection

Normalization = Literal["none", "expected_average_only_in", "layer_norm"]
LrScheduler = Literal["constant", "cosineannealing", "cosineannealingwarmrestarts"]
BDecInit = Literal["zeros", "mean", "geometric_median"]
TranscoderActivation = Literal["topk", "relu", "jumprelu"]
TranscoderInput = Literal["ln2.hook_normalized", "hook_resid_mid"]
PER_LAYER_KEYS = ("k", "d_sae", "expansion_factor", "l1_coefficient", "k_aux")
_DEVICE = re.compile(r"^(cpu|meta|mps|(cuda|xpu)(:\d+)?)$")
_TOPK_LIKE = ("topk", "batchtopk", "matryoshka_batchtopk")
_POSITIVE = (
    "k",
    "train_batch_size",
    "training_tokens",
    "image_batch_size",
    "n_images",
    "b_dec_init_tokens",
    "expansion_factor",
)
_POSITIVE_OR_NONE = (
    "lr",
    "decoder_init_norm",
    "transcoder_decoder_init_norm",
    "d_sae",
    "k_aux",
    "checkpoint_every_tokens",
    "checkpoint_every_seconds",
    "patches_per_image",
)
"""The numeric fields checked at construction (after numeric strings are converted)."""


def training_architectures() -> list[str]:
    """The training architectures SAELens registers (``standard``, ``topk``, ``batchtopk``, ...)."""
    import sae_lens  # noqa: F401  (importing SAELens fills its registry)
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    return list(SAE_TRAINING_CLASS_REGISTRY)


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
    """``sve:shapes``, an image folder, a ``datasets.save_to_disk`` folder with an ``image`` column,
    ``hf-dataset:<name or path>[:split][?image=col&label=col]`` or ``wds:<brace-expanded shard pattern>``."""
    n_images: int = 20_000
    """Images to draw from ``sve:shapes`` (folders use all their images); cycled when training needs more."""
    token_selection: TokenSelection = "all"
    """Which tokens train the SAEs: all | patches | cls | prefix | no_registers."""
    patches_per_image: int | None = None
    """Keep a random subset of this many patch tokens per image (``None``: all selected patches)."""
    architecture: str = "topk"
    """A SAELens training architecture (its registry: ``standard``, ``topk``, ``batchtopk``, ``jumprelu``,
    ``matryoshka_batchtopk``, ``gated``, ... and any class registered with ``register_sae_training_class``);
    ``transcoder`` / ``skip_transcoder`` (one per layer, ``transcoder_input`` -> ``hook_mlp_out``) or ``clt`` (a
    cross-layer transcoder over every block) train on (input, output) pairs instead (``training/pairs.py``)."""
    transcoder_activation: TranscoderActivation = "topk"
    """Sparsity of ``transcoder``, ``skip_transcoder`` and ``clt``: ``topk`` (``k``; AuxK for transcoders),
    ``relu`` (L1 weighted by decoder norms, ``l1_coefficient``) or ``jumprelu`` (L0, ``l1_coefficient``)."""
    transcoder_input: TranscoderInput = "ln2.hook_normalized"
    """What transcoders and CLTs read at each layer: ``blocks.{l}.<transcoder_input>`` (``ln2.hook_normalized``,
    the MLP's own input, or ``hook_resid_mid``); they always predict ``blocks.{l}.hook_mlp_out``."""
    transcoder_decoder_init_norm: float = 0.1
    """Norm of each transcoder or CLT decoder row at initialisation (``decoder_init_norm`` is the SAEs'). An
    MLP output is far smaller than a unit row per active feature, and a CLT sums every earlier block's
    decoders: at 1.0 a short run starts (and stays) at FVU > 1; the shipped transcoders use 0.1."""
    d_sae: int | None = None
    """SAE width; ``None`` uses ``expansion_factor * d_in``."""
    expansion_factor: float = 4.0
    """Width multiple of ``d_in`` when ``d_sae`` is not given."""
    k: int = 32
    """Active features per token for topk, batchtopk and matryoshka_batchtopk."""
    l1_coefficient: float = 5.0
    """Sparsity coefficient for standard and gated SAEs (``l0_coefficient`` for jumprelu)."""
    per_layer: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-hook overrides of ``k``, ``d_sae``, ``expansion_factor``, ``l1_coefficient``, ``k_aux`` (hook name ->
    dict); every key must name a trained hook."""
    b_dec_init: BDecInit = "mean"
    """Initial ``b_dec``: ``mean`` (or ``geometric_median``) of the first ``b_dec_init_tokens`` training
    tokens in the SAE's input space, or ``zeros`` (SAELens's own default)."""
    b_dec_init_tokens: int = 16_384
    """Tokens used to initialise ``b_dec`` (they are trained on afterwards as usual)."""
    decoder_init_norm: float | None = 1.0
    """Norm of each decoder row at initialisation (1.0 as Gao et al.; ``None`` keeps SAELens's raw init). SAELens's
    0.1 makes seeds agree (Adam's first steps dominate the small start) and raises ViSAEBench's monosemanticity,
    but leaves a third or more of the features dead on ``sve:shapes-vit`` (docs/benchmarks.md)."""
    aux_coefficient: float = 1 / 32
    """AuxK loss coefficient for ``topk`` SAEs (Gao et al. and the seed paper: 1/32; 0 turns AuxK off)."""
    k_aux: int | None = None
    """Dead latents per token in the AuxK loss (``None``: ``d_in // 2``; the seed paper: 256)."""
    dead_feature_window_tokens: int | None = None
    """A feature that fires on none of this many consecutive training tokens is dead (AuxK trains it,
    ``num_dead_features`` counts it). ``None``: a tenth of the run, between 1 and 1000 batches."""
    normalize_activations: Normalization = "expected_average_only_in"
    """SAELens input normalisation (``layer_norm``: per-token standardisation, as the seed paper)."""
    lr: float | None = None
    """Adam learning rate; ``None``: scaled by each SAE's width as dictionary_learning's TopK trainer scales
    it, ``2e-4 * (2**14 / d_sae) ** 0.5`` (:func:`width_scaled_lr`: 1.1e-3 at ``d_sae`` 512, 2e-4 at 16384)."""
    lr_end: float | None = None
    """Final learning rate for decaying schedules (``None``: a tenth of each SAE's ``lr``). Always passed to SAELens."""
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
    cache_in_memory_gb: float = 2.0
    """A cache up to this size (on disk) is read into memory once and shuffled exactly each epoch;
    larger caches stream from disk through the shuffle buffer. 0: always stream."""
    num_workers: int = 0
    """DataLoader workers for image loading."""
    device: str = "cpu"
    """Device for the model and the SAEs."""
    dtype: str = "float32"
    """SAE dtype."""
    seed: int = 0
    """Seed of the data: image draw, cache key, shuffling and patch subsampling."""
    init_seed: int | None = None
    """Seed of the SAE initialisation (``None``: ``seed``), so SAE seeds can vary on fixed activations."""
    cache_dir: str | None = None
    """Harvest once into an on-disk cache under this folder and train from it (``None``: harvest live)."""
    cache_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Storage dtype of the activation cache (float16/bfloat16 halve disk and read volume)."""
    images_per_shard: int = 256
    """Images per cache shard (the unit of resumption)."""
    output_dir: str = "runs/sae"
    """Each SAE is saved in SAELens format under ``output_dir/<hook_name>``."""
    n_checkpoints: int = 0
    """Intermediate SAELens checkpoints under ``output_dir/checkpoints`` (kept; for inspection)."""
    checkpoint_every_tokens: int | None = None
    """Write the resumable checkpoint every this many training tokens (``None``: by time only)."""
    checkpoint_every_seconds: float | None = 300.0
    """...and at least every this many seconds (``None``: by tokens only), so a ``kill -9`` loses at most
    one interval; SIGINT/SIGTERM always checkpoint before stopping."""
    stream: bool = False
    """Harvest straight into training with no cache on disk (needs ``cache_dir: null``): one forward per
    image batch feeds every hook's SAE through the shuffle buffer; with ``data_parallel`` each rank
    harvests its own images (``training/stream.py``)."""
    data_parallel: bool = False
    """Under torchrun, train every SAE on every rank, each on its slice of each batch (gradients averaged,
    dead-feature counts all-reduced, rank 0 checkpoints; ``training/ddp.py``) instead of one hook per rank."""
    log_to_wandb: bool = False
    """Log to Weights & Biases through SAELens."""
    wandb_project: str = "sae_vision_ext"
    """W&B project when ``log_to_wandb``."""

    def __post_init__(self) -> None:
        coerce_fields(self)
        self._check_choices()
        self._check_numbers()
        if not _DEVICE.match(str(self.device)):
            hint = " (did you mean 'cuda'?)" if str(self.device).lower() in ("gpu", "cuda0", "nvidia") else ""
            raise ValueError(f"device={self.device!r} is not a torch device{hint}; use 'cpu', 'cuda' or 'cuda:<i>'.")
        self._check_per_layer()

    def _check_choices(self) -> None:
        archs = training_architectures()
        if self.architecture not in archs:
            raise ValueError(unknown_name_message("SAELens training architecture", self.architecture, archs))
        for name, value, valid in (
            ("token_selection", self.token_selection, TOKEN_SELECTIONS),
            ("normalize_activations", self.normalize_activations, get_args(Normalization)),
            ("lr_scheduler_name", self.lr_scheduler_name, get_args(LrScheduler)),
            ("b_dec_init", self.b_dec_init, get_args(BDecInit)),
            ("transcoder_activation", self.transcoder_activation, get_args(TranscoderActivation)),
            ("transcoder_input", self.transcoder_input, get_args(TranscoderInput)),
        ):
            if value not in valid:
                raise ValueError(f"{name}={value!r} is not valid; choose one of {list(valid)}.")

    def _check_numbers(self) -> None:
        for name in _POSITIVE:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}.")
        for name in _POSITIVE_OR_NONE:
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive or None, got {getattr(self, name)!r}.")
        if self.cache_in_memory_gb < 0:
            raise ValueError(f"cache_in_memory_gb must be >= 0, got {self.cache_in_memory_gb!r}.")
        if self.aux_coefficient < 0:
            raise ValueError(f"aux_coefficient must be >= 0, got {self.aux_coefficient!r}.")
        if self.d_sae is not None and self.architecture in _TOPK_LIKE and self.k > self.d_sae:
            raise ValueError(f"k={self.k} is larger than d_sae={self.d_sae}: a token cannot have more active features.")
        if self.stream and self.cache_dir is not None:
            raise ValueError(
                f"stream=True harvests into training without a cache, but cache_dir={self.cache_dir!r} is set; "
                "set cache_dir to null (or stream to false)."
            )
        if self.shuffle_buffer_tokens < 2 * self.train_batch_size:
            raise ValueError(
                f"shuffle_buffer_tokens={self.shuffle_buffer_tokens} must be at least twice "
                f"train_batch_size={self.train_batch_size}."
            )

    def _check_per_layer(self) -> None:
        for hook, over in self.per_layer.items():
            bad = set(over) - set(PER_LAYER_KEYS)
            if bad:
                raise ValueError(f"per_layer[{hook!r}] has unknown keys {sorted(bad)}; valid: {list(PER_LAYER_KEYS)}.")
            for key, value in over.items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                    raise ValueError(f"per_layer[{hook!r}][{key!r}] must be a positive number, got {value!r}.")
                if key in ("k", "d_sae", "k_aux") and value != int(value):
                    raise ValueError(f"per_layer[{hook!r}][{key!r}] must be a whole number, got {value!r}.")

    @property
    def sae_init_seed(self) -> int:
        return self.seed if self.init_seed is None else self.init_seed

    @classmethod
    def seed_paper(
        cls, model: Literal["vit", "dinov2", "clip_vit"] = "vit", **overrides: Any
    ) -> VisionSAETrainingConfig:
        """The seed paper's recipe (Kim et al. 2025, ``2_train_TopKSAE.py``): TopK SAEs on blocks 0-10 with
        their per-layer ``k`` and width, per-token standardisation, AuxK (``k_aux`` 256, coefficient 1/32,
        dead after 60 batches), unit-norm decoder, Adam 2e-4. ``overrides`` replace any field (the
        model id defaults to the paper's model)."""
        from ..saes.rrm_checkpoints import RRM_LAYER_CONFIGS, RRM_MODELS

        table = RRM_LAYER_CONFIGS[model]
        d_model = 768
        per_layer = {resid_post(layer): {"k": k, "d_sae": int(ratio * d_model)} for layer, (k, ratio) in table.items()}
        base: dict[str, Any] = dict(
            model_name=RRM_MODELS[model],
            hook_names="all_resid_post",
            layers=sorted(table),
            architecture="topk",
            normalize_activations="layer_norm",
            k=max(k for k, _ in table.values()),
            per_layer=per_layer,
            k_aux=256,
            aux_coefficient=1 / 32,
            lr=2e-4,
            decoder_init_norm=1.0,
            b_dec_init="zeros",
            train_batch_size=4096,
            dead_feature_window_tokens=60 * 4096,
        )
        base.update(overrides)
        if "train_batch_size" in overrides and "dead_feature_window_tokens" not in overrides:
            base["dead_feature_window_tokens"] = 60 * int(base["train_batch_size"])
        return cls(**base)

    def for_hook(self, hook: str, key: str) -> Any:
        """``key`` for ``hook``: its per-layer override if any, else the run-wide value."""
        return self.per_layer.get(hook, {}).get(key, getattr(self, key))

    def lr_for(self, d_sae: int) -> float:
        """The learning rate of an SAE of width ``d_sae``: ``lr``, or :func:`width_scaled_lr` when ``None``."""
        return width_scaled_lr(d_sae) if self.lr is None else self.lr

    def lr_end_for(self, d_sae: int) -> float:
        """The final learning rate of an SAE of width ``d_sae``: ``lr_end``, or a tenth of its ``lr``."""
        return self.lr_for(d_sae) / 10 if self.lr_end is None else self.lr_end


def width_scaled_lr(d_sae: int) -> float:
    """dictionary_learning's TopK learning rate for width ``d_sae``: ``2e-4 * (2**14 / d_sae) ** 0.5``."""
    return 2e-4 * (2**14 / d_sae) ** 0.5
