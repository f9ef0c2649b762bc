"""The seed paper's published SAE checkpoints (Kim et al. 2025, code rubato-yeong/RRM) as SAELens SAEs.

Layout, as the authors' ``2_train_TopKSAE.py`` writes it::

    {root}/{model}/K{k}_R{R}/L{layer}/epoch{N}.pth      # model: vit | dinov2 | clip_vit

Each file holds ``{"epoch", "model_state_dict", "optimizer_state_dict"}`` with ``W_enc [d_in, F]``,
``b_enc [F]`` (a parameter their forward never reads, so it stays at its zero init), ``W_dec [F, d_in]``
and ``b_dec [d_in]``; ``F = int(R · d_in)``; ``k``, ``R`` and the layer live only in the path. Their
forward standardises each token (``x̃ = (x − μ) / (σ + 1e-5)``, unbiased ``σ``), encodes
``relu((x̃ − b_dec) @ W_enc)`` then keeps the top ``k``, and decodes ``(z @ W_dec + b_dec)·σ + μ``:
exactly SAELens's ``TopKSAE`` with ``normalize_activations="layer_norm"``,
``apply_b_dec_to_input=True`` and ``b_enc = 0`` (a non-zero stored ``b_enc`` is dropped with a warning).
The SAE of layer ``L`` reads block ``L``'s output, ``blocks.{L}.hook_resid_post``. Files are read with
``torch.load(weights_only=True)``; nothing is unpickled.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .._hooks import resid_post
from .io import sae_lens_version, torch_load

if TYPE_CHECKING:
    from sae_lens import SAE

RRM_MODELS: dict[str, str] = {
    "vit": "timm:vit_base_patch16_224",
    "dinov2": "hf:facebook/dinov2-with-registers-base-imagenet1k-1-layer",
    "clip_vit": "hf:openai/clip-vit-base-patch16",
}
"""The authors' ``model_type`` names and the model ids this package loads them with."""

RRM_LAYER_CONFIGS: dict[str, dict[int, tuple[int, float]]] = {
    "vit": {0: (4, 0.25), 1: (32, 0.5), 2: (64, 1), 3: (96, 2), 4: (96, 2), 5: (128, 2), 6: (128, 4),
            7: (160, 4), 8: (160, 4), 9: (160, 4), 10: (128, 2)},
    "dinov2": {0: (4, 0.25), 1: (16, 0.25), 2: (32, 0.5), 3: (32, 2), 4: (64, 2), 5: (96, 2), 6: (128, 2),
               7: (128, 2), 8: (128, 2), 9: (160, 2), 10: (160, 2)},
    "clip_vit": {0: (64, 0.5), 1: (64, 0.5), 2: (96, 1), 3: (96, 2), 4: (128, 2), 5: (128, 2), 6: (128, 2),
                 7: (128, 2), 8: (160, 2), 9: (160, 2), 10: (160, 2)},
}  # fmt: skip
"""The paper's per-layer ``(k, R)`` (``utils/functions/load_models.py``), used to choose among several
``K*_R*`` folders holding the same layer."""

_KR = re.compile(r"^K(\d+)_R([0-9.]+)$")
_LAYER = re.compile(r"^L(\d+)$")
_EPOCH = re.compile(r"^epoch(\d+)\.pth$")


def _latest_epoch(layer_dir: Path) -> Path:
    epochs = [(int(m.group(1)), p) for p in layer_dir.iterdir() if (m := _EPOCH.match(p.name))]
    if not epochs:
        raise ValueError(f"No epoch<N>.pth checkpoint in {layer_dir} (RRM layout: K<k>_R<R>/L<layer>/epoch<N>.pth).")
    return max(epochs)[1]  # the largest N numerically, not by name


def _parse_path(file: Path) -> tuple[str | None, int, float, int]:
    """``(model_type or None, k, R, layer)`` from ``.../{model}/K{k}_R{R}/L{layer}/epoch{N}.pth``."""
    layer_m, kr_m = _LAYER.match(file.parent.name), _KR.match(file.parent.parent.name)
    if layer_m is None or kr_m is None:
        raise ValueError(
            f"{file} is not in the RRM layout {{root}}/{{model}}/K<k>_R<R>/L<layer>/epoch<N>.pth: k, R and the layer "
            "are read from the path. Keep the authors' folder names."
        )
    model = file.parent.parent.parent.name
    return (model if model in RRM_MODELS else None), int(kr_m.group(1)), float(kr_m.group(2)), int(layer_m.group(1))


