"""Training transcoders and cross-layer transcoders on (input, output) pairs harvested in one pass.

``architecture`` ``transcoder`` / ``skip_transcoder`` (or a registered training transcoder,
:data:`~.transcoders.TRAINING_TRANSCODERS`) trains one transcoder per layer of ``cfg.layers`` (all by
default) from ``blocks.{l}.<transcoder_input>`` to ``blocks.{l}.hook_mlp_out``; ``clt`` trains one CLT
over every block. The model runs once per image batch for every input and output hook (live, streamed
or through the cache, as for SAEs: :func:`~.train.activation_stream`); :class:`PairPlan` puts each
SAE's input and target side by side in one tensor, which SAELens's ``MultiSAETrainer`` trains on.

Saved as: each transcoder in SAELens's format under ``output_dir/<input hook>`` (``cfg.metadata``:
``hook_name`` the input, ``hook_name_out`` the output; plain ``SAE.load_from_disk`` reads it after
``import sae_vision_ext``), the CLT in circuit-tracer's layout under ``output_dir/clt``. Checkpoints
and ``resume`` are :mod:`.checkpoints`' (the same ``state.json``, one folder per SAE). One process
only: layer- and data-parallel runs are refused.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from sae_lens import TrainingSAE

    from ..models.hooked_vit import HookedViT
    from .config import VisionSAETrainingConfig

logger = logging.getLogger(__name__)
CLT_KEY = "clt"
"""The CLT's name in the trainer, its checkpoint folder and its output folder."""


def is_paired(cfg: VisionSAETrainingConfig) -> bool:
    """True when ``cfg`` trains transcoders or a CLT."""
    from .transcoders import TRAINING_TRANSCODERS

    return cfg.architecture == CLT_KEY or cfg.architecture in TRAINING_TRANSCODERS


def training_architecture(cfg: VisionSAETrainingConfig) -> str:
    """The registered training architecture ``cfg`` trains (``transcoder`` + ``topk`` -> ``topk_transcoder``)."""
    from .transcoders import training_transcoder_architecture

    return training_transcoder_architecture(cfg.architecture, cfg.transcoder_activation)


@dataclass(frozen=True)
class PairPlan:
    """Which hooks feed which SAE: ``inputs[key]`` and ``outputs[key]`` in layer order."""

    keys: list[str]
    inputs: dict[str, list[str]]
    outputs: dict[str, list[str]]

    @property
    def harvest_hooks(self) -> list[str]:
        """Every hook the run reads, each once, in the order a forward reaches them."""
        hooks = {h for key in self.keys for h in (*self.inputs[key], *self.outputs[key])}
        return sorted(hooks, key=lambda h: (int(h.split(".")[1]), h.endswith("hook_mlp_out")))

    def pair(self, stream: Iterator[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
        """``{hook: [batch, d]}`` batches -> ``{key: [batch, Σ d_in + Σ d_out]}`` (inputs, then targets)."""
        for batch in stream:
            yield {k: torch.cat([batch[h] for h in (*self.inputs[k], *self.outputs[k])], dim=-1) for k in self.keys}


def pair_plan(cfg: VisionSAETrainingConfig, n_layers: int) -> PairPlan:
    """The plan for a model of ``n_layers`` blocks; ``ValueError`` for layers it does not have or a CLT
    over a subset of layers."""
    layers = list(range(n_layers)) if cfg.layers is None else list(cfg.layers)
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"layers={cfg.layers} names layers {bad}; the model has blocks 0..{n_layers - 1}.")
    ins = [f"blocks.{layer}.{cfg.transcoder_input}" for layer in layers]
    outs = [f"blocks.{layer}.hook_mlp_out" for layer in layers]
    if cfg.architecture == CLT_KEY:
        if layers != list(range(n_layers)):
            raise ValueError(
                f"architecture='clt' spans every block (as circuit-tracer's CLTs do), but layers={cfg.layers}; "
                "set layers to null, or train per-layer transcoders (architecture='transcoder')."
            )
        return PairPlan([CLT_KEY], {CLT_KEY: ins}, {CLT_KEY: outs})
    return PairPlan(ins, {i: [i] for i in ins}, {i: [o] for i, o in zip(ins, outs, strict=True)})


@dataclass(frozen=True)
class RunSteps:
    """The steps of ``train.py`` a paired run reuses, passed in by ``train_saes`` (which imports this module)."""

    activation_stream: Callable[..., Any]
    trainer: Callable[..., Any]
    fit: Callable[..., Any]
    metadata: Callable[..., dict[str, Any]]


def training_pair_saes(
    cfg: VisionSAETrainingConfig, model: HookedViT, plan: PairPlan, per_image: int, steps: RunSteps
) -> dict[str, TrainingSAE]:
    """A fresh training transcoder (or the CLT) per key of ``plan``, seeded per key as SAEs are."""
    from sae_lens.registry import get_sae_training_class
    from sae_lens.saes.sae import SAEMetadata

    from .checks import sae_width
    from .transcoders import ensure_training_registered

    ensure_training_registered()
    arch = training_architecture(cfg)
    cls, config_cls = get_sae_training_class(arch)
    widths = model.hook_shapes(batch_size=1)
    saes = {}
    for j, key in enumerate(plan.keys):
        d_in, d_out = widths[plan.inputs[key][0]][-1], widths[plan.outputs[key][0]][-1]
        n = len(plan.inputs[key])
        d_sae = sae_width(cfg, key, d_in)
        k = int(cfg.for_hook(key, "k"))
        if cfg.transcoder_activation == "topk" and k > d_sae:
            raise ValueError(f"{key}: k={k} is larger than its d_sae={d_sae}; lower k or widen the transcoder.")
        meta = steps.metadata(cfg, model, plan.inputs[key][0] if n == 1 else key, per_image)
        meta |= {"hook_name_out": plan.outputs[key][0]} if n == 1 else {"hook_names": plan.inputs[key]}
        wanted: dict[str, Any] = {
            "d_in": d_in, "d_sae": d_sae * n, "d_out": d_out, "n_layers": n, "dtype": cfg.dtype, "device": cfg.device,
            "normalize_activations": cfg.normalize_activations, "metadata": SAEMetadata(**meta),
            "decoder_init_norm": cfg.transcoder_decoder_init_norm, "k": k, "activation": cfg.transcoder_activation,
            "l1_coefficient": cfg.for_hook(key, "l1_coefficient"),
            "l0_coefficient": cfg.for_hook(key, "l1_coefficient"),
            "aux_loss_coefficient": cfg.aux_coefficient, "k_aux": cfg.for_hook(key, "k_aux"),
            "hook_in": cfg.transcoder_input,
        }  # fmt: skip
        fields = set(config_cls.__dataclass_fields__)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.sae_init_seed * 1_000_003 + j)
            saes[key] = cls(config_cls(**{f: v for f, v in wanted.items() if f in fields}))
    return saes


