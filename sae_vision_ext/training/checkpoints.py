"""Crash-safe training state: periodic and on-signal checkpoints that a resumed run continues exactly.

Layout under ``output_dir/checkpoints/latest/``::

    step_<n>/<hook>/      SAELens's checkpoint of one hook (weights, optimiser, schedulers, scaler,
                          counters), written by ``SAETrainer.save_checkpoint``
    state.json            {"format_version", "folder": "step_<n>", "batches_consumed", "n_training_steps",
                           "n_training_samples", "config"}; ``state_rank{r}_of_{w}.json`` per rank

``state.json`` is replaced atomically (``os.replace``) after every hook folder of its step is
complete, and older step folders are deleted only after that: whenever the process dies (``kill -9``
included), ``state.json`` names a complete checkpoint, so at most one interval of work is lost.
Checkpoints are taken at batch boundaries (every SAE has finished the same step), on SIGINT/SIGTERM
and every ``checkpoint_every_tokens`` tokens or ``checkpoint_every_seconds`` seconds.

Resume rules: a ``state.json`` of a newer ``format_version`` than :data:`STATE_FORMAT_VERSION` is
refused, an unreadable one is named; the saved config must equal the run's except for the path fields
(:data:`PATH_FIELDS`: a run folder may be moved), and a differing field is named with both values. A
checkpoint that cannot be written for lack of space is removed whole and :class:`DiskFullError` says
which earlier checkpoint (if any) is kept to resume from. ``checkpoints/`` is created only when a
checkpoint is written and removed once the finished run leaves it empty.
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

from .._errors import DiskFullError, TrainingInterrupted
from .._io import atomic_write_text

STATE_FORMAT_VERSION = 1
"""Version of ``state.json``'s layout; a newer one (written by a later release) is refused on resume."""
PATH_FIELDS = ("output_dir", "cache_dir")
"""Config fields that are places, not settings: they may differ on resume (a moved run folder resumes)."""

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


