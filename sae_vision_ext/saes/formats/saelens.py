"""SAELens's own folders (``cfg.json`` + ``sae_weights.safetensors``), as ``save_model`` writes them.

Read as SAELens's ``sae_lens_disk_loader`` reads them, after these checks: ``cfg.json`` is a JSON
object with a known ``architecture`` (the rest of the config is checked by
:func:`~..checks.check_converted`, like every format's); ``sae_weights.safetensors`` matches the
sha256 in ``checksums.json`` when the folder has one (this package writes it beside the SAEs it
trains and ships: :func:`~..io.write_weights_checksum`); a truncated or corrupt weights file raises
``ValueError`` naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..checks import check_architecture, read_json_object
from ..io import verify_weights_checksum
from .base import ConverterOutput, register_format

WEIGHTS_FILE = "sae_weights.safetensors"


def _is_saelens(path: Path) -> bool:
    return path.is_dir() and (path / "cfg.json").is_file() and (path / WEIGHTS_FILE).is_file()


@register_format(
    "saelens", detect=_is_saelens, description="SAELens cfg.json + sae_weights.safetensors", config_file="cfg.json"
)
def saelens_disk_converter(
    path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None, allow_pickle: bool = False
) -> ConverterOutput:
    """SAELens's own disk loader, after registering this package's ``signed_topk`` class (a folder saved
    from a converted saev TopK SAE names it) and checking the files."""
    from sae_lens.loading.pretrained_sae_loaders import read_sae_components_from_disk
    from sae_lens.util import str_to_dtype
    from safetensors import SafetensorError

    from ..signed_topk import ensure_registered

    ensure_registered()
    folder = Path(path)
    cfg_file, weights = folder / "cfg.json", folder / WEIGHTS_FILE
    cfg = read_json_object(cfg_file, "SAELens config")
    cfg["device"] = device
    cfg.update(cfg_overrides or {})
    check_architecture(cfg, str(cfg_file))
    try:
        dtype = str_to_dtype(cfg.get("dtype") or "float32")
    except Exception as e:
        raise ValueError(f"{cfg_file}: dtype {cfg.get('dtype')!r} is not a torch dtype name (float32, ...).") from e
    if not weights.is_file():
        raise ValueError(f"{weights} is missing beside {cfg_file}. Copy the whole SAE folder again.")
    verify_weights_checksum(folder)
    try:
        return read_sae_components_from_disk(cfg_dict=cfg, weight_path=weights, device=device, dtype=dtype)
    except (SafetensorError, OSError) as e:  # header, sizes: the bytes are not a whole safetensors file
        raise ValueError(
            f"{weights} is truncated or corrupt ({type(e).__name__}: {e}). Download, copy or save it again."
        ) from e