def train_pairs(cfg: VisionSAETrainingConfig, model: HookedViT | None, resume: bool, steps: RunSteps) -> dict[str, Any]:
    """Train the transcoders or the CLT of ``cfg`` (module docstring) and save them; returns
    ``{input hook: sae_lens transcoder}`` or ``{"clt": CrossLayerTranscoder}``."""
    from safetensors.torch import save_file

    from ..distributed import rank_and_world_size
    from ..models import HookedViT
    from ..saes.io import write_weights_checksum
    from ..saes.loading import load_sae
    from .checkpoints import CountingStream, RunCheckpoint, StopFlag, load_trainer_state
    from .checks import check_hooks

    rank, world = rank_and_world_size()
    if world > 1 or cfg.data_parallel:
        raise ValueError(
            f"architecture={cfg.architecture!r} trains in one process; run it without torchrun "
            "(and data_parallel: false)."
        )
    if cfg.normalize_activations not in ("none", "expected_average_only_in"):
        raise ValueError(
            f"normalize_activations={cfg.normalize_activations!r} is per-token and does not carry over from a "
            f"transcoder's input to its output; use 'expected_average_only_in' or 'none' for {cfg.architecture!r}."
        )
    out = Path(cfg.output_dir)
    run_ckpt = RunCheckpoint(out, rank, world)
    state, ckpt = run_ckpt.load(cfg.to_dict()) if resume else (None, run_ckpt.root)
    torch.manual_seed(cfg.seed)
    model = (model or HookedViT.from_pretrained(cfg.model_name, device=cfg.device)).eval()
    plan = pair_plan(cfg, model.cfg.n_layers)
    check_hooks(cfg, model, plan.harvest_hooks + [k for k in plan.keys if k != CLT_KEY])
    stream, per_image = steps.activation_stream(cfg, model, plan.harvest_hooks)
    saes = training_pair_saes(cfg, model, plan, per_image, steps)
    flag = StopFlag()
    provider = CountingStream(plan.pair(stream), flag, skip=state["batches_consumed"] if state else 0)
    if state is not None:
        for key, sae in saes.items():
            sae.load_weights_from_checkpoint(ckpt / key)
    trainer = steps.trainer(cfg, saes, provider, init_b_dec=state is None)
    if state is not None:
        for key, t in trainer.trainers.items():
            load_trainer_state(t, ckpt / key)
        trainer.n_training_samples = state["n_training_samples"]
        trainer.n_training_steps = state["n_training_steps"]
        logger.info("resumed at %d tokens from %s", trainer.n_training_samples, ckpt)
    trained = steps.fit(cfg, trainer, provider, run_ckpt, flag)
    out.mkdir(parents=True, exist_ok=True)
    (out / "training_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    for key, sae in trained.items():
        sae.save_inference_model(out / key)
        if key != CLT_KEY:
            write_weights_checksum(out / key)
        save_file({"sparsity": trainer.trainers[key].log_feature_sparsity.cpu()}, out / key / "sparsity.safetensors")
        logger.info("saved %s to %s", key, out / key)
    run_ckpt.clear(list(saes))
    run_ckpt.remove_if_empty()
    return {key: load_sae(out / key, device=cfg.device) for key in plan.keys}
