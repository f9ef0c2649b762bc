"""Run ``sae-vision`` commands on several local processes without torchrun (tests, benchmarks).

``launch_local(argv, nprocs)`` gives each spawned process the environment torchrun would (rank,
world size, a free local rendezvous port), so the command joins a process group exactly as under
torchrun (``sae_vision_ext.distributed.init_from_env``). On clusters use torchrun. This module sits
above the CLI (it runs ``cli.main``); nothing in the package imports it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .cli import main
from .distributed import is_distributed

if TYPE_CHECKING:
    from collections.abc import Callable


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_rank(rank: int, world_size: int, port: int, argv: list[str], threads: int | None) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    if threads:
        import torch

        torch.set_num_threads(threads)
    code = main(argv)
    if is_distributed():
        import torch.distributed as dist

        dist.destroy_process_group()
    raise SystemExit(code)


def launch_local(
    argv: Sequence[str], nprocs: int, threads_per_process: int | None = None, timeout: float | None = None
) -> list[int]:
    """Run ``sae-vision <argv>`` on ``nprocs`` local processes with the environment torchrun would
    give them (spawned, gloo/nccl as in ``init_from_env``); returns their exit codes. For one
    machine without torchrun (benchmarks, tests); on clusters use torchrun."""
    return spawn_ranks(cli_rank, nprocs, (list(argv), threads_per_process), timeout)


def spawn_ranks(target: Callable[..., None], nprocs: int, args: tuple = (), timeout: float | None = None) -> list[int]:
    """Start ``target(rank, nprocs, port, *args)`` in ``nprocs`` spawned processes (a free local port
    for the rendezvous); wait up to ``timeout`` seconds each, kill stragglers; return the exit codes."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, nprocs, port, *args)) for r in range(nprocs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]
