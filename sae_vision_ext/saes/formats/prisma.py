"""ViT-Prisma (Prisma-Multimodal/ViT-Prisma): ``config.json`` beside ``weights.pt`` or a training folder.

``VisionSAETrainer.checkpoint()`` writes ``config.json``, ``n_images_<N>.pt`` and
``n_images_<N>_log_feature_sparsity.pt`` for several N: the newest checkpoint is the largest N
(numerically: 999 < 1300000), never a sparsity file. Each ``.pt`` is ``{"cfg":
VisionModelSAERunnerConfig, "state_dict": ...}``: the config is a pickled ViT-Prisma object, read here
with ``weights_only=True`` by letting an inert stand-in take its place (no ViT-Prisma import, no code
runs); ``config.json`` is the config used.

Read off ViT-Prisma's ``sae.py``/``transcoder.py`` (fixtures from its own code in
``tests/fixtures/prisma``):

- standard: ``act((norm(x) − b_dec) @ W_enc + b_enc)``, decode ``denorm(f @ W_dec + b_dec)``;
  ``activation_fn_str`` ``relu`` or ``topk`` (top k, then ReLU: SAELens ``topk``).
- gated: SAELens's gated formula exactly (``W_enc``, ``b_gate``, ``r_mag``, ``b_mag``; the unused
  ``b_enc`` is dropped); a ``topk`` magnitude path has no SAELens class: refused.
- transcoders (``is_transcoder``): input bias ``b_dec`` folded into ``b_enc``, output bias
  ``b_dec_out``, skip ``x @ W_skip.T``: SAELens ``Transcoder``/``SkipTranscoder`` with
  ``hook_name_out``; with a normalisation, ViT-Prisma de-normalises the output with the input's
  statistics, which SAELens transcoders do not do: refused.
- ``normalize_activations``: ``none``, ``layer_norm`` and ``constant_norm_rescale`` are SAELens's
  formulas exactly. Hooks keep their TransformerLens names (``blocks.{l}.hook_resid_post``,
  ``blocks.{l}.ln2.hook_normalized``: after the LayerNorm's affine in both packages; a ViT-Prisma
  model loaded with ``LNPre`` (no affine) is refused). Model ids map to this package's loaders
  (``open-clip:org/name`` → ``open_clip:hf-hub:org/name``, timm names → ``timm:``, Hugging Face
  ids → ``hf:``); the original id stays in ``metadata.prisma_model_name``.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ...models.ids import canonical_model_id
from ..checks import read_json_object
from ..io import torch_load
from .base import ConverterOutput, base_cfg, finish, fold_input_bias, folder_of, register_format
from .weights import find_weights

_NUMBERED = re.compile(r"n_images_(\d+)\.pt")
_NORMS = ("none", "layer_norm", "constant_norm_rescale")


class PickledStandIn:
    """Takes the place of a pickled ViT-Prisma object under ``weights_only`` loading: it only stores
    the state it is given (no class of the other project is imported or run)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state


def _files(path: Path) -> tuple[Path, Path]:
    folder = folder_of(path)
    if path.is_file() and path.suffix == ".pt":
        weights = path
    elif (folder / "weights.pt").exists():
        weights = folder / "weights.pt"
    else:
        numbered = [(int(m.group(1)), p) for p in folder.glob("n_images_*.pt") if (m := _NUMBERED.fullmatch(p.name))]
        others = sorted(p for p in folder.glob("*.pt") if "sparsity" not in p.name)
        if numbered:
            weights = max(numbered)[1]
        elif others:
            weights = others[-1]
        else:
            raise ValueError(f"No ViT-Prisma weights (weights.pt, n_images_<N>.pt) in {folder}.")
    if not (folder / "config.json").exists():
        raise ValueError(f"No ViT-Prisma config.json beside {weights}.")
    return folder / "config.json", weights


def _is_prisma(path: Path) -> bool:
    folder = folder_of(path)
    cfg = folder / "config.json"
    if not cfg.is_file() or not (path.suffix == ".pt" or any(folder.glob("*.pt"))):
        return False
    try:
        keys = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(keys, dict) and "hook_point_layer" in keys and "expansion_factor" in keys


def load_prisma_file(file: Path, device: str, allow_pickle: bool) -> Any:
    """``torch.load(weights_only=True)`` of a ViT-Prisma ``.pt``, with stand-ins for its pickled
    ``vit_prisma.*`` classes; other unsafe globals still need ``allow_pickle``."""
    what = f"ViT-Prisma weights {file}"
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(file))
    except (RuntimeError, pickle.UnpicklingError, OSError, EOFError, ValueError) as e:
        raise ValueError(f"{what} is corrupt or truncated ({type(e).__name__}: {e}). Download or save it again.") from e
    stand_ins = [(PickledStandIn, name) for name in names if name.startswith("vit_prisma.")]
    with torch.serialization.safe_globals(stand_ins):
        return torch_load(file, device, allow_pickle, what)


def prisma_model_id(name: str | None) -> str | None:
    """This package's model id for a ViT-Prisma ``model_name`` (``None`` when there is no loader for it)."""
    if not name:
        return None
    if name.startswith("open-clip:"):
        return canonical_model_id(name)
    if "/" in name:
        return f"hf:{name}"
    if name.startswith("vit_"):
        return f"timm:{name}"
    return None


