"""``train_saes``: one harvest stream, one SAELens training SAE per hook, saved in SAELens format.

The stream is ``image batches -> HookedViT forward (all hooks, stopped after the deepest) ->
token selection -> ShuffleBuffer -> {hook: [train_batch_size, d_in]}``, consumed by SAELens's
``MultiSAETrainer``. Each SAE is saved with ``save_inference_model`` under
``output_dir/<hook_name>`` (``cfg.json`` + ``sae_weights.safetensors``), loadable with plain
``sae_lens.SAE.load_from_disk``; ``cfg.metadata`` records the model, hook, token selection, image
geometry, dataset and this package's version; ``sparsity.safetensors`` (log10 firing frequency per
feature, as SAELens writes it) sits beside each.

Interruption (``training/checkpoints.py``): SIGINT (Ctrl-C) or SIGTERM only sets a flag; the data
stream stops at the next batch boundary, so every SAE has finished the same number of steps when the
checkpoint is written; the same checkpoint is also written every ``checkpoint_every_tokens`` /
``checkpoint_every_seconds`` (committed atomically: a ``kill -9`` loses at most one interval).
``train_saes(cfg, resume=True)`` reloads weights, optimiser, schedulers, scalers and counters
(``weights_only``) and replays the deterministic stream past the consumed batches, so a resumed run
ends with the same SAEs as an uninterrupted one (tested, with a real SIGKILL too).

Under ``torchrun`` training is layer-parallel (``sae_vision_ext.distributed``): hook ``j`` belongs to
rank ``j mod world_size``; the cache is built by all ranks together and each rank reads only its
hooks; each SAE is initialised from ``(seed, j)`` and sees the batches a one-process run gives it,
so the SAEs equal a one-process run's (tested with two processes). Each rank saves its own SAEs and
checkpoint state (``state_rank{r}_of_{w}.json``); every rank returns all SAEs. With
``data_parallel: true`` every rank trains every SAE on its slice of each batch instead (``ddp.py``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .._errors import CorruptShardError, DiskFullError, TrainingInterrupted
from .checkpoints import CountingStream, RunCheckpoint, RunLock, StopFlag, load_trainer_state, stop_on_signals
from .checks import check_hooks, check_widths, sae_width
from .config import VisionSAETrainingConfig

if TYPE_CHECKING:
    from sae_lens import TrainingSAE
    from sae_lens.training.multi_sae_trainer import MultiSAETrainer

    from ..activations.cache import CacheSettings
    from ..models.hooked_vit import HookedViT
    from .ddp import DataParallel

logger = logging.getLogger(__name__)


def sae_metadata(cfg: VisionSAETrainingConfig, model: HookedViT, hook: str, context_size: int) -> dict[str, Any]:
    from .._version import __version__

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


def build_training_sae(cfg: VisionSAETrainingConfig, hook: str, d_in: int, metadata: dict[str, Any]) -> TrainingSAE:
    """A SAELens ``TrainingSAE`` of ``cfg.architecture`` from SAELens's training registry, for one hook
    (per-layer overrides applied); ``topk`` is :class:`~.auxk.AuxKTopKTrainingSAE` (configurable AuxK)."""
    import dataclasses

    from sae_lens.registry import get_sae_training_class
    from sae_lens.saes.sae import SAEMetadata

    if cfg.architecture == "topk":
        from .auxk import AuxKTopKTrainingSAE as cls
        from .auxk import AuxKTopKTrainingSAEConfig as config_cls
    else:
        cls, config_cls = get_sae_training_class(cfg.architecture)
    d_sae = sae_width(cfg, hook, d_in)
    k = int(cfg.for_hook(hook, "k"))
    fields = {f.name for f in dataclasses.fields(config_cls)}
    if "k" in fields and k > d_sae:
        raise ValueError(f"{hook}: k={k} is larger than its d_sae={d_sae}; lower k or widen the SAE.")
    wanted: dict[str, Any] = {
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": cfg.dtype,
        "device": cfg.device,
        "normalize_activations": cfg.normalize_activations,
        "metadata": SAEMetadata(**metadata),
        "decoder_init_norm": cfg.decoder_init_norm,
        "k": k,
        "matryoshka_widths": [d_sae // 4, d_sae // 2, d_sae],
        "l1_coefficient": cfg.for_hook(hook, "l1_coefficient"),
        "l0_coefficient": cfg.for_hook(hook, "l1_coefficient"),
        "aux_loss_coefficient": cfg.aux_coefficient,
        "k_aux": cfg.for_hook(hook, "k_aux"),
    }
    return cls(config_cls(**{key: value for key, value in wanted.items() if key in fields}))


def cache_settings(cfg: VisionSAETrainingConfig, hooks: list[str], dataset_len: int) -> CacheSettings:
    """The ``CacheSettings`` a training config implies (the same for ``sae-vision cache`` and training)."""
    from ..activations.cache import CacheSettings, dataset_fingerprint
    from ..data.sources import source_fingerprint

    return CacheSettings(
        model_name=cfg.model_name,
        hook_names=tuple(hooks),
        dataset_fingerprint=source_fingerprint(cfg.dataset) or dataset_fingerprint(cfg.dataset, cfg.n_images, cfg.seed),
        n_images=min(cfg.n_images, dataset_len),
        token_selection=cfg.token_selection,
        patches_per_image=cfg.patches_per_image,
        dtype=cfg.cache_dtype,
        images_per_shard=cfg.images_per_shard,
        seed=cfg.seed,
    )


def activation_stream(
    cfg: VisionSAETrainingConfig, model: HookedViT, hooks: list[str], read_hooks: list[str] | None = None
) -> tuple[Iterator[dict], int]:
    """Endless shuffled ``{hook: [train_batch_size, d_in]}`` batches and the tokens kept per image.
    The cache (if any) holds ``hooks``; batches carry ``read_hooks`` (default: all of them); with
    ``data_parallel`` a cache gives this rank only its rows of each batch, and reads only those."""
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
        cached = open_or_build_cache(
            model, dataset, settings, cfg.cache_dir, num_workers=cfg.num_workers, image_batch_size=cfg.image_batch_size
        )
        from ..distributed import rank_and_world_size

        rank, world = rank_and_world_size() if cfg.data_parallel else (0, 1)  # data-parallel: this rank's rows
        stream = cached.batches(
            cfg.train_batch_size,
            cfg.shuffle_buffer_tokens,
            cfg.seed,
            epochs=None,
            hooks=read_hooks,
            in_memory_bytes=int(cfg.cache_in_memory_gb * 2**30),
            rank=rank,
            world=world,
        )
        return stream, per_image
    if cfg.stream and cfg.data_parallel:  # each rank harvests its own images (stream.py)
        from ..distributed import rank_and_world_size
        from .stream import streamed_batches

        rank, world = rank_and_world_size()
        return streamed_batches(cfg, model, dataset, read_hooks, rank=rank, world=world), per_image
    if cfg.stream:  # a wds: source through its stream view (which reads pipe:/remote shards too)
        from .stream import rank_images

        dataset = rank_images(dataset, 0, 1)
    batches = image_batches(dataset, cfg.image_batch_size, cfg.num_workers, epochs=None)
    stream = harvest(
        model,
        (b.to(cfg.device) for b in batches),
        read_hooks,
        cfg.token_selection,
        cfg.patches_per_image,
        generator=gen,
    )
    return ShuffleBuffer(cfg.shuffle_buffer_tokens, cfg.train_batch_size, gen)(stream), per_image


def dead_window_steps(cfg: VisionSAETrainingConfig) -> int:
    """SAELens's ``dead_feature_window`` (training steps) for ``cfg``: its tokens over the batch size,
    or a tenth of the run between 1 and 1000 steps."""
    if cfg.dead_feature_window_tokens is not None:
        return max(1, cfg.dead_feature_window_tokens // cfg.train_batch_size)
    return min(1000, max(1, cfg.training_tokens // cfg.train_batch_size // 10))


def train_saes(cfg: VisionSAETrainingConfig, model: HookedViT | None = None, resume: bool = False) -> dict[str, Any]:
    """Train one SAE per hook of ``cfg`` and save each; returns ``{hook_name: sae_lens.SAE}`` (inference).

    Raises :class:`TrainingInterrupted` after saving a checkpoint if SIGINT/SIGTERM arrives;
    ``resume=True`` continues from it (the config must be the same, paths aside). The run holds
    ``output_dir``'s lock (:class:`~.checkpoints.RunLock`) throughout: a second run into the same folder is
    refused. A full disk raises :class:`DiskFullError` saying what was kept to resume from. Transcoders
    and CLTs (``architecture`` ``transcoder``, ``skip_transcoder``, ``clt``) train by :func:`~.pairs.train_pairs`.
    """
    from ..activations.disk import is_disk_full
    from ..distributed import rank_and_world_size
    from .pairs import RunSteps, is_paired, train_pairs

    rank, world = rank_and_world_size()
    with RunLock(cfg.output_dir, rank, world):
        try:
            if is_paired(cfg):
                return train_pairs(cfg, model, resume, RunSteps(activation_stream, _trainer, _fit, sae_metadata))
            return _train_saes(cfg, model, resume)
        except DiskFullError:
            raise
        except Exception as e:
            if not is_disk_full(e):
                raise
            raise DiskFullError(
                f"The disk is full: writing to {cfg.output_dir} failed ({type(e).__name__}: {e}). What was written is "
                f"kept; {RunCheckpoint(cfg.output_dir, rank, world).kept()}."
            ) from e


def _train_saes(cfg: VisionSAETrainingConfig, model: HookedViT | None, resume: bool) -> dict[str, Any]:
    from sae_lens import SAE
    from safetensors.torch import save_file

    from ..activations.harvest import resolve_hook_names
    from ..distributed import barrier, owned, rank_and_world_size
    from ..models import HookedViT
    from ..saes.io import write_weights_checksum

    rank, world = rank_and_world_size()
    out = Path(cfg.output_dir)
    dp = None
    if cfg.data_parallel:
        from .ddp import DataParallel

        dp = DataParallel(cfg, rank, world)
    run_ckpt = dp.checkpoint(out) if dp else RunCheckpoint(out, rank, world)
    state, ckpt = run_ckpt.load(cfg.to_dict()) if resume else (None, run_ckpt.root)
    torch.manual_seed(cfg.seed)
    model = model or HookedViT.from_pretrained(cfg.model_name, device=cfg.device)
    model.eval()
    all_hooks = resolve_hook_names(cfg.hook_names, model.cfg.n_layers, cfg.layers)
    check_hooks(cfg, model, all_hooks)
    check_widths(cfg, model, all_hooks)
    hooks = all_hooks if dp else owned(all_hooks, rank, world)
    if world > 1 and cfg.cache_dir is None and not (cfg.stream and dp):
        logger.warning(
            "Distributed training without cache_dir: every rank runs the model over all images. "
            "Set cache_dir to harvest once, split across ranks."
        )
    stream, per_image = activation_stream(cfg, model, all_hooks, hooks)
    stream = dp.local_stream(stream) if dp and cfg.cache_dir is None and not cfg.stream else stream
    saes = _training_saes(cfg, model, all_hooks, hooks, per_image)
    if not saes:
        logger.warning("rank %d has no hooks to train (%d hooks, %d processes)", rank, len(all_hooks), world)
        barrier()
        return {h: SAE.load_from_disk(out / h, device=cfg.device) for h in all_hooks}
    flag = StopFlag()
    provider = CountingStream(stream, flag, skip=state["batches_consumed"] if state else 0)
    if state is not None:
        for h, sae in saes.items():
            sae.load_weights_from_checkpoint(ckpt / h)
    trainer = _trainer(cfg, saes, provider, init_b_dec=state is None, dp=dp)  # a resumed run has its b_dec
    if state is not None:
        for h, t in trainer.trainers.items():
            load_trainer_state(t, ckpt / h)
        trainer.n_training_samples = state["n_training_samples"]
        trainer.n_training_steps = state["n_training_steps"]
        logger.info("resumed at %d tokens from %s", trainer.n_training_samples, ckpt)
    trained = _fit(cfg, trainer, provider, run_ckpt, flag)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (out / "training_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    for hook, sae in trained.items() if rank == 0 or dp is None else ():  # each SAE written once
        sae.save_inference_model(out / hook)
        write_weights_checksum(out / hook)  # checksums.json: load_sae verifies the weights against it
        save_file({"sparsity": trainer.trainers[hook].log_feature_sparsity.cpu()}, out / hook / "sparsity.safetensors")
        logger.info("saved %s to %s", hook, out / hook)
    run_ckpt.clear(hooks)  # done: nothing of these hooks may be resumed later
    barrier()
    if rank == 0:
        run_ckpt.remove_if_empty()
    return {h: SAE.load_from_disk(out / h, device=cfg.device) for h in all_hooks}


def _training_saes(
    cfg: VisionSAETrainingConfig, model: HookedViT, all_hooks: list[str], hooks: list[str], per_image: int
) -> dict[str, TrainingSAE]:
    """A fresh training SAE for each of this rank's ``hooks``, seeded per hook (``init_seed`` and the
    hook's place in ``all_hooks``): the same SAE whichever rank builds it."""
    widths = model.hook_shapes(batch_size=1)
    saes = {}
    for h in hooks:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.sae_init_seed * 1_000_003 + all_hooks.index(h))
            saes[h] = build_training_sae(cfg, h, widths[h][-1], sae_metadata(cfg, model, h, per_image))
    return saes


