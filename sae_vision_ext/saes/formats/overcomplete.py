"""overcomplete (KempnerInstitute/overcomplete): the ``state_dict()`` of its ``SAE``/``TopKSAE``.

Read off overcomplete 0.3.0 (fixtures from its own classes in ``tests/fixtures/overcomplete``). The
file holds ``encoder.final_block.0.{weight,bias}`` (the ``linear`` encoder; ``mlp_bn_1`` adds a
``BatchNorm1d`` at ``final_block.1``, folded here from its running statistics, as in eval mode),
``dictionary._weights [d_sae, d_in]`` and ``dictionary.multiplier``. In eval mode the dictionary is
``normalize(_weights) · exp(multiplier)`` (``l2``: rows divided by ``norm + 1e-8``), decode ``z @ D`` with
no bias; ``SAE`` encodes ``relu(pre)`` (SAELens ``standard``), ``TopKSAE`` the top k of it (SAELens
``topk``). The file does not say which class wrote it and ``top_k`` is a constructor argument, so
``cfg_overrides`` must say: ``{"overcomplete_class": "TopKSAE", "k": <top_k>}`` or
``{"overcomplete_class": "SAE"}``. Refused: encoders with hidden blocks, LayerNorm or
attention (not affine per latent), ``BatchTopKSAE`` (its eval threshold is an attribute, not saved)
and the other classes,
and dictionary normalisations other than ``l2``/``identity`` (set
``cfg_overrides={"overcomplete_dictionary_normalization": ...}``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..io import torch_load
from .base import ConverterOutput, base_cfg, finish, register_format

_LINEAR = ("encoder.final_block.0.weight", "encoder.final_block.0.bias")
_BATCHNORM = ("running_mean", "running_var", "weight", "bias")


def _file(path: Path) -> Path | None:
    if path.is_file():
        return path
    files = sorted(p for p in path.glob("*.pt*") if p.suffix in (".pt", ".pth"))
    return files[0] if len(files) == 1 else None


def _is_overcomplete(path: Path) -> bool:
    file = _file(path)
    if file is None or file.suffix not in (".pt", ".pth") or file.stat().st_size > 2**31:
        return False
    with open(file, "rb") as fd:
        if fd.read(1) == b"{":  # a saev header
            return False
    try:
        raw = torch.load(file, map_location="meta", weights_only=True)
    except Exception:
        return False
    return isinstance(raw, dict) and "dictionary._weights" in raw


@register_format("overcomplete", detect=_is_overcomplete, description="overcomplete SAE/TopKSAE state_dict (.pt/.pth)")
def overcomplete_disk_converter(
    path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None, allow_pickle: bool = False
) -> ConverterOutput:
    """SAELens disk converter for an overcomplete ``state_dict`` file (``k`` from ``cfg_overrides``)."""
    overrides = dict(cfg_overrides or {})
    file = _file(Path(path))
    if file is None:
        raise ValueError(f"{path}: expected one overcomplete state_dict file (.pt or .pth).")
    raw = torch_load(file, device, allow_pickle, f"overcomplete state_dict {file}")
    encoder = sorted(k for k in raw if k.startswith("encoder."))
    batchnorm = [f"encoder.final_block.1.{name}" for name in _BATCHNORM]
    norm_keys = {k for k in encoder if k.startswith("encoder.final_block.1.")}
    is_batchnorm = set(batchnorm) <= norm_keys  # a LayerNorm has weight/bias but no running statistics
    if set(encoder) - set(_LINEAR) - (norm_keys if is_batchnorm else set()) or not set(_LINEAR) <= set(encoder):
        raise ValueError(
            f"{file}: overcomplete encoder {', '.join(encoder)} is not a single Linear (+ BatchNorm1d) block; hidden "
            "blocks, LayerNorm and attention encoders are not affine per latent: no SAELens equivalent."
        )
    cls = overrides.pop("overcomplete_class", None)
    if cls not in ("SAE", "TopKSAE") or (cls == "TopKSAE" and "k" not in overrides):
        reason = {"BatchTopKSAE": ": its eval-mode running threshold is an attribute, not saved in the state dict"}
        raise ValueError(
            f"{file}: overcomplete_class={cls!r}{reason.get(cls, '')}. An overcomplete state_dict does not say which "
            "class wrote it: pass cfg_overrides={'overcomplete_class': 'TopKSAE', 'k': <top_k>} or "
            "{'overcomplete_class': 'SAE'}; other classes have no exact SAELens equivalent."
        )
    weight, bias = raw[_LINEAR[0]].double(), raw[_LINEAR[1]].double()
    if is_batchnorm:  # eval-mode BatchNorm1d: per-latent affine, folded into the encoder
        mean, var, gamma, beta = (raw[name].double() for name in batchnorm)
        scale = gamma / torch.sqrt(var + float(overrides.pop("overcomplete_batchnorm_eps", 1e-5)))
        weight, bias = weight * scale[:, None], (bias - mean) * scale + beta
    norm = overrides.pop("overcomplete_dictionary_normalization", "l2")
    atoms = raw["dictionary._weights"].double()
    if norm == "l2":
        atoms = atoms / (atoms.norm(dim=1, keepdim=True) + 1e-8)
    elif norm != "identity":
        raise ValueError(f"overcomplete dictionary normalization {norm!r} is not supported; supported: l2, identity.")
    W_dec = atoms * torch.exp(raw["dictionary.multiplier"].double())
    d_sae, d_in = W_dec.shape
    state = {"W_enc": weight.T, "b_enc": bias, "W_dec": W_dec, "b_dec": torch.zeros(d_in, dtype=torch.float64)}
    architecture = "topk" if cls == "TopKSAE" else "standard"
    cfg = base_cfg(
        architecture, d_in, d_sae, device, "overcomplete", overcomplete_file=file.name, overcomplete_class=cls
    )
    if architecture == "topk":
        cfg.update(k=int(overrides.pop("k")), rescale_acts_by_decoder_norm=False)
    return finish(cfg, state, device, overrides)