def _hook_name(pc: dict[str, Any], layer_key: str, subtype_key: str, default: str) -> str | None:
    layer = pc.get(layer_key)
    if isinstance(layer, list):
        layer = layer[0]
    if layer is None:
        return None
    subtype = pc.get(subtype_key) or default
    norm_type = (
        (pc.get("vit_model_cfg") or {}).get("normalization_type") if isinstance(pc.get("vit_model_cfg"), dict) else None
    )
    if subtype.endswith("hook_normalized") and norm_type == "LNPre":
        raise ValueError(
            f"ViT-Prisma SAE reads {subtype} of a model loaded with normalization_type 'LNPre' (LayerNorm affine "
            "folded into the next layer), which is before the affine; this package's hook_normalized is after it. "
            "Train on hook_resid_post or load the model without fold_ln."
        )
    return f"blocks.{layer}.{subtype}"


@register_format(
    "prisma",
    detect=_is_prisma,
    description="ViT-Prisma config.json + weights.pt or n_images_<N>.pt training folder",
    config_file="config.json",
)
def prisma_disk_converter(
    path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None, allow_pickle: bool = False
) -> ConverterOutput:
    """SAELens disk converter for a ViT-Prisma checkpoint folder (or one of its ``.pt`` files)."""
    cfg_path, weights_path = _files(Path(path))
    pc = read_json_object(cfg_path, "ViT-Prisma config")
    raw = load_prisma_file(weights_path, device, allow_pickle)
    extra = ("b_gate", "r_mag", "b_mag", "b_dec_out", "W_skip")
    state = find_weights(raw, f"ViT-Prisma weights {weights_path}", extra)
    act = str(pc.get("activation_fn_str", "relu")).lower()
    norm = pc.get("normalize_activations") or "none"
    if norm not in _NORMS:
        raise ValueError(f"ViT-Prisma normalize_activations {norm!r} is not supported; supported: {', '.join(_NORMS)}.")
    if act not in ("relu", "topk"):
        raise ValueError(f"ViT-Prisma activation_fn_str {act!r} has no SAELens equivalent; supported: relu, topk.")
    k = (pc.get("activation_fn_kwargs") or {}).get("k")
    if act == "topk" and k is None:
        raise ValueError("ViT-Prisma config has activation_fn_str 'topk' but no activation_fn_kwargs.k.")
    selection = "cls" if pc.get("cls_token_only") else "patches" if pc.get("use_patches_only") else "all"
    d_in, d_sae = state["W_enc"].shape
    meta = {
        "model_name": prisma_model_id(pc.get("model_name")),
        "prisma_model_name": pc.get("model_name"),
        "hook_name": _hook_name(pc, "hook_point_layer", "layer_subtype", "hook_resid_post"),
        "token_selection": selection,
        "context_size": pc.get("context_size"),
        "prisma_checkpoint": weights_path.name,
    }
    architecture = pc.get("architecture") or "standard"
    if pc.get("is_transcoder"):
        cfg, state = _transcoder(pc, state, norm, act, device, d_in=d_in, d_sae=d_sae, meta=meta)
    elif architecture == "gated":
        if act != "relu":
            raise ValueError(
                "ViT-Prisma gated SAE with a topk magnitude path has no SAELens class (its gated SAE is ReLU)."
            )
        cfg = base_cfg("gated", d_in, d_sae, device, "vit_prisma", **meta)
        state = {key: state[key] for key in ("W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec")}
    elif architecture == "standard":
        cfg = base_cfg("topk" if act == "topk" else "standard", d_in, d_sae, device, "vit_prisma", **meta)
        state = {key: state[key] for key in ("W_enc", "b_enc", "W_dec", "b_dec")}
        if act == "topk":
            cfg.update(k=int(k), rescale_acts_by_decoder_norm=False)
    else:
        raise ValueError(
            f"ViT-Prisma architecture {architecture!r} is not supported; supported: standard, gated, transcoders."
        )
    if not pc.get("is_transcoder"):
        cfg.update(apply_b_dec_to_input=True, normalize_activations=norm)
    return finish(cfg, state, device, cfg_overrides)


def _transcoder(pc, state, norm, act, device, *, d_in, d_sae, meta):  # type: ignore[no-untyped-def]
    if norm != "none":
        raise ValueError(
            f"ViT-Prisma transcoder with normalize_activations {norm!r}: ViT-Prisma de-normalises the transcoder "
            "output with the input's statistics, which SAELens transcoders do not do; no exact conversion."
        )
    if act != "relu":
        raise ValueError("ViT-Prisma topk transcoders have no SAELens class; supported transcoders are ReLU.")
    skip = bool(pc.get("transcoder_with_skip_connection")) and "W_skip" in state
    weights = {"W_enc": state["W_enc"], "b_enc": state["b_enc"], "W_dec": state["W_dec"], "b_dec": state["b_dec_out"]}
    fold_input_bias(weights, state["b_dec"])
    if skip:
        weights["W_skip"] = state["W_skip"]
    meta = {**meta, "hook_name_out": _hook_name(pc, "out_hook_point_layer", "layer_out_subtype", "hook_mlp_out")}
    cfg = base_cfg("skip_transcoder" if skip else "transcoder", d_in, d_sae, device, "vit_prisma", **meta)
    cfg["d_out"] = int(state["W_dec"].shape[1])
    return cfg, weights
