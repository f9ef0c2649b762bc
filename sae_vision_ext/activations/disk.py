"""Disk space: the size a cache will take, the free space, and telling a full disk from other errors.

``build_cache`` logs its estimate (images x tokens per image x hooks x d_in x bytes per value) and the
free space before it starts, and refuses when the estimate exceeds the free space; a write that fails
because the disk (or a file-size limit, or a quota) is full raises :class:`DiskFullError` naming the
folder and how much was written and needed. Training uses the same test for its checkpoints.
"""

from __future__ import annotations

import errno
import json
import shutil
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from .._errors import DiskFullError

if TYPE_CHECKING:
    from ..models.hooked_vit import HookedViT
    from .cache import CacheSettings

_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_FULL_TEXT = (
    "no space left",
    "file too large",
    "disk quota",
    "os error 28",
    "os error 27",
    "os error 122",
    "file write failed",  # torch.save (PytorchStreamWriter) on a full disk
    "unexpected pos",  # torch.save when a write comes back short
)
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it wraps) says the disk, a quota or a file-size limit is full:
    an ``OSError`` with ``ENOSPC``/``EFBIG``/``EDQUOT``, or the text safetensors and torch give for one."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return True
        if any(t in str(exc).lower() for t in _FULL_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def human_bytes(n: float) -> str:
    """``n`` bytes as ``12.3 MB`` (powers of 1000, as ``df -H``)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def free_bytes(folder: str | Path) -> int:
    """Free space for an ordinary user on the file system of ``folder`` (or its nearest existing parent)."""
    path = Path(folder).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def folder_bytes(folder: str | Path) -> int:
    """Total size of the files under ``folder`` (0 when it does not exist)."""
    path = Path(folder)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def tokens_per_image(model: HookedViT, settings: CacheSettings) -> int:
    """Tokens one image contributes under the settings' token selection and patch subsampling."""
    from .harvest import token_positions

    c = model.cfg
    keep = token_positions(c.n_prefix_tokens, c.has_cls_token, c.n_registers, c.n_ctx, settings.token_selection)
    per_image = len(keep)
    if settings.patches_per_image is not None:
        n_patch = int((keep >= c.n_prefix_tokens).sum())
        per_image = per_image - n_patch + min(n_patch, settings.patches_per_image)
    return per_image


def estimate_cache_bytes(model: HookedViT, settings: CacheSettings, n_images: int | None = None) -> int:
    """Bytes the tensors of ``n_images`` images take in the cache (default: all of the settings' images):
    images x tokens per image x sum over hooks of d_in x bytes per value (headers and markers aside)."""
    widths = model.hook_shapes(batch_size=1)
    d_total = sum(widths[h][-1] for h in settings.hook_names)
    n = settings.n_images if n_images is None else n_images
    return n * tokens_per_image(model, settings) * d_total * _BYTES[settings.dtype]


def check_free_space(folder: Path, needed: int, what: str) -> int:
    """The free bytes under ``folder``; :class:`DiskFullError` naming both numbers if ``needed`` is more."""
    free = free_bytes(folder)
    if needed > free:
        raise DiskFullError(
            f"{what} needs about {human_bytes(needed)} but {folder} has {human_bytes(free)} free. Free some space, "
            "write elsewhere, or make it smaller (fewer images, hooks or patches_per_image, or cache_dtype float16)."
        )
    return free


def safetensors_size(path: Path) -> int | None:
    """The size a safetensors file must have, read from its header (``None`` if the header is unreadable)."""
    try:
        with open(path, "rb") as fd:
            (n,) = struct.unpack("<Q", fd.read(8))
            if n > 100_000_000:
                return None
            header = json.loads(fd.read(n))
    except (OSError, ValueError, struct.error):
        return None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + n + max(ends, default=0)
