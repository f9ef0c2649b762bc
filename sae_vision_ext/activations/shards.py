"""Shard files of the activation cache: their names, checksums and sizes, which to (re)write, and the
disk-space plan and full-disk error of a cache build (``cache.py`` holds the format and the reader)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from .._errors import DiskFullError
from .disk import check_free_space, estimate_cache_bytes, human_bytes, safetensors_size

if TYPE_CHECKING:
    from ..models.hooked_vit import HookedViT
    from .cache import CacheSettings

logger = logging.getLogger(__name__)
REBUILD_HINT = (
    "rerun `sae-vision cache` with the same options (`--verify` checks every shard first), or "
    "build_cache(...) with the same settings in Python: it rewrites only the missing or bad shards"
)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fd:
        for chunk in iter(lambda: fd.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shard_path(folder: Path, i: int) -> Path:
    """Shard ``i``'s tensors; :func:`marker_path` is its completion marker."""
    return folder / f"shard_{i:05d}.safetensors"


def marker_path(folder: Path, i: int) -> Path:
    return folder / f"shard_{i:05d}.json"


def shard_size_problem(folder: Path, i: int) -> str | None:
    """Why shard ``i``'s file does not have the size its marker (or its own header) says, or ``None``."""
    path = shard_path(folder, i)
    try:
        expected = json.loads(marker_path(folder, i).read_text()).get("nbytes") or safetensors_size(path)
    except ValueError:
        return f"{marker_path(folder, i)} is not valid JSON"
    actual = path.stat().st_size
    if expected is None:
        return f"{path} has no readable safetensors header ({actual} bytes)"
    return None if actual == expected else f"{path} has {actual} bytes, its header and marker say {expected}"


def shards_to_write(folder: Path, mine: list[int]) -> list[int]:
    """Shards of ``mine`` to (re)write: those without a file or marker, and (with a warning) those whose
    size is wrong (truncated or padded)."""
    todo = []
    for i in mine:
        if not (marker_path(folder, i).exists() and shard_path(folder, i).exists()):
            todo.append(i)
        elif problem := shard_size_problem(folder, i):
            logger.warning("rewriting a damaged cache shard: %s", problem)
            marker_path(folder, i).unlink(missing_ok=True)
            todo.append(i)
    return todo


def plan_cache_space(model: HookedViT, settings: CacheSettings, folder: Path, todo: list[int]) -> int:
    """Log the estimated size of the shards still to write and the free space; refuse if it does not fit.
    Returns the estimate of the whole cache (bytes)."""
    total = estimate_cache_bytes(model, settings)
    if not todo:
        return total
    n_left = sum(min(settings.images_per_shard, settings.n_images - i * settings.images_per_shard) for i in todo)
    needed = estimate_cache_bytes(model, settings, n_left)
    free = check_free_space(folder, needed, f"Cache {folder} ({len(todo)} shards to write)")
    logger.info(
        "cache %s: writing %d shards, about %s, %s free", folder, len(todo), human_bytes(needed), human_bytes(free)
    )
    return total


def disk_full_error(e: BaseException, folder: Path, shard: int, settings: CacheSettings, total: int) -> DiskFullError:
    kept = [i for i in range(settings.n_shards) if marker_path(folder, i).exists() and shard_path(folder, i).exists()]
    written = sum(shard_path(folder, i).stat().st_size for i in kept)
    return DiskFullError(
        f"The disk is full: writing {shard_path(folder, shard).name} in {folder} failed ({type(e).__name__}: {e}). "
        f"{len(kept)} of {settings.n_shards} shards ({human_bytes(written)}) are written and kept; the whole cache "
        f"needs about {human_bytes(total)}. Free space (or choose another --cache-dir), then "
        + REBUILD_HINT.replace("rewrites only the missing or bad shards", "resumes at this shard")
        + "."
    )