def rrm_disk_converter(
    path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """SAELens disk converter for one RRM checkpoint (an ``epoch<N>.pth`` file or its ``L<layer>`` folder,
    whose largest epoch is taken)."""
    file = Path(path)
    if file.is_dir():
        file = _latest_epoch(file)
    model, k, ratio, layer = _parse_path(file)
    ckpt = torch_load(file, device, False, f"RRM checkpoint {file}")
    state = ckpt.get("model_state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not {"W_enc", "W_dec", "b_dec"} <= set(state):
        raise ValueError(f"{file} has no model_state_dict with W_enc, W_dec, b_dec: not an RRM TopKSAE checkpoint.")
    d_in, d_sae = state["W_enc"].shape
    if tuple(state["W_dec"].shape) != (d_sae, d_in) or int(ratio * d_in) != d_sae:
        raise ValueError(
            f"{file}: W_enc {tuple(state['W_enc'].shape)} / W_dec {tuple(state['W_dec'].shape)} do not match "
            f"R={ratio} in the path (expected {int(ratio * d_in)} features for d_in {d_in})."
        )
    if not 0 < k <= d_sae:
        raise ValueError(f"{file}: k={k} from the path is not between 1 and the checkpoint's {d_sae} features.")
    b_enc = state.get("b_enc", torch.zeros(d_sae))
    if torch.count_nonzero(b_enc):
        warnings.warn(
            f"{file}: b_enc is non-zero but the RRM forward never adds it; it is dropped (b_enc = 0) so the SAE "
            "equals the authors' encode.",
            stacklevel=2,
        )
    cfg: dict[str, Any] = {
        "architecture": "topk",
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "k": k,
        "dtype": "float32",
        "device": device,
        "apply_b_dec_to_input": True,
        "normalize_activations": "layer_norm",
        "rescale_acts_by_decoder_norm": False,
        "metadata": {
            "model_name": RRM_MODELS.get(model or ""),
            "hook_name": resid_post(layer),
            "source_format": "rrm",
            "rrm_model_type": model,
            "rrm_R": ratio,
            "rrm_epoch": ckpt.get("epoch"),
            "sae_lens_version": sae_lens_version(),
        },
    }
    cfg.update(cfg_overrides or {})
    weights = {"W_enc": state["W_enc"], "W_dec": state["W_dec"], "b_dec": state["b_dec"], "b_enc": 0 * b_enc}
    return cfg, {name: t.to(device=device, dtype=torch.float32).contiguous() for name, t in weights.items()}


def rrm_layer_dirs(root: str | Path) -> dict[int, Path]:
    """``{layer: L<layer> folder}`` under a model folder (``{root}/{model}``) or one ``K<k>_R<R>`` folder.

    Where several ``K*_R*`` folders hold a layer, the paper's ``(k, R)`` for that layer
    (:data:`RRM_LAYER_CONFIGS`) decides; without one, ``ValueError`` lists the candidates."""
    root = Path(root)
    models = [root / m for m in RRM_MODELS if (root / m).is_dir()] if root.is_dir() else []
    if len(models) == 1 and not any(_KR.match(p.name) for p in root.iterdir()):
        root = models[0]  # a download root holding one {model} folder
    if _KR.match(root.name):
        groups = [root]
    else:
        groups = sorted(p for p in root.iterdir() if p.is_dir() and _KR.match(p.name)) if root.is_dir() else []
    if not groups:
        raise ValueError(
            f"No K<k>_R<R> folders in {root}: expected the RRM layout {{root}}/{{model}}/K<k>_R<R>/L<layer>."
        )
    found: dict[int, list[Path]] = {}
    for group in groups:
        for layer_dir in group.iterdir():
            if m := _LAYER.match(layer_dir.name):
                found.setdefault(int(m.group(1)), []).append(layer_dir)
    paper = RRM_LAYER_CONFIGS.get(root.name, {})
    chosen = {}
    for layer, dirs in sorted(found.items()):
        if len(dirs) > 1 and layer in paper:
            k, ratio = paper[layer]
            dirs = [d for d in dirs if (m := _KR.match(d.parent.name)) and (int(m[1]), float(m[2])) == (k, ratio)]
        if len(dirs) != 1:
            names = ", ".join(sorted(d.parent.name for d in found[layer]))
            raise ValueError(
                f"Layer {layer} under {root} is in several K*_R* folders ({names}) and none is the paper's choice; "
                "point load_sae at one K<k>_R<R> folder."
            )
        chosen[layer] = dirs[0]
    return chosen


def load_rrm(ref: str | Path, device: str = "cpu") -> SAE | list[SAE]:
    """One SAE for an ``epoch<N>.pth`` file or ``L<layer>`` folder; the list of SAEs (sorted by layer,
    ready for ``ResidualReplacementModel``) for a model or ``K<k>_R<R>`` folder."""
    from sae_lens import SAE

    path = Path(ref)
    if not path.exists():
        raise ValueError(f"No RRM checkpoint or folder at {path}.")
    if path.is_file() or _LAYER.match(path.name):
        return SAE.load_from_disk(path, device=device, converter=rrm_disk_converter)
    return [
        SAE.load_from_disk(d, device=device, converter=rrm_disk_converter)
        for _, d in sorted(rrm_layer_dirs(path).items())
    ]