def _trainer(
    cfg: VisionSAETrainingConfig,
    saes: dict[str, TrainingSAE],
    provider: CountingStream,
    init_b_dec: bool,
    dp: DataParallel | None = None,
) -> MultiSAETrainer:
    """SAELens's trainer over ``saes`` fed by ``provider``, with this config's schedule and dead-feature
    window; ``init_b_dec``: set ``b_dec`` from the first batches as ``cfg.b_dec_init`` says; ``dp``: each
    rank's share of the tokens and batches, gradients and bookkeeping synchronised (``ddp.py``)."""
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    from .trainer import vision_trainer_class

    out = Path(cfg.output_dir)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=dp.local_tokens(cfg.training_tokens) if dp else cfg.training_tokens,
        train_batch_size_samples=dp.local_batch if dp else cfg.train_batch_size,
        lr=cfg.lr_for(next(iter(saes.values())).cfg.d_sae),
        lr_end=cfg.lr_end_for(next(iter(saes.values())).cfg.d_sae),
        lr_scheduler_name=cfg.lr_scheduler_name,
        lr_warm_up_steps=cfg.lr_warm_up_steps,
        device=cfg.device,
        n_checkpoints=cfg.n_checkpoints,
        checkpoint_path=str(out / "checkpoints") if cfg.n_checkpoints else None,
        logger=LoggingConfig(log_to_wandb=cfg.log_to_wandb, wandb_project=cfg.wandb_project),
        n_batches_for_norm_estimate=min(100, max(1, cfg.training_tokens // cfg.train_batch_size // 10)),
        dead_feature_window=dead_window_steps(cfg),
    )
    trainer = vision_trainer_class()(
        cfg=trainer_cfg, saes=saes, hook_names={h: h for h in saes}, data_provider=provider
    )
    trainer.set_learning_rates({h: (cfg.lr_for(s.cfg.d_sae), cfg.lr_end_for(s.cfg.d_sae)) for h, s in saes.items()})
    if dp is not None:
        trainer.dp = dp
        dp.attach(trainer)
    if init_b_dec:
        trainer.b_dec_init = cfg.b_dec_init
        total_steps = max(1, cfg.training_tokens // cfg.train_batch_size)
        trainer.b_dec_init_batches = min(total_steps, -(-cfg.b_dec_init_tokens // cfg.train_batch_size))
    return trainer


def _fit(
    cfg: VisionSAETrainingConfig,
    trainer: MultiSAETrainer,
    provider: CountingStream,
    run_ckpt: RunCheckpoint,
    flag: StopFlag,
) -> dict[str, Any]:
    """``trainer.fit()`` with a checkpoint every interval, and on SIGINT/SIGTERM or a corrupt shard a
    checkpoint before the error (which says where it is and how to go on)."""

    dp, every = trainer.dp, cfg.checkpoint_every_tokens
    asked = flag if dp is None else StopFlag()  # data-parallel: a signal stops every rank at one step
    if dp is not None and every is not None:  # counters are per rank
        every = max(1, every // dp.world)

    def periodic() -> None:
        if dp is not None and dp.agree_stop(asked):
            raise TrainingInterrupted("stop requested")
        if trainer.n_training_steps and run_ckpt.due(trainer.n_training_samples, every, cfg.checkpoint_every_seconds):
            logger.info(
                "checkpoint at %d tokens: %s",
                trainer.n_training_samples,
                run_ckpt.save(trainer, provider, cfg.to_dict()),
            )

    provider.before_batch = periodic
    with stop_on_signals(asked):
        try:
            return trainer.fit()
        except TrainingInterrupted:
            saved = run_ckpt.save(trainer, provider, cfg.to_dict())
            raise TrainingInterrupted(
                f"Training interrupted after {trainer.n_training_samples} tokens; checkpoint saved to {saved}. "
                "Continue with train_saes(cfg, resume=True) or `sae-vision train ... --resume`."
            ) from None
        except CorruptShardError as e:  # the state is at a batch boundary: keep the work, then stop
            saved = run_ckpt.save(trainer, provider, cfg.to_dict())
            raise CorruptShardError(
                f"{e} Training stopped after {trainer.n_training_samples} tokens; checkpoint saved to {saved}. "
                "Rewrite the shard (`sae-vision cache --verify` lists and removes bad shards; rerun `sae-vision "
                "cache` to rebuild them), then continue with --resume."
            ) from e
