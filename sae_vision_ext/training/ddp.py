"""Data-parallel training of the same SAEs on every rank (``data_parallel: true`` under torchrun).

Every rank holds a replica of each SAE (built from the same seed and broadcast from rank 0) and trains
it on its own slice of every global batch: rows ``[r·b, (r+1)·b)`` of the ``train_batch_size = W·b``
tokens a one-process run would use at that step. From a cache a rank reads only those rows
(``activations/rank_slice.py``: the global order is planned on token ids, the rows read from the
memory-mapped shards), so the ranks read disjoint slices of the cache's tokens; live harvesting
without ``stream`` runs the model on every rank and keeps the rank's rows (:meth:`DataParallel.local_stream`).
What makes ``W`` ranks equal one process with the same global batch (tested to 1e-5 with two gloo ranks):

- gradients: once backward has accumulated the last parameter's gradient, all of them are summed over
  ranks in one flattened ``all_reduce`` and divided by ``W`` (:class:`_StepSync`), so SAELens's
  gradient-norm clipping and Adam see the global batch's gradient (every SAELens loss here is a mean
  over tokens). This is what ``DistributedDataParallel``'s reducer does with its buckets; its module
  wrapper is not used because SAELens's step calls ``training_forward_pass``, not ``forward``, and the
  replicas stay identical because every rank applies the same update;
- dead features and sparsity (the AuxK mask, ``num_dead_features``, ``sparsity.safetensors``): the
  step's firing counts ride in the same all-reduce (known before backward): they are summed, and
  ``n_forward_passes_since_fired`` is reset wherever the sum is positive (a feature fired if it fired
  on any rank);
- the activation scaling factor (``expected_average_only_in``) comes from the mean norm over all
  ranks' tokens, and ``b_dec``'s data initialisation from the gathered global batches;
- a stop request (SIGINT/SIGTERM on any rank) rides in the same all-reduce too and is agreed at the
  next batch boundary, so all ranks stop at the same step; rank 0 alone writes checkpoints and the
  final SAEs; resuming needs the same world size (``state_data_parallel_<W>.json``).

So a step costs one collective per SAE and no host synchronisation (measured in docs/benchmarks.md).
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
        """Broadcast rank 0's SAEs; per step, one all-reduce of each SAE's gradients and bookkeeping."""
        if not self.active:
            return
        for name, t in trainer.trainers.items():
            _StepSync(self, t, [p for p in trainer.saes[name].parameters() if p.requires_grad])

    def agree_stop(self, flag: StopFlag) -> bool:
        """Whether every rank stops at this batch boundary: ``flag`` (this rank's signals) rides on each
        step's all-reduce, so all ranks agree at the same boundary, the first after any rank's request
        reached a step. On an accelerator the summed flag is read every 16th boundary (one host sync
        per 16 steps); on CPU at each."""
        self.local_stop, self.boundaries = flag, self.boundaries + 1
        if self.stop_total is None or (self.stop_total.device.type != "cpu" and self.boundaries % 16):
            return False
        return bool(self.stop_total.item() > 0)

    local_stop: StopFlag | None = None
    stop_total: torch.Tensor | None = None  # the last step's summed stop flags
    boundaries = 0

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


class _StepSync:
    """Everything one SAE's step shares across ranks, in one ``all_reduce`` (what DDP's reducer does with
    its buckets, here a single one: a small SAE's gradients are a few MB): when backward has accumulated
    the last parameter's gradient, the flattened gradients (then divided by the world size, before
    SAELens clips them), this step's firing counts (``act_freq_scores`` delta: summed; a feature fired
    if its sum is positive, so ``n_forward_passes_since_fired`` is reset where any rank saw it fire)
    and the stop flag are summed together. No host sync or other collective runs per step."""

    def __init__(self, dp: DataParallel, t: Any, params: list[torch.Tensor]) -> None:
        self.dp, self.t, self.params = dp, t, params
        self.seen, self.freq = 0, t.act_freq_scores
        for p in params:
            _dist().broadcast(p.data, src=0)
            p.register_post_accumulate_grad_hook(self.on_grad)
        original = t.step

        def step(batch: torch.Tensor) -> Any:
            self.seen, self.freq, n_frac = 0, t.act_freq_scores.clone(), t.n_frac_active_samples
            out = original(batch)
            if self.seen != len(self.params):
                raise RuntimeError(
                    f"data_parallel: {len(self.params) - self.seen} of the SAE's {len(self.params)} parameters got no "
                    "gradient this step, so the ranks' gradients were not averaged; every trained parameter must "
                    "take part in the loss (or set requires_grad=False on it)."
                )
            t.n_frac_active_samples = n_frac + (t.n_frac_active_samples - n_frac) * dp.world
            return out

        t.step = step

    @torch.no_grad()
    def on_grad(self, p: torch.Tensor) -> None:
        self.seen += 1
        if self.seen < len(self.params):
            return
        grads = [q.grad for q in self.params]
        dtype = torch.promote_types(grads[0].dtype, torch.float32)  # counts stay exact
        fired = self.t.act_freq_scores - self.freq  # this step's firing counts (updated before backward)
        stop = float(self.dp.local_stop is not None and self.dp.local_stop.requested)
        parts = [g.reshape(-1).to(dtype) for g in grads]
        flat = torch.cat([*parts, fired.to(dtype), torch.tensor([stop], dtype=dtype, device=fired.device)])
        _dist().all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g)).div_(self.dp.world)
            offset += g.numel()
        total = flat[offset : offset + fired.numel()].to(fired.dtype)
        self.t.act_freq_scores = self.freq + total
        self.t.n_forward_passes_since_fired.masked_fill_(total > 0, 0)
        self.dp.stop_total = flat[-1:]  # read at the next batch boundary (agree_stop), not here


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
