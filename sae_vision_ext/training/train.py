"""``train_saes``: one harvest stream, one SAELens training SAE per hook, saved in SAELens format.

The stream is ``image batches -> HookedViT forward (all hooks, stopped after the deepest) ->
token selection -> ShuffleBuffer -> {hook: [train_batch_size, d_in]}``, consumed by SAELens's
``MultiSAETrainer``. Each SAE is saved with ``save_inference_model`` under
``output_dir/<hook_name>`` (``cfg.json`` + ``sae_weights.safetensors``), loadable with plain
``sae_lens.SAE.load_from_disk``; ``cfg.metadata`` records the model, hook, token selection, image
geometry, dataset and this package's version; ``sparsity.safetensors`` (log10 firing frequency per
feature, as SAELens writes it) sits beside each.

Interruption: SIGINT (Ctrl-C) or SIGTERM only sets a flag; the data stream raises at the next batch
boundary, so every SAE has finished the same number of steps when ``output_dir/checkpoints/latest``
is written (SAELens checkpoints per hook + ``state.json`` with the number of stream batches
consumed). ``train_saes(cfg, resume=True)`` reloads weights, optimiser, schedulers, scalers and
counters and replays the deterministic stream past the consumed batches, so a resumed run ends
with the same SAEs as an uninterrupted one (tested).

Under ``torchrun`` training is layer-parallel (``sae_vision_ext.distributed``): hook ``j`` belongs to
rank ``j mod world_size``; the cache is built by all ranks together and each rank reads only its
hooks; each SAE is initialised from ``(seed, j)`` and sees the batches a one-process run gives it,
so the SAEs equal a one-process run's (tested with two processes). Each rank saves its own SAEs and
checkpoint state (``state_rank{r}_of_{w}.json``); every rank returns all SAEs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .._errors import TrainingInterrupted
from .config import VisionSAETrainingConfig

logger = logging.getLogger(__name__)

_TRAINING_CLASSES = {
    "standard": "StandardTrainingSAE",
    "topk": "TopKTrainingSAE",
    "batchtopk": "BatchTopKTrainingSAE",
    "jumprelu": "JumpReLUTrainingSAE",
    "matryoshka_batchtopk": "MatryoshkaBatchTopKTrainingSAE",
    "gated": "GatedTrainingSAE",
}


def sae_metadata(cfg: VisionSAETrainingConfig, model: Any, hook: str, context_size: int) -> dict[str, Any]:
    from .. import __version__

    return {
        "model_name": cfg.model_name,
        "hook_name": hook,
        "model_class_name": "HookedViT",
        "context_size": context_size,
        "token_selection": cfg.token_selection,
        "patches_per_image": cfg.patches_per_image,
        "image_size": list(model.cfg.image_size),
        "patch_size": model.cfg.patch_size,
        "n_prefix_tokens": model.cfg.n_prefix_tokens,
        "dataset": cfg.dataset,
        "sae_vision_ext_version": __version__,
    }


def build_training_sae(cfg: VisionSAETrainingConfig, hook: str, d_in: int, metadata: dict[str, Any]):
    """A SAELens ``TrainingSAE`` of ``cfg.architecture`` for one hook (per-layer overrides applied)."""
    import sae_lens
    from sae_lens.saes.sae import SAEMetadata

    cls = getattr(sae_lens, _TRAINING_CLASSES[cfg.architecture])
    config_cls = getattr(sae_lens, _TRAINING_CLASSES[cfg.architecture] + "Config")
    d_sae = cfg.for_hook(hook, "d_sae") or round(cfg.for_hook(hook, "expansion_factor") * d_in)
    kwargs: dict[str, Any] = {
        "d_in": d_in, "d_sae": d_sae, "dtype": cfg.dtype, "device": cfg.device,
        "normalize_activations": cfg.normalize_activations, "metadata": SAEMetadata(**metadata),
    }  # fmt: skip
    if cfg.architecture in ("topk", "batchtopk", "matryoshka_batchtopk"):
        kwargs["k"] = cfg.for_hook(hook, "k")
    if cfg.architecture == "matryoshka_batchtopk":
        kwargs["matryoshka_widths"] = [d_sae // 4, d_sae // 2, d_sae]
    if cfg.architecture in ("standard", "gated"):
        kwargs["l1_coefficient"] = cfg.for_hook(hook, "l1_coefficient")
    if cfg.architecture == "jumprelu":
        kwargs["l0_coefficient"] = cfg.for_hook(hook, "l1_coefficient")
    return cls(config_cls(**kwargs))


def cache_settings(cfg: VisionSAETrainingConfig, hooks: list[str], dataset_len: int) -> Any:
    """The ``CacheSettings`` a training config implies (the same for ``sae-vision cache`` and training)."""
    from ..activations.cache import CacheSettings, dataset_fingerprint

    return CacheSettings(
        model_name=cfg.model_name, hook_names=tuple(hooks),
        dataset_fingerprint=dataset_fingerprint(cfg.dataset, cfg.n_images, cfg.seed),
        n_images=min(cfg.n_images, dataset_len), token_selection=cfg.token_selection,
        patches_per_image=cfg.patches_per_image, dtype=cfg.cache_dtype,
        images_per_shard=cfg.images_per_shard, seed=cfg.seed,
    )  # fmt: skip


def activation_stream(cfg: VisionSAETrainingConfig, model: Any, hooks: list[str],
                      read_hooks: list[str] | None = None) -> tuple[Iterator[dict], int]:  # fmt: skip
    """Endless shuffled ``{hook: [train_batch_size, d_in]}`` batches and the tokens kept per image.
    The cache (if any) holds ``hooks``; batches carry ``read_hooks`` (default: all of them)."""
    read_hooks = read_hooks or hooks
    from ..activations.harvest import ShuffleBuffer, harvest, token_positions
    from ..data.sources import image_batches, open_image_source

    gen = torch.Generator().manual_seed(cfg.seed)
    dataset = open_image_source(cfg.dataset, model.preprocess, cfg.n_images, cfg.seed)
    keep = token_positions(
        model.cfg.n_prefix_tokens, model.cfg.has_cls_token, model.cfg.n_registers, model.cfg.n_ctx, cfg.token_selection
    )
    per_image = len(keep)
    if cfg.patches_per_image is not None:
        n_patch = int((keep >= model.cfg.n_prefix_tokens).sum())
        per_image = per_image - n_patch + min(n_patch, cfg.patches_per_image)
    if cfg.cache_dir is not None:
        from ..activations.cache import open_or_build_cache

        settings = cache_settings(cfg, hooks, len(dataset))
        cached = open_or_build_cache(model, dataset, settings, cfg.cache_dir, num_workers=cfg.num_workers,
                                     image_batch_size=cfg.image_batch_size)  # fmt: skip
        stream = cached.batches(cfg.train_batch_size, cfg.shuffle_buffer_tokens, cfg.seed, epochs=None,
                                hooks=read_hooks)  # fmt: skip
        return stream, per_image
    batches = image_batches(dataset, cfg.image_batch_size, cfg.num_workers, epochs=None)
    stream = harvest(model, (b.to(cfg.device) for b in batches), read_hooks, cfg.token_selection,
                     cfg.patches_per_image, gen)  # fmt: skip
    return ShuffleBuffer(cfg.shuffle_buffer_tokens, cfg.train_batch_size, gen)(stream), per_image


class _StopFlag:
    def __init__(self) -> None:
        self.requested = False

    def request(self, *_: Any) -> None:
        self.requested = True


@contextlib.contextmanager
def _stop_on_signals(flag: _StopFlag) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, flag.request) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _CountingStream:
    """Counts batches handed out; stops cleanly at a batch boundary once a stop was requested."""

    def __init__(self, stream: Iterator[dict], flag: _StopFlag, skip: int = 0) -> None:
        self.stream, self.flag, self.count = stream, flag, 0
        for _ in range(skip):  # replay the deterministic stream up to where the interrupted run stopped
            next(self.stream)
            self.count += 1

    def __iter__(self) -> _CountingStream:
        return self

    def __next__(self) -> dict:
        if self.flag.requested:
            raise TrainingInterrupted("stop requested")
        batch = next(self.stream)
        self.count += 1
        return batch


def _trainer_class():
    from sae_lens.training.multi_sae_trainer import MultiSAETrainer

    class VisionMultiSAETrainer(MultiSAETrainer):
        """SAELens's MultiSAETrainer with loss, L0 and explained variance (means over hooks) in the bar."""

        @torch.no_grad()
        def _update_pbar(self, step_outputs: dict, pbar: Any, update_interval: int = 100) -> None:
            if self.n_training_steps % update_interval != 0:
                return
            outs = list(step_outputs.values())
            loss = sum(float(o.loss) for o in outs) / len(outs)
            l0 = sum(float((o.feature_acts != 0).sum(-1).float().mean()) for o in outs) / len(outs)
            ev = sum(
                1 - float((o.sae_in - o.sae_out).pow(2).sum() / (o.sae_in - o.sae_in.mean(0)).pow(2).sum())
                for o in outs
            ) / len(outs)
            pbar.set_description(f"{self.n_training_steps} steps | loss {loss:.4f} | L0 {l0:.1f} | EV {ev:.3f}")
            pbar.update(update_interval * self.cfg.train_batch_size_samples)

    return VisionMultiSAETrainer


