"""SAELens's own folders (``cfg.json`` + ``sae_weights.safetensors``), as ``save_model`` writes them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import ConverterOutput, register_format


def _is_saelens(path: Path) -> bool:
    return path.is_dir() and (path / "cfg.json").is_file() and (path / "sae_weights.safetensors").is_file()


@register_format("saelens", detect=_is_saelens, description="SAELens cfg.json + sae_weights.safetensors")
def saelens_disk_converter(
    path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None, allow_pickle: bool = False
) -> ConverterOutput:
    """SAELens's own disk loader, after registering this package's ``signed_topk`` class (a folder saved
    from a converted saev TopK SAE names it)."""
    from sae_lens.loading.pretrained_sae_loaders import sae_lens_disk_loader

    from ..signed_topk import ensure_registered

    ensure_registered()
    return sae_lens_disk_loader(path, device, cfg_overrides)
