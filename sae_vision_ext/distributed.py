"""Running the cache and training commands on many processes with PyTorch's own runtime.

Launch with ``torchrun`` (one node or many, SLURM included); every process runs the same command.
``init_from_env()`` joins the process group torchrun describes (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``), with the ``gloo`` backend on CPU and ``nccl`` on GPUs. Work is
split by rank, never scheduled:

- Harvest (``activations.cache.build_cache``): cache shard ``i`` (images ``[i·s, (i+1)·s)``) belongs
  to rank ``i mod world_size``. Ranks write their shards into the same hashed cache directory; a
  shard counts once its ``.json`` marker exists (written last), so a rank that dies leaves only
  complete shards behind and a rerun (any world size) writes just the missing ones. After a
  barrier, rank 0 checks every marker and writes ``metadata.json`` with ``"complete": true``.
- Training (``training.train.train_saes``): layer-parallel. Hook ``j`` of the run's hook list is
  trained by rank ``j mod world_size``, which reads only its hooks' tensors from the shared cache,
  so no gradients cross processes and each SAE sees exactly the batches a one-process run would
  give it. Each SAE is written once, by its owner; checkpoints are per hook plus one state file per
  rank, and resuming needs the same world size.

Without an initialised process group everything runs as rank 0 of 1.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")
logger = logging.getLogger(__name__)


def is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world_size)`` of the current process group, ``(0, 1)`` without one."""
    if not is_distributed():
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def init_from_env(backend: str | None = None) -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes in the environment (no-op with
    ``WORLD_SIZE`` unset or 1, or when already initialised); returns ``(rank, world_size)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not is_distributed():
        import torch
        import torch.distributed as dist

        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ValueError(
                f"WORLD_SIZE={world} but {', '.join(missing)} unset: launch with torchrun "
                "(e.g. `torchrun --nproc_per_node=2 -m sae_vision_ext.cli cache ...`)."
            )
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():  # "cuda" then means this rank's GPU
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        logger.info("joined process group: rank %d of %d (%s)", dist.get_rank(), world, backend)
    return rank_and_world_size()


def require_launcher() -> tuple[int, int]:
    """For ``--distributed``: like ``init_from_env`` but an error when not started by torchrun."""
    if "WORLD_SIZE" not in os.environ:
        raise ValueError(
            "--distributed needs torchrun's environment (RANK, WORLD_SIZE, ...): run "
            "`torchrun --nproc_per_node=N -m sae_vision_ext.cli <command> ...`."
        )
    return init_from_env()


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()


def owned(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """The items of ``rank``: every ``world_size``-th one starting at ``rank``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}); got {rank}.")
    return list(items[rank::world_size])
