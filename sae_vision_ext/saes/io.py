"""Reading checkpoint files safely: shared by every SAE format converter."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write_text


def sae_lens_version() -> str:
    """Marks converted configs as SAELens >= 6 so it keeps their ``metadata`` as given."""
    import sae_lens

    return sae_lens.__version__


def torch_load(source: Any, device: str, allow_pickle: bool, what: str) -> Any:
    """``torch.load(weights_only=True)``; a file that needs full unpickling raises ``ValueError`` unless
    ``allow_pickle``, and a corrupt or truncated file raises ``ValueError`` saying so (never suggesting
    the unsafe opt-in for it)."""
    import pickle

    try:
        return torch.load(source, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise ValueError(
                f"{what} is corrupt or truncated ({type(e).__name__}: {e}). Download or save it again."
            ) from e
        if not allow_pickle:
            raise ValueError(
                f"{what} cannot be loaded with torch.load(weights_only=True): it holds pickled Python objects "
                f"({type(e).__name__}). If you trust the file, pass allow_pickle=True."
            ) from e
    except Exception as e:  # zip reader errors, EOF, bad magic number: the bytes are not a whole torch file
        raise ValueError(f"{what} is corrupt or truncated ({type(e).__name__}: {e}). Download or save it again.") from e
    if hasattr(source, "seek"):
        source.seek(0)
    return torch.load(source, map_location=device, weights_only=False)


CHECKSUMS_FILE = "checksums.json"
"""Beside the weights of an SAE folder this package wrote: ``{file name: {"sha256", "bytes"}}``."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fd:
        while block := fd.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def write_weights_checksum(folder: str | Path, files: tuple[str, ...] = ("sae_weights.safetensors",)) -> Path:
    """Record the sha256 and size of ``files`` of an SAE folder in ``checksums.json`` beside them (what
    ``load_sae`` verifies). Call it after every ``save_model``/``save_inference_model`` into ``folder``.
    Plain SAELens ignores the file; a folder re-saved elsewhere does not carry it."""
    folder = Path(folder)
    record = {}
    for name in files:
        file = folder / name
        if not file.is_file():
            raise ValueError(f"No {name} in {folder} to checksum; save the SAE there first.")
        record[name] = {"sha256": sha256_file(file), "bytes": file.stat().st_size}
    out = folder / CHECKSUMS_FILE
    atomic_write_text(out, json.dumps(record, indent=1) + "\n")
    return out


def verify_weights_checksum(folder: str | Path) -> bool:
    """Check the files listed in ``folder/checksums.json``; ``False`` when there is none (nothing to check).

    ``ValueError`` naming the file, the expected and the actual sha256 (and sizes) on a mismatch."""
    folder = Path(folder)
    listing = folder / CHECKSUMS_FILE
    if not listing.is_file():
        return False
    try:
        record = json.loads(listing.read_text())
        expected = {name: (str(v["sha256"]), int(v["bytes"])) for name, v in record.items()}
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(
            f"{listing} is not a checksum record ({{file: {{'sha256', 'bytes'}}}}; {type(e).__name__}: {e}). "
            "Delete it or rewrite it with sae_vision_ext.saes.io.write_weights_checksum(folder)."
        ) from e
    for name, (sha, size) in expected.items():
        file = folder / name
        if not file.is_file():
            raise ValueError(f"{file} is missing but {listing} records it. Copy the whole SAE folder again.")
        actual_size = file.stat().st_size
        actual = sha256_file(file)
        if actual != sha:
            truncated = " (truncated)" if actual_size < size else ""
            raise ValueError(
                f"{file} fails its checksum: expected sha256 {sha} ({size} bytes, recorded in {listing.name}), "
                f"actual {actual} ({actual_size} bytes){truncated}. The file is damaged: download or copy it "
                "again. If you replaced the weights on purpose, run "
                "sae_vision_ext.saes.io.write_weights_checksum(folder) or delete checksums.json."
            )
    return True
