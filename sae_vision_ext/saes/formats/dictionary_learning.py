"""dictionary_learning (saprmarks/dictionary_learning): ``config.json`` + ``ae.pt`` as ``trainSAE`` saves them.

Read off dictionary_learning 0.1.0 (fixtures from its own ``trainSAE`` in
``tests/fixtures/dictionary_learning``); ``config.json`` is ``{"trainer": {"dict_class", "activation_dim",
"dict_size", "k", "layer", "lm_name", ...}, "buffer": {...}}``:

- ``AutoEncoder``: ``relu(encoder(x − bias))``, decode ``decoder(f) + bias`` → SAELens ``standard``.
- ``AutoEncoderTopK``: top k of ``relu(encoder(x − b_dec))`` → SAELens ``topk``.
- ``BatchTopKSAE``/``MatryoshkaBatchTopKSAE``: their default encode keeps ``relu(h)`` where it exceeds
  the stored scalar ``threshold`` (the batch top-k is training only) → SAELens ``jumprelu``.
- ``JumpReluAutoEncoder``: ``relu(h · (h > threshold))``, no ``b_dec`` subtraction → ``jumprelu``.
- ``GatedAutoEncoder``: SAELens's gated formula (``gate_bias`` → ``b_gate``, ``mag_bias`` → ``b_mag``).

Weights are read with ``torch.load(weights_only=True)``; a backup ``ae.pt`` holding
``{"ae", "optimizer", ...}`` reads its ``ae``. ``norm_factor`` needs nothing: ``trainSAE`` rescales the
biases before saving, so the file works on raw activations.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..._hooks import resid_post
from ..checks import read_json_object
from ..io import torch_load
from .base import ConverterOutput, base_cfg, finish, folder_of, register_format


def _is_dictionary_learning(path: Path) -> bool:
    folder = folder_of(path)
    if not ((folder / "ae.pt").is_file() and (folder / "config.json").is_file()):
        return False
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(cfg, dict) and isinstance(cfg.get("trainer"), dict) and "dict_class" in cfg["trainer"]


def _threshold(raw: dict[str, torch.Tensor], d_sae: int) -> torch.Tensor:
    """Their ``relu(h) * (relu(h) > t)`` (and ``relu(h · (h > t))``) equal SAELens's ``relu(h) * (h > max(t, 0))``."""
    return raw["threshold"].float().clamp(min=0.0).expand(d_sae).clone()


@register_format(
    "dictionary_learning",
    detect=_is_dictionary_learning,
    description="dictionary_learning config.json + ae.pt",
    config_file="config.json",
)
def dictionary_learning_disk_converter(
    path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None, allow_pickle: bool = False
) -> ConverterOutput:
    """SAELens disk converter for a dictionary_learning trainer folder (``trainer_<i>``)."""
    folder = folder_of(Path(path))
    trainer = read_json_object(folder / "config.json", "dictionary_learning config").get("trainer")
    if not isinstance(trainer, dict):
        raise ValueError(f"{folder / 'config.json'} has no 'trainer' object: not a dictionary_learning config.")
    raw = torch_load(folder / "ae.pt", device, allow_pickle, f"dictionary_learning weights {folder / 'ae.pt'}")
    if isinstance(raw, dict) and isinstance(raw.get("ae"), dict):
        raw = raw["ae"]  # a backup checkpoint
    dict_class = trainer["dict_class"]
    meta = {
        "hook_name": resid_post(trainer["layer"]) if trainer.get("layer") is not None else None,
        "dictionary_learning_class": dict_class,
        "dictionary_learning_lm_name": trainer.get("lm_name"),
    }
    if "W_enc" in raw:
        state = {"W_enc": raw["W_enc"], "b_enc": raw["b_enc"], "W_dec": raw["W_dec"], "b_dec": raw["b_dec"]}
    elif "encoder.weight" in raw:
        state = {"W_enc": raw["encoder.weight"].T, "W_dec": raw["decoder.weight"].T}
        state["b_dec"] = raw.get("b_dec", raw.get("bias", raw.get("decoder_bias")))
        if "encoder.bias" in raw:
            state["b_enc"] = raw["encoder.bias"]
    else:
        raise ValueError(f"{folder / 'ae.pt'} holds neither W_enc nor encoder.weight: not a dictionary_learning SAE.")
    d_in, d_sae = state["W_enc"].shape
    if dict_class == "AutoEncoder":
        cfg = base_cfg("standard", d_in, d_sae, device, "dictionary_learning", **meta)
    elif dict_class == "AutoEncoderTopK":
        cfg = base_cfg("topk", d_in, d_sae, device, "dictionary_learning", **meta)
        k = int(raw["k"]) if "k" in raw else trainer.get("k", (cfg_overrides or {}).get("k"))
        if k is None:
            raise ValueError(
                f"{folder}: AutoEncoderTopK with no k in ae.pt or config.json's trainer. Pass "
                "load_sae(..., cfg_overrides={'k': <k>})."
            )
        cfg.update(k=k, rescale_acts_by_decoder_norm=False)
    elif dict_class in ("BatchTopKSAE", "MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder"):
        cfg = base_cfg("jumprelu", d_in, d_sae, device, "dictionary_learning", **meta)
        state["threshold"] = _threshold(raw, d_sae)
    elif dict_class == "GatedAutoEncoder":
        cfg = base_cfg("gated", d_in, d_sae, device, "dictionary_learning", **meta)
        state.update(b_gate=raw["gate_bias"], b_mag=raw["mag_bias"], r_mag=raw["r_mag"])
    else:
        raise ValueError(
            f"dictionary_learning dict_class {dict_class!r} is not supported; supported: AutoEncoder, AutoEncoderTopK, "
            "BatchTopKSAE, MatryoshkaBatchTopKSAE, JumpReluAutoEncoder, GatedAutoEncoder."
        )
    cfg["apply_b_dec_to_input"] = dict_class != "JumpReluAutoEncoder"
    return finish(cfg, state, device, cfg_overrides)