def train_saes(cfg: VisionSAETrainingConfig, model: Any = None, resume: bool = False) -> dict[str, Any]:
    """Train one SAE per hook of ``cfg`` and save each; returns ``{hook_name: sae_lens.SAE}`` (inference).

    Raises :class:`TrainingInterrupted` after saving a checkpoint if SIGINT/SIGTERM arrives;
    ``resume=True`` continues from it (the config must be the same).
    """
    from sae_lens import SAE
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from safetensors.torch import save_file

    from ..activations.harvest import resolve_hook_names
    from ..distributed import barrier, owned, rank_and_world_size
    from ..models import HookedViT

    rank, world = rank_and_world_size()
    out = Path(cfg.output_dir)
    ckpt = out / "checkpoints" / "latest"
    state_file = ckpt / ("state.json" if world == 1 else f"state_rank{rank}_of_{world}.json")
    state = None
    if resume:
        if not state_file.exists():
            raise ValueError(f"Nothing to resume: no {state_file.name} at {ckpt} (a distributed run resumes with "
                             "the same number of processes). Run without resume to start.")  # fmt: skip
        state = json.loads(state_file.read_text())
        if state["config"] != json.loads(json.dumps(cfg.to_dict())):
            raise ValueError(f"The config differs from the interrupted run's (saved in {state_file}); "
                             "resume needs the same config.")  # fmt: skip
    torch.manual_seed(cfg.seed)
    model = model or HookedViT.from_pretrained(cfg.model_name, device=cfg.device)
    model.eval()
    all_hooks = resolve_hook_names(cfg.hook_names, model.cfg.n_layers, cfg.layers)
    hooks = owned(all_hooks, rank, world)
    if world > 1 and cfg.cache_dir is None:
        logger.warning("Distributed training without cache_dir: every rank runs the model over all images. "
                       "Set cache_dir to harvest once, split across ranks.")  # fmt: skip
    widths = model.hook_shapes(batch_size=1)
    stream, per_image = activation_stream(cfg, model, all_hooks, hooks)
    saes = {}
    for h in hooks:  # seeded per hook: the same SAE whichever rank builds it
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed * 1_000_003 + all_hooks.index(h))
            saes[h] = build_training_sae(cfg, h, widths[h][-1], sae_metadata(cfg, model, h, per_image))
    if not saes:
        logger.warning("rank %d has no hooks to train (%d hooks, %d processes)", rank, len(all_hooks), world)
        barrier()
        return {h: SAE.load_from_disk(out / h, device=cfg.device) for h in all_hooks}
    if state is not None:
        for h, sae in saes.items():
            sae.load_weights_from_checkpoint(ckpt / h)
    flag = _StopFlag()
    provider = _CountingStream(stream, flag, skip=state["batches_consumed"] if state else 0)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.training_tokens,
        train_batch_size_samples=cfg.train_batch_size,
        lr=cfg.lr,
        lr_end=cfg.effective_lr_end,
        lr_scheduler_name=cfg.lr_scheduler_name,
        lr_warm_up_steps=cfg.lr_warm_up_steps,
        device=cfg.device,
        n_checkpoints=cfg.n_checkpoints,
        checkpoint_path=str(out / "checkpoints") if cfg.n_checkpoints else None,
        logger=LoggingConfig(log_to_wandb=cfg.log_to_wandb, wandb_project=cfg.wandb_project),
        n_batches_for_norm_estimate=min(100, max(1, cfg.training_tokens // cfg.train_batch_size // 10)),
    )
    trainer = _trainer_class()(cfg=trainer_cfg, saes=saes, hook_names={h: h for h in hooks}, data_provider=provider)
    if state is not None:
        for h, t in trainer.trainers.items():
            t.load_trainer_state(ckpt / h)
        trainer.n_training_samples = state["n_training_samples"]
        trainer.n_training_steps = state["n_training_steps"]
        logger.info("resumed at %d tokens from %s", trainer.n_training_samples, ckpt)
    with _stop_on_signals(flag):
        try:
            trained = trainer.fit()
        except TrainingInterrupted:
            for h, t in trainer.trainers.items():
                t.save_checkpoint(h, base_path=ckpt)
            state_file.write_text(json.dumps({
                "batches_consumed": provider.count, "n_training_steps": trainer.n_training_steps,
                "n_training_samples": trainer.n_training_samples, "config": cfg.to_dict()}))  # fmt: skip
            raise TrainingInterrupted(
                f"Training interrupted after {trainer.n_training_samples} tokens; checkpoint saved to {ckpt}. "
                "Continue with train_saes(cfg, resume=True) or `sae-vision train ... --resume`."
            ) from None
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (out / "training_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    for hook, sae in trained.items():  # each SAE written once, by the rank that trained it
        sae.save_inference_model(out / hook)
        save_file({"sparsity": trainer.trainers[hook].log_feature_sparsity.cpu()}, out / hook / "sparsity.safetensors")
        logger.info("saved %s to %s", hook, out / hook)
        shutil.rmtree(ckpt / hook, ignore_errors=True)  # done: its checkpoint must not be resumed later
    state_file.unlink(missing_ok=True)
    barrier()
    if rank == 0 and ckpt.exists() and not any(ckpt.iterdir()):
        ckpt.rmdir()
    return {h: SAE.load_from_disk(out / h, device=cfg.device) for h in all_hooks}
