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

Which epoch: the authors' loader (``utils/functions/load_models.py``) reads ``epoch50.pth`` whatever
``num_epochs`` training ran (their default is 400), so ``rrm:`` references and the ``rrm-*`` releases
load epoch :data:`PAPER_EPOCH` unless ``epoch=`` says otherwise (a missing one is an error listing the
epochs present); the converter alone, given a folder, takes the largest. The epoch loaded is logged
(``logging.info``) and kept in ``cfg.metadata.rrm_epoch``. A model or ``K<k>_R<R>`` folder whose layers
have a gap (``L0, L2, L3``) is refused, naming the missing layers.
"""

from __future__ import annotations

import functools
import logging
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .._hooks import resid_post
from .io import sae_lens_version, torch_load

if TYPE_CHECKING:
    from sae_lens import SAE

logger = logging.getLogger(__name__)

PAPER_EPOCH = 50
"""The epoch the authors' code loads (``load_default_sae_args``: ``"epoch": 50``)."""

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


def _epoch_file(layer_dir: Path, epoch: int | None) -> Path:
    """``epoch<epoch>.pth`` in ``layer_dir`` (the largest N, numerically, for ``None``)."""
    epochs = dict(sorted((int(m.group(1)), p) for p in layer_dir.iterdir() if (m := _EPOCH.match(p.name))))
    if not epochs:
        raise ValueError(f"No epoch<N>.pth checkpoint in {layer_dir} (RRM layout: K<k>_R<R>/L<layer>/epoch<N>.pth).")
    if epoch is None:
        chosen = max(epochs)
        if PAPER_EPOCH in epochs and chosen != PAPER_EPOCH:
            warnings.warn(
                f"{layer_dir}: loading epoch{chosen}.pth, the largest; the seed paper's SAEs are "
                f"epoch{PAPER_EPOCH}.pth (what the authors' code loads). Pass epoch={PAPER_EPOCH} (or use an 'rrm:' "
                "reference) for those.",
                stacklevel=3,
            )
        return epochs[chosen]
    if epoch not in epochs:
        raise ValueError(
            f"No epoch{epoch}.pth in {layer_dir}; epochs present: {', '.join(map(str, epochs))}. "
            f"Pass epoch=<one of them> to load_sae{' (the seed paper used 50)' if epoch == PAPER_EPOCH else ''}."
        )
    return epochs[epoch]


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
    path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None, epoch: int | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """SAELens disk converter for one RRM checkpoint: an ``epoch<N>.pth`` file, or its ``L<layer>`` folder
    (``epoch<epoch>.pth`` in it; the largest epoch for ``None``)."""
    file = Path(path)
    if file.is_dir():
        file = _epoch_file(file, epoch)
    elif epoch is not None and (m := _EPOCH.match(file.name)) and int(m.group(1)) != epoch:
        raise ValueError(f"{file} is epoch {m.group(1)} but epoch={epoch} was asked for; pass the folder or that file.")
    model, k, ratio, layer = _parse_path(file)
    name_m = _EPOCH.match(file.name)
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
            "rrm_epoch": int(name_m.group(1)) if name_m else ckpt.get("epoch"),
            "rrm_checkpoint": f"{file.parent.parent.name}/{file.parent.name}/{file.name}",
            "sae_lens_version": sae_lens_version(),
        },
    }
    cfg.update(cfg_overrides or {})
    logger.info("RRM layer %d: loaded %s (epoch %s)", layer, file, cfg["metadata"]["rrm_epoch"])
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


def load_rrm(ref: str | Path, device: str = "cpu", epoch: int | None = None) -> SAE | list[SAE]:
    """One SAE for an ``epoch<N>.pth`` file or ``L<layer>`` folder; the list of SAEs (sorted by layer,
    ready for ``ResidualReplacementModel``) for a model or ``K<k>_R<R>`` folder, whose layers must run
    from 0 without a gap. ``epoch``: which ``epoch<N>.pth`` of each layer folder (default
    :data:`PAPER_EPOCH`, the authors' 50); a file is loaded as named."""
    from sae_lens import SAE

    path = Path(ref)
    if not path.exists():
        raise ValueError(f"No RRM checkpoint or folder at {path}.")
    if path.is_file():
        return SAE.load_from_disk(path, device=device, converter=functools.partial(rrm_disk_converter, epoch=epoch))
    epoch = PAPER_EPOCH if epoch is None else epoch
    converter = functools.partial(rrm_disk_converter, epoch=epoch)
    if _LAYER.match(path.name):
        return SAE.load_from_disk(path, device=device, converter=converter)
    dirs = rrm_layer_dirs(path)
    missing = sorted(set(range(max(dirs) + 1)) - set(dirs))
    if missing:
        raise ValueError(
            f"{path} has SAEs for layers {sorted(dirs)} but not for layer(s) {missing} "
            f"(missing {', '.join(f'L{layer}' for layer in missing)}): the per-layer list would silently skip them. "
            "Copy the missing folders, or load the layers you want one by one (load_sae('rrm:<.../L<n>>')) and pass "
            "that list to ResidualReplacementModel."
        )
    files = {layer: _epoch_file(d, epoch) for layer, d in sorted(dirs.items())}  # every layer's file, before loading
    logger.info("RRM %s: layers %s, epoch %d", path, sorted(dirs), epoch)
    return [SAE.load_from_disk(file, device=device, converter=converter) for file in files.values()]
