"""Data-parallel training of the same SAEs on every rank (``data_parallel: true`` under torchrun).

Every rank holds a replica of each SAE (built from the same seed and broadcast from rank 0) and trains
it on its own slice of every global batch: rows ``[r·b, (r+1)·b)`` of the ``train_batch_size = W·b``
tokens a one-process run would use at that step. From a cache a rank reads only those rows
(``activations/rank_slice.py``: the global order is planned on token ids, the rows read from the
memory-mapped shards), so the ranks read disjoint slices of the cache's tokens; live harvesting
without ``stream`` runs the model on every rank and keeps the rank's rows (:meth:`DataParallel.local_stream`).
What makes ``W`` ranks equal one process with the same global batch (tested to 1e-5 with two gloo ranks):

- gradients: each parameter's gradient is averaged over ranks (``all_reduce``) the moment backward
  has accumulated it, so SAELens's gradient-norm clipping and Adam see the global batch's gradient
  (every SAELens loss here is a mean over tokens). This is what ``DistributedDataParallel``'s reducer
  does; its module wrapper is not used because SAELens's step calls ``training_forward_pass``, not
  ``forward``, and the replicas stay identical because every rank applies the same update;
- dead features and sparsity (the AuxK mask, ``num_dead_features``, ``sparsity.safetensors``): after
  each step ``n_forward_passes_since_fired`` is the minimum over ranks (a feature fired if it fired on
  any rank) and the firing counts are summed;
- the activation scaling factor (``expected_average_only_in``) comes from the mean norm over all
  ranks' tokens, and ``b_dec``'s data initialisation from the gathered global batches;
- a stop request (SIGINT/SIGTERM on any rank) is agreed at the next batch boundary, so all ranks stop
  at the same step; rank 0 alone writes checkpoints and the final SAEs; resuming needs the same world
  size (``state_data_parallel_<W>.json``).

The backend is the process group's (gloo on CPU, NCCL on GPU: ``distributed.init_from_env``).
Architectures that choose activations across the batch (``batchtopk``, ``matryoshka_batchtopk``) are
refused: a rank sees only its slice.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .checkpoints import CountingStream, RunCheckpoint, StopFlag

if TYPE_CHECKING:
    from sae_lens.training.multi_sae_trainer import MultiSAETrainer

    from .config import VisionSAETrainingConfig

BATCH_LEVEL_ARCHITECTURES = ("batchtopk", "matryoshka_batchtopk")


def _dist() -> Any:
    import torch.distributed as dist

    return dist


class DataParallel:
    """The data-parallel side of one training run for ``rank`` of ``world`` (module docstring)."""

    def __init__(self, cfg: VisionSAETrainingConfig, rank: int, world: int) -> None:
        if cfg.architecture in BATCH_LEVEL_ARCHITECTURES:
            raise ValueError(
                f"data_parallel with architecture={cfg.architecture!r}: it selects activations across the whole "
                "batch, which no rank sees; use architecture 'topk' (per token) or data_parallel: false."
            )
        if cfg.train_batch_size % world:
            raise ValueError(
                f"train_batch_size={cfg.train_batch_size} is not divisible by the {world} processes of the "
                "data-parallel run; make it a multiple of the world size."
            )
        self.rank, self.world = rank, world
        self.local_batch = cfg.train_batch_size // world

    @property
    def active(self) -> bool:
        return self.world > 1

    def local_stream(self, stream: Iterator[dict]) -> Iterator[dict]:
        """This rank's rows of every global batch of a live (uncached, unstreamed) harvest."""
        lo, hi = self.rank * self.local_batch, (self.rank + 1) * self.local_batch
        for batch in stream:
            yield {h: t[lo:hi] for h, t in batch.items()}

    def local_tokens(self, total: int) -> int:
        """The per-rank ``total_training_samples`` giving the global run's number of steps."""
        return -(-total // self.world)

    def checkpoint(self, output_dir: str | Path) -> RunCheckpoint:
        ckpt = RankZeroCheckpoint(output_dir, self.rank)
        if self.active:
            ckpt.state_file = ckpt.root / f"state_data_parallel_{self.world}.json"
        return ckpt

    def attach(self, trainer: MultiSAETrainer) -> None:
        """Broadcast rank 0's SAEs, average gradients during backward, sync bookkeeping after each step."""
        if not self.active:
            return
        dist = _dist()
        for name, t in trainer.trainers.items():
            sae = trainer.saes[name]
            for p in sae.parameters():
                dist.broadcast(p.data, src=0)
                p.register_post_accumulate_grad_hook(self._average_grad)
            t.step = self._synced_step(t)

    def _average_grad(self, p: torch.Tensor) -> None:
        _dist().all_reduce(p.grad)
        p.grad.div_(self.world)

    def _synced_step(self, t: Any) -> Any:
        original = t.step
        dist = _dist()

        def step(batch: torch.Tensor) -> Any:
            freq, n_frac = t.act_freq_scores.clone(), t.n_frac_active_samples
            out = original(batch)
            dist.all_reduce(t.n_forward_passes_since_fired, op=dist.ReduceOp.MIN)
            delta = t.act_freq_scores - freq
            dist.all_reduce(delta)
            t.act_freq_scores = freq + delta
            t.n_frac_active_samples = n_frac + (t.n_frac_active_samples - n_frac) * self.world
            return out

        return step

    def agree_stop(self, flag: StopFlag) -> None:
        """Every rank stops when any rank was asked to (called at each batch boundary)."""
        if self.active:
            asked = torch.tensor([1.0 if flag.requested else 0.0])
            _dist().all_reduce(asked, op=_dist().ReduceOp.MAX)
            flag.requested = bool(asked.item())

    @torch.no_grad()
    def sync_scalers(self, trainer: MultiSAETrainer) -> None:
        """The activation scaling factors from the mean token norm over every rank's tokens."""
        if not self.active:
            return
        for name, t in trainer.trainers.items():
            factor = t.activation_scaler.scaling_factor
            if factor is None:
                continue
            d_in = trainer.saes[name].cfg.d_in
            mean_norm = torch.tensor([d_in**0.5 / factor], dtype=torch.float64)
            _dist().all_reduce(mean_norm)
            t.activation_scaler.scaling_factor = d_in**0.5 / (mean_norm.item() / self.world)

    def gather(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The global batch from every rank's slice, in rank order."""
        if not self.active:
            return batch
        out = {}
        for h, t in batch.items():
            parts = [torch.empty_like(t) for _ in range(self.world)]
            _dist().all_gather(parts, t.contiguous())
            out[h] = torch.cat(parts)
        return out

    def global_samples(self, trainer: MultiSAETrainer) -> int:
        return trainer.n_training_samples * self.world


class RankZeroCheckpoint(RunCheckpoint):
    """A run checkpoint that only rank 0 writes (the replicas are identical); every rank reads it."""

    def __init__(self, output_dir: str | Path, rank: int) -> None:
        super().__init__(output_dir, 0, 1)
        self.rank = rank

    def save(self, trainer: MultiSAETrainer, provider: CountingStream, cfg_dict: dict[str, Any]) -> Path:
        if self.rank == 0:
            return super().save(trainer, provider, cfg_dict)
        import time

        self.last_saved_at, self.last_saved_samples = time.monotonic(), trainer.n_training_samples
        return self.root / f"step_{trainer.n_training_steps}"

    def clear(self, hooks: list[str]) -> None:
        if self.rank == 0:
            super().clear(hooks)

    def remove_if_empty(self) -> None:
        if self.rank == 0:
            super().remove_if_empty()
