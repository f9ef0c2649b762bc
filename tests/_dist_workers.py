"""A rank that dies mid-harvest, for tests/test_distributed.py (importable by spawned children)."""

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
    from sae_vision_ext.distributed import _cli_rank

    _cli_rank(rank, world, port, argv, threads=1)


def run_with_dying_rank(argv: list[str], kill_after_shards: int, timeout: float = 120) -> list[int]:
    import multiprocessing as mp

    from sae_vision_ext.distributed import _free_port

    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=dying_rank, args=(r, 2, port, argv, kill_after_shards)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]
