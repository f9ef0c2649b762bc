"""Atomic file writes, one definition for every module that writes results (caches, checkpoints,
exports): write to a temporary file beside the target, give it the mode ordinary files get here,
then rename it onto the target, so a reader (or a killed run) sees the old file or the new one,
never half of one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def file_mode() -> int:
    """The mode ordinary files get here (``0o666`` minus the umask), so written files match those the
    rest of a run (or ``open``) creates, as shared file systems expect."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path | str, write: Callable[[Path], object]) -> None:
    """``write(tmp_path)`` then rename onto ``path`` (same folder, so the rename is atomic)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path | str, text: str) -> None:
    """:func:`atomic_write` of a text file (UTF-8)."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