class RunLock:
    """An exclusive lock on a run's output folder: ``output_dir/.sae-vision-train.lock`` (one per rank under
    torchrun) holds the owner's pid under ``fcntl.flock``. The kernel drops the lock when its process
    exits, however it ends; a file left by a dead process is taken over with a warning."""

    def __init__(self, output_dir: str | Path, rank: int = 0, world: int = 1) -> None:
        name = ".sae-vision-train.lock" if world == 1 else f".sae-vision-train.rank{rank}_of_{world}.lock"
        self.path = Path(output_dir) / name
        self.fd: int | None = None
        self.created_folder = False

    def acquire(self) -> RunLock:
        """Take the lock or raise ``ValueError`` naming the holder's pid and the lock file."""
        import fcntl
        import os
        import warnings

        self.created_folder = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                self.created_folder = False
                raise self._held(holder) from None
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break  # not a file its holder removed between our open and our lock
            os.close(fd)
        old = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if old and old != str(os.getpid()):
            warnings.warn(
                f"Taking over the stale lock {self.path} of pid {old}, which is no longer running (it ended without "
                "releasing it).",
                stacklevel=3,
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def _held(self, holder: str) -> ValueError:
        return ValueError(
            f"Another training run (pid {holder}) is writing to {self.path.parent}: it holds {self.path}. Wait "
            "for it to finish (or stop it), or choose another output_dir; two runs in one folder would overwrite "
            "each other's checkpoints and SAEs."
        )

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent); remove the output folder if the lock created
        it and the run left nothing in it (a run refused before any work)."""
        import os

        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self.fd)
        self.fd = None
        if self.created_folder:
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()  # only if empty

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


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
        state = read_state(self.state_file)
        diff = config_differences(state["config"], json.loads(json.dumps(cfg_dict)))
        if diff:
            raise ValueError(
                f"The config differs from the interrupted run's (saved in {self.state_file}) in "
                + "; ".join(f"{k}: {a!r} there, {b!r} here" for k, (a, b) in diff.items())
                + ". Resume needs the same config (paths may differ): set those fields back, or run without --resume "
                "into a new output_dir."
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
        try:
            for hook, t in trainer.trainers.items():
                shutil.rmtree(folder / hook, ignore_errors=True)  # a half-written folder from a killed attempt
                t.save_checkpoint(hook, base_path=folder)
        except Exception as e:
            from ..activations.disk import is_disk_full

            if not is_disk_full(e):
                raise
            raise self._disk_full(e, folder, trainer) from e
        state = {
            "format_version": STATE_FORMAT_VERSION,
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
        """Remove ``checkpoints/latest`` and then ``checkpoints/`` if nothing is left in them."""
        for folder in (self.root, self.root.parent):
            if folder.exists() and not any(folder.iterdir()):
                folder.rmdir()

    def kept(self) -> str:
        """What a resume would start from, for messages: the step ``state.json`` names, or that there is none."""
        if not self.state_file.exists():
            return "no earlier checkpoint of this run exists, so it cannot be resumed: free space, then rerun it"
        steps = read_state(self.state_file)["n_training_steps"]
        return (
            f"the checkpoint at step {steps} ({self.state_file}) is kept: free space, then continue with "
            "train_saes(cfg, resume=True) or `sae-vision train ... --resume`"
        )

    def _disk_full(self, e: BaseException, folder: Path, trainer: MultiSAETrainer) -> DiskFullError:
        from ..activations.disk import folder_bytes, human_bytes

        written = folder_bytes(folder)
        params = sum(p.numel() * p.element_size() for sae in trainer.saes.values() for p in sae.parameters())
        for hook in trainer.trainers:  # a partial checkpoint is of no use: give its space back
            shutil.rmtree(folder / hook, ignore_errors=True)
        with contextlib.suppress(OSError):
            folder.rmdir()
        self.remove_if_empty()
        return DiskFullError(
            f"The disk is full: writing the checkpoint {folder} failed after {human_bytes(written)} of about "
            f"{human_bytes(3 * params)} (weights and optimiser state; {type(e).__name__}: {e}); the partial checkpoint "
            f"was removed. Training stopped; {self.kept()}."
        )

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
    import pickle

    import torch

    original = torch.load
    torch.load = functools.partial(original, weights_only=True)  # type: ignore[assignment]
    try:
        trainer.load_trainer_state(path)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(
            f"Refusing to resume from {Path(path) / 'trainer_state.pt'}: it holds objects other than tensors, which "
            f"this package never writes (it may have been tampered with); nothing in it was run. {first} Delete "
            f"{Path(path).parent} and resume from an older copy, or start again without --resume."
        ) from e
    finally:
        torch.load = original  # type: ignore[assignment]


def read_state(path: Path) -> dict[str, Any]:
    """``state.json`` read and checked: ``ValueError`` naming the file if it is not valid JSON, lacks a
    field or comes from a newer format version."""
    try:
        state = json.loads(path.read_text())
        missing = [k for k in ("folder", "batches_consumed", "n_training_steps", "config") if k not in state]
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"Cannot read the checkpoint state {path}: {e}. It is corrupt; delete {path.parent} and start again "
            "without --resume (or restore the file from a copy)."
        ) from e
    if missing:
        raise ValueError(f"The checkpoint state {path} lacks {missing}: it is corrupt or not this package's.")
    version = state.get("format_version", 1)
    if not isinstance(version, int) or version > STATE_FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {version!r}, newer than this sae_vision_ext reads "
            f"({STATE_FORMAT_VERSION}): it was written by a later release. Resume with that release (pip install -U "
            "sae_vision_ext), or start again without --resume."
        )
    return state


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved value, current value)}`` for the settings that differ, path fields
    (:data:`PATH_FIELDS`) and fields only one side records (added in another release) left out."""
    return {
        k: (saved[k], current[k])
        for k in sorted(set(saved) & set(current))
        if k not in PATH_FIELDS and saved[k] != current[k]
    }
