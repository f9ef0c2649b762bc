"""What ``load_sae`` checks in every converted config before SAELens builds the SAE.

SAELens fills a missing field with its default (``k = 100`` for a TopK SAE) and reports the others
as ``KeyError``/``TypeError``/``RuntimeError`` from deep inside; :func:`check_converted` refuses them
first with a ``ValueError`` naming the file, the bad value, what is valid and how to fix it.
The rules (listed in ``docs/saes.md``, "What load_sae checks"):

- ``architecture`` is present and a registered SAELens class (close names suggested);
- ``d_in`` and ``d_sae`` are present, positive integers, and equal the weights' shapes
  (``W_enc [d_in, d_sae]``, ``W_dec [d_sae, ·]``);
- classes with a ``k`` (``topk``, ``abstopk``, ``signed_topk``, ``topk_transcoder``) have one, an integer
  in ``1..d_sae``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from .._registry import unknown_name_message

K_FIX = 'Set "k" in {file} to the k it was trained with, or pass load_sae(..., cfg_overrides={{"k": <k>}})'


def read_json_object(file: Path, what: str) -> dict[str, Any]:
    """The JSON object in ``file``; ``ValueError`` naming it when it is missing, not JSON or not an object."""
    try:
        text = file.read_text()
    except FileNotFoundError:
        raise ValueError(f"{what} {file} is missing. Copy the whole checkpoint folder again.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {file} cannot be read as text ({type(e).__name__}: {e}).") from e
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{what} {file} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}). Fix or restore the file."
        ) from e
    if not isinstance(obj, dict):
        raise ValueError(f"{what} {file} holds a JSON {type(obj).__name__}, not an object of config keys.")
    return obj


def sae_architectures() -> dict[str, Any]:
    """SAELens's registered inference architectures (``signed_topk`` included) -> config class."""
    from sae_lens.registry import SAE_CLASS_REGISTRY

    from . import signed_topk, transcoders

    signed_topk.ensure_registered()
    transcoders.ensure_registered()
    return {name: config_cls for name, (_, config_cls) in SAE_CLASS_REGISTRY.items()}


def check_architecture(cfg: dict[str, Any], source: str) -> None:
    """``ValueError`` when ``cfg`` names an architecture SAELens does not know (close names listed)."""
    arch = cfg.get("architecture")
    if arch is None:
        return
    known = sae_architectures()
    if not isinstance(arch, str) or arch not in known:
        raise ValueError(
            f"{source}: {unknown_name_message('SAE architecture', str(arch), sorted(known), shown=20)} "
            "Set 'architecture' to the class the SAE was trained as."
        )


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_converted(cfg: dict[str, Any], state: dict[str, torch.Tensor], source: str) -> None:
    """Refuse a converter's ``(cfg, state)`` that SAELens would load wrongly or fail on obscurely.

    ``source`` names the file the config came from (it starts every message)."""
    from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting

    check_architecture(cfg, source)
    try:
        full = handle_config_defaulting(copy.deepcopy(cfg))  # what SAELens will build from (pre-6 configs renamed)
    except Exception as e:
        raise ValueError(f"{source}: SAELens cannot read this config ({type(e).__name__}: {e}).") from e
    arch = full.get("architecture")
    known = sae_architectures()
    if arch is None:
        raise ValueError(
            f"{source} has no 'architecture'. Add the class it was trained as, one of {', '.join(sorted(known))}."
        )
    check_architecture(full, source)
    for key in ("d_in", "d_sae"):
        if key not in full:
            raise ValueError(f"{source} has no {key!r}. Add it (an integer: the SAE's {_MEANING[key]}).")
        if not _positive_int(full[key]):
            raise ValueError(f"{source}: {key}={full[key]!r} is not a positive integer ({_MEANING[key]}).")
    _check_shapes(full, state, source)
    if "k" in getattr(known[arch], "__dataclass_fields__", {}):
        _check_k(full, source)


_MEANING = {"d_in": "input width, W_enc's first dimension", "d_sae": "number of features, W_enc's second dimension"}


def _check_shapes(cfg: dict[str, Any], state: dict[str, torch.Tensor], source: str) -> None:
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    w_enc, w_dec = state.get("W_enc"), state.get("W_dec")
    if w_enc is not None and tuple(w_enc.shape) != (d_in, d_sae):
        raise ValueError(
            f"{source}: d_in={d_in}, d_sae={d_sae} but W_enc is {list(w_enc.shape)} ([d_in, d_sae]). "
            "The config does not belong to these weights: fix d_in/d_sae or restore the matching files."
        )
    if w_dec is not None and (w_dec.ndim != 2 or w_dec.shape[0] != d_sae):
        raise ValueError(
            f"{source}: d_sae={d_sae} but W_dec is {list(w_dec.shape)} ([d_sae, d_out]). "
            "The config does not belong to these weights: fix d_sae or restore the matching files."
        )
    if w_dec is not None and "d_out" not in cfg and w_dec.shape[1] != d_in:
        raise ValueError(f"{source}: d_in={d_in} but W_dec is {list(w_dec.shape)} ([d_sae, d_in]).")


def _check_k(cfg: dict[str, Any], source: str) -> None:
    arch, d_sae = cfg["architecture"], cfg["d_sae"]
    if "k" not in cfg or cfg["k"] is None:
        raise ValueError(
            f"{source}: architecture {arch!r} has no 'k' (SAELens would silently use its default, 100). "
            + K_FIX.format(file=source)
            + "."
        )
    k = cfg["k"]
    if not _positive_int(k) or k > d_sae:
        raise ValueError(
            f"{source}: k={k!r} is not valid for this {arch} SAE: k must be an integer from 1 to d_sae={d_sae}. "
            + K_FIX.format(file=source)
            + "."
        )
