"""The registry of SAE checkpoint formats, and what every converter shares.

A format is a SAELens disk converter (``(path, device, cfg_overrides, allow_pickle) -> (cfg, state)``)
registered with a detector, the way timm registers models::

    @register_format("saev", detect=_is_saev, description="saev sae.pt (JSON header + torch state dict)")
    def saev_disk_converter(path, device="cpu", cfg_overrides=None, allow_pickle=False): ...

:func:`detect_format` runs every detector: none matching raises ``ValueError`` naming what the path holds
and what each format needs; several matching raises naming them (pass ``format=`` to ``load_sae``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from ..._registry import Registry
from ..checks import check_converted
from ..io import sae_lens_version

ConverterOutput = tuple[dict[str, Any], dict[str, torch.Tensor]]


class DiskConverter(Protocol):
    """SAELens's disk-converter signature plus ``allow_pickle`` (default ``False``: nothing is unpickled)."""

    def __call__(
        self,
        path: str | Path,
        device: str = "cpu",
        cfg_overrides: dict[str, Any] | None = None,
        allow_pickle: bool = False,
    ) -> ConverterOutput: ...


@dataclass(frozen=True)
class SAEFormat:
    """One registered checkpoint format."""

    name: str
    convert: DiskConverter
    """SAELens disk converter: pass it as ``SAE.load_from_disk(path, converter=...)``."""
    detect: Callable[[Path], bool]
    """True when ``path`` (a file or folder) is in this format; cheap, never unpickles."""
    description: str
    """What the files look like (shown in errors and in ``docs/saes.md``)."""
    load: Callable[..., Any] | None = None
    """For checkpoints that are not one SAELens SAE (a cross-layer transcoder): ``(path, device) ->``
    the loaded object, which ``load_sae`` returns instead of going through ``SAE.load_from_disk``."""


FORMATS: Registry[SAEFormat] = Registry("SAE format")


def register_format(
    name: str,
    *,
    detect: Callable[[Path], bool],
    description: str,
    config_file: str | None = None,
    load: Callable[..., Any] | None = None,
) -> Callable[[Any], Any]:
    """Decorator registering a disk converter as format ``name``.

    The registered (and returned) converter runs :func:`~..checks.check_converted` on what it returns,
    so plain ``SAE.load_from_disk(path, converter=...)`` gets the same refusals as ``load_sae``;
    ``config_file`` (``cfg.json``, ``config.json``) is the file those messages name (default: the path);
    ``load`` see :attr:`SAEFormat.load`."""

    def deco(convert: Any) -> Any:
        @functools.wraps(convert)
        def checked(
            path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None, **kwargs: Any
        ) -> ConverterOutput:
            cfg, state = convert(path, device, cfg_overrides, **kwargs)
            source = folder_of(Path(path)) / config_file if config_file else Path(path)
            check_converted(cfg, state, str(source))
            return cfg, state

        FORMATS.register(name)(SAEFormat(name, checked, detect, description, load))
        return checked

    return deco


def detect_format(path: str | Path) -> str:
    """The one registered format whose detector accepts ``path``; ``ValueError`` for none or several."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"No file or folder at {p}.")
    matches = [name for name, fmt in FORMATS.items() if _safe_detect(fmt, p)]
    if len(matches) == 1:
        return matches[0]
    listing = ", ".join(sorted(q.name for q in p.iterdir())[:12]) if p.is_dir() else p.name
    if matches:
        raise ValueError(
            f"{p} looks like several SAE formats ({', '.join(matches)}); it holds: {listing}. "
            f"Pass format='<name>' to load_sae to choose one."
        )
    known = "; ".join(f"{name}: {fmt.description}" for name, fmt in FORMATS.items())
    raise ValueError(f"Cannot tell the SAE format of {p} (it holds: {listing}). Known formats: {known}.")


def _safe_detect(fmt: SAEFormat, path: Path) -> bool:
    try:
        return bool(fmt.detect(path))
    except OSError:
        return False


def folder_of(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def base_cfg(
    architecture: str, d_in: int, d_sae: int, device: str, source_format: str, **metadata: Any
) -> dict[str, Any]:
    """The SAELens config every converter starts from (float32, no normalisation, no ``b_dec`` subtraction)."""
    return {
        "architecture": architecture,
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "dtype": "float32",
        "device": device,
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "metadata": {
            "model_name": None,
            "hook_name": None,
            "source_format": source_format,
            "sae_lens_version": sae_lens_version(),
            **metadata,
        },
    }


def finish(
    cfg: dict[str, Any], state: dict[str, torch.Tensor], device: str, cfg_overrides: dict[str, Any] | None
) -> ConverterOutput:
    """Apply the user's overrides and make every tensor a contiguous float32 copy on ``device``."""
    cfg.update(cfg_overrides or {})
    return cfg, {k: v.detach().to(device=device, dtype=torch.float32).contiguous() for k, v in state.items()}


def fold_input_bias(state: dict[str, torch.Tensor], bias: torch.Tensor) -> None:
    """``(x − bias) @ W_enc + b_enc`` as ``x @ W_enc + b_enc'``: exact, for encoders whose input bias is
    not the decoder's output bias (transcoders, tied-bias variants)."""
    state["b_enc"] = state["b_enc"] - bias.to(state["W_enc"].dtype) @ state["W_enc"]


def with_allow_pickle(convert: DiskConverter, allow_pickle: bool) -> DiskConverter:
    return functools.partial(convert, allow_pickle=allow_pickle)  # type: ignore[return-value]
