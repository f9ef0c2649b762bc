"""EleutherAI sparsify: a folder with ``cfg.json`` and ``sae.safetensors`` (``SparseCoder.save_to_disk``).

Read off sparsify 1.3.3's ``sparse_coder.py`` (fixtures from its own code in
``tests/fixtures/sparsify``): ``encoder.weight [d_sae, d_in]``, ``encoder.bias``, ``W_dec [d_sae, d_in]``
(already SAELens's orientation), ``b_dec``; encode ``topk(relu((x − b_dec) @ encoder.weight.T +
encoder.bias))`` (top k of the ReLU, i.e. SAELens ``topk``), decode ``f @ W_dec + b_dec``. ``num_latents:
0`` means ``d_in · expansion_factor``; the weights' shapes are used. Transcoders (``transcode``) and skip
connections also select the top k, and SAELens has no top-k transcoder; they and ``activation:
groupmax`` are refused. The layer folder name (``layers.5``) gives
``blocks.5.hook_resid_post``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..._hooks import resid_post
from ..checks import K_FIX, read_json_object
from .base import ConverterOutput, base_cfg, finish, register_format


def _is_sparsify(path: Path) -> bool:
    return path.is_dir() and (path / "cfg.json").is_file() and (path / "sae.safetensors").is_file()


@register_format(
    "sparsify",
    detect=_is_sparsify,
    description="EleutherAI sparsify cfg.json + sae.safetensors",
    config_file="cfg.json",
)
def sparsify_disk_converter(
    path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None, allow_pickle: bool = False
) -> ConverterOutput:
    """SAELens disk converter for a sparsify ``SparseCoder`` folder (safetensors: nothing is unpickled)."""
    from safetensors.torch import load_file

    folder = Path(path)
    sc = read_json_object(folder / "cfg.json", "sparsify config")
    try:
        raw = load_file(str(folder / "sae.safetensors"), device="cpu")
    except Exception as e:
        raise ValueError(f"{folder / 'sae.safetensors'} is corrupt or truncated ({type(e).__name__}: {e}).") from e
    if sc.get("activation", "topk") != "topk":
        raise ValueError(f"sparsify activation {sc.get('activation')!r} has no SAELens class; supported: topk.")
    missing = [k for k in ("encoder.weight", "encoder.bias", "W_dec", "b_dec") if k not in raw]
    if missing:
        raise ValueError(f"{folder / 'sae.safetensors'} lacks {', '.join(missing)}: saved without its decoder?")
    d_sae, d_in = raw["encoder.weight"].shape
    match = re.search(r"layers[._](\d+)", folder.name)
    meta = {"hook_name": resid_post(int(match.group(1))) if match else None, "sparsify_folder": folder.name}
    if sc.get("transcode") or "W_skip" in raw:
        raise ValueError(
            "sparsify transcoders and skip connections select the top k latents, and SAELens has no top-k transcoder "
            "class: no exact conversion. Load it with sparsify itself."
        )
    state = {
        "W_enc": raw["encoder.weight"].T,
        "b_enc": raw["encoder.bias"],
        "W_dec": raw["W_dec"],
        "b_dec": raw["b_dec"],
    }
    cfg = base_cfg("topk", d_in, d_sae, device, "sparsify", **meta)
    k = (cfg_overrides or {}).get("k", sc.get("k"))
    if k is None:  # sparsify's save_to_disk always writes k; its default (32) may not be what was trained
        raise ValueError(f"{folder / 'cfg.json'} has no 'k' (the number of active latents). " + K_FIX.format(file="it"))
    cfg.update(k=k, apply_b_dec_to_input=True, rescale_acts_by_decoder_norm=False)
    return finish(cfg, state, device, cfg_overrides)
