"""Crash-safe training state: periodic and on-signal checkpoints that a resumed run continues exactly.

Layout under ``output_dir/checkpoints/latest/``::

    step_<n>/<hook>/      SAELens's checkpoint of one hook (weights, optimiser, schedulers, scaler,
                          counters), written by ``SAETrainer.save_checkpoint``
    state.json            {"folder": "step_<n>", "batches_consumed", "n_training_steps",
                           "n_training_samples", "config"}; ``state_rank{r}_of_{w}.json`` per rank

``state.json`` is replaced atomically (``os.replace``) after every hook folder of its step is
complete, and older step folders are deleted only after that: whenever the process dies (``kill -9``
included), ``state.json`` names a complete checkpoint, so at most one interval of work is lost.
Checkpoints are taken at batch boundaries (every SAE has finished the same step), on SIGINT/SIGTERM
and every ``checkpoint_every_tokens`` tokens or ``checkpoint_every_seconds`` seconds.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._errors import TrainingInterrupted
from .._io import atomic_write_text

if TYPE_CHECKING:
    from sae_lens.training.multi_sae_trainer import MultiSAETrainer


class StopFlag:
    """Set by SIGINT/SIGTERM; the data stream stops at the next batch boundary."""

    def __init__(self) -> None:
        self.requested = False

    def request(self, *_: Any) -> None:
        self.requested = True


@contextlib.contextmanager
def stop_on_signals(flag: StopFlag) -> Iterator[None]:
    """SIGINT and SIGTERM only set ``flag`` while the block runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, flag.request) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class CountingStream:
    """Counts batches handed out and stops cleanly at a batch boundary once a stop was requested.

    ``peek(n)`` reads batches ahead without handing them out (they come next, uncounted until then);
    ``before_batch`` runs at each boundary, where every SAE has finished the same step."""

    def __init__(self, stream: Iterator[dict], flag: StopFlag, skip: int = 0) -> None:
        self.stream, self.flag, self.count = stream, flag, 0
        self.pending: list[dict] = []
        self.before_batch: Callable[[], None] | None = None
        for _ in range(skip):  # replay the deterministic stream up to where the interrupted run stopped
            next(self.stream)
            self.count += 1

    def __iter__(self) -> CountingStream:
        return self

    def peek(self, n: int) -> list[dict]:
        while len(self.pending) < n:
            self.pending.append(next(self.stream))
        return self.pending[:n]

    def __next__(self) -> dict:
        if self.flag.requested:
            raise TrainingInterrupted("stop requested")
        if self.before_batch is not None:
            self.before_batch()
        batch = self.pending.pop(0) if self.pending else next(self.stream)
        self.count += 1
        return batch


class RunCheckpoint:
    """The resumable state of one process's SAEs under ``output_dir/checkpoints/latest``."""

    def __init__(self, output_dir: str | Path, rank: int = 0, world: int = 1) -> None:
        self.root = Path(output_dir) / "checkpoints" / "latest"
        self.state_file = self.root / ("state.json" if world == 1 else f"state_rank{rank}_of_{world}.json")
        self.last_saved_at = time.monotonic()
        self.last_saved_samples = 0

    def load(self, cfg_dict: dict[str, Any]) -> tuple[dict[str, Any], Path]:
        """``(state, folder of the hook checkpoints)``; ``ValueError`` naming the fix if there is none."""
        if not self.state_file.exists():
            raise ValueError(
                f"Nothing to resume: no {self.state_file.name} in {self.root} (a distributed run resumes with the "
                "same number of processes). Run without --resume to start."
            )
        state = json.loads(self.state_file.read_text())
        if state["config"] != json.loads(json.dumps(cfg_dict)):
            raise ValueError(
                f"The config differs from the interrupted run's (saved in {self.state_file}); resume needs the same "
                "config."
            )
        return state, self.root / state.get("folder", ".")

    def due(self, n_samples: int, every_tokens: int | None, every_seconds: float | None) -> bool:
        by_tokens = every_tokens is not None and n_samples - self.last_saved_samples >= every_tokens
        by_time = every_seconds is not None and time.monotonic() - self.last_saved_at >= every_seconds
        return n_samples > self.last_saved_samples and (by_tokens or by_time)

    def save(self, trainer: MultiSAETrainer, provider: CountingStream, cfg_dict: dict[str, Any]) -> Path:
        """Write every hook's SAELens checkpoint, then commit ``state.json`` atomically, then drop the
        previous step's folders of these hooks."""
        step = trainer.n_training_steps
        folder = self.root / f"step_{step}"
        for hook, t in trainer.trainers.items():
            shutil.rmtree(folder / hook, ignore_errors=True)  # a half-written folder from a killed attempt
            t.save_checkpoint(hook, base_path=folder)
        state = {
            "folder": folder.name,
            "batches_consumed": provider.count,
            "n_training_steps": step,
            "n_training_samples": trainer.n_training_samples,
            "config": cfg_dict,
        }
        atomic_write_text(self.state_file, json.dumps(state))
        self._drop_other_steps(list(trainer.trainers), keep=folder.name)
        self.last_saved_at, self.last_saved_samples = time.monotonic(), trainer.n_training_samples
        return folder

    def clear(self, hooks: list[str]) -> None:
        """A finished run leaves nothing of its hooks to resume."""
        self._drop_other_steps(hooks, keep=None)
        self.state_file.unlink(missing_ok=True)

    def remove_if_empty(self) -> None:
        if self.root.exists() and not any(self.root.iterdir()):
            self.root.rmdir()

    def _drop_other_steps(self, hooks: list[str], keep: str | None) -> None:
        if not self.root.exists():
            return
        for step_dir in self.root.glob("step_*"):
            if step_dir.name == keep:
                continue
            for hook in hooks:
                shutil.rmtree(step_dir / hook, ignore_errors=True)
            with contextlib.suppress(OSError):
                step_dir.rmdir()  # only once every rank's hooks are gone


def load_trainer_state(trainer: MultiSAETrainer, path: Path) -> None:
    """SAELens's ``SAETrainer.load_trainer_state`` with every ``torch.load`` forced to
    ``weights_only=True``: a planted ``trainer_state.pt`` cannot run code on resume."""
    import functools

    import torch

    original = torch.load
    torch.load = functools.partial(original, weights_only=True)  # type: ignore[assignment]
    try:
        trainer.load_trainer_state(path)
    finally:
        torch.load = original  # type: ignore[assignment]
