"""circuit-tracer's cross-layer transcoder folders (``W_enc_{i}.safetensors`` + ``W_dec_{i}.safetensors``).

A CLT is not one SAELens SAE: ``load_sae(path)`` returns a :class:`~..clt.CrossLayerTranscoder`
(:func:`~..clt.load_clt`), and the SAELens converter refuses with that advice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..clt import is_clt_folder, load_clt
from .base import ConverterOutput, register_format


def _load(path: str | Path, device: str = "cpu") -> Any:
    return load_clt(path, device=device)


@register_format(
    "circuit_tracer_clt",
    detect=is_clt_folder,
    description="circuit-tracer CLT W_enc_{i}/W_dec_{i}.safetensors (+ clt_config.json); a CrossLayerTranscoder",
    load=_load,
)
def clt_disk_converter(
    path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None, allow_pickle: bool = False
) -> ConverterOutput:
    """Refuses: a cross-layer transcoder is not one SAELens SAE."""
    raise ValueError(
        f"{path} is a cross-layer transcoder (circuit-tracer's layout), not one SAELens SAE; read it with "
        "sae_vision_ext.load_sae(path) or sae_vision_ext.saes.clt.load_clt(path), which return a CrossLayerTranscoder."
    )
