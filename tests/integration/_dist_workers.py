"""Ranks that die or are signalled mid-run, for test_distributed.py (importable by spawned children)."""

from __future__ import annotations

import os


def dying_rank(rank: int, world: int, port: int, argv: list[str], kill_after_shards: int) -> None:
    """Rank 1 exits (code 3) right after writing ``kill_after_shards`` cache shards; rank 0 runs normally."""
    if rank == 1:
        written = [0]
        real = os.replace

        def replace(src, dst):  # the shard marker is the last file a shard writes
            real(src, dst)
            name = os.path.basename(str(dst))
            if name.startswith("shard_") and name.endswith(".json"):
                written[0] += 1
                if written[0] >= kill_after_shards:
                    os._exit(3)

        os.replace = replace
    from sae_vision_ext.launch import cli_rank

    cli_rank(rank, world, port, argv, threads=1)


def run_with_dying_rank(argv: list[str], kill_after_shards: int, timeout: float = 120) -> list[int]:
    return run_two(dying_rank, argv, kill_after_shards, timeout)


def signalled_rank(rank: int, world: int, port: int, argv: list[str], after_batches: int) -> None:
    """Each rank gets a real SIGTERM after ``after_batches + 3 * rank`` training batches (ranks stop at
    different steps, as they would when a job is preempted)."""
    import signal

    from sae_vision_ext.training import checkpoints as train_module

    original = train_module.CountingStream.__next__

    def next_then_signal(self):
        if self.count == after_batches + 3 * rank:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self)

    train_module.CountingStream.__next__ = next_then_signal
    from sae_vision_ext.launch import cli_rank

    cli_rank(rank, world, port, argv, threads=1)


def run_two(target, argv: list[str], arg: int, timeout: float = 120) -> list[int]:
    """Two spawned ranks running ``target(rank, 2, port, argv, arg)``; their exit codes."""
    from sae_vision_ext.launch import spawn_ranks

    return spawn_ranks(target, 2, (argv, arg), timeout)
