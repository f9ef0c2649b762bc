"""The seed paper's checkpoints (rubato-yeong/RRM) as a registered format: one ``epoch<N>.pth`` file
or its ``L<layer>`` folder. The layout and converter live in :mod:`..rrm_checkpoints`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..rrm_checkpoints import rrm_disk_converter
from .base import ConverterOutput, register_format

_EPOCH = re.compile(r"^epoch\d+\.pth$")


def _is_rrm(path: Path) -> bool:
    layer_dir = path if path.is_dir() else path.parent
    if path.is_file() and not _EPOCH.match(path.name):
        return False
    return bool(re.match(r"^L\d+$", layer_dir.name) and re.match(r"^K\d+_R[0-9.]+$", layer_dir.parent.name)) and (
        path.is_file() or any(_EPOCH.match(p.name) for p in layer_dir.iterdir())
    )


@register_format("rrm", detect=_is_rrm, description="RRM K<k>_R<R>/L<layer>/epoch<N>.pth (the seed paper's TopK SAEs)")
def rrm_format_converter(
    path: str | Path,
    device: str = "cpu",
    cfg_overrides: dict[str, Any] | None = None,
    allow_pickle: bool = False,
    epoch: int | None = None,
) -> ConverterOutput:
    """The RRM converter (its files are plain tensors: ``allow_pickle`` is never needed). ``epoch`` picks
    ``epoch<N>.pth`` of an ``L<layer>`` folder (default the largest; ``load_sae("rrm:...")`` defaults to 50)."""
    return rrm_disk_converter(path, device, cfg_overrides, epoch=epoch)
