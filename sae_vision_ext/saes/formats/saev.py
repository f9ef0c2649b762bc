"""saev (OSU-NLP-Group/saev): ``sae.pt`` = one JSON header line, then ``torch.save(state_dict)``.

Every published version, read off saev's history (fixtures written by each version's own ``dump``
live in ``tests/fixtures/saev``):

- no ``schema`` (PyPI 0.1.0 and before, 2024-2025-04): cfg keys at top level (``d_vit``,
  ``exp_factor``), ReLU, encode ``relu((x − b_dec) @ W_enc + b_enc)``.
- schema 1 (2025-04 to 2025-07-31): ``cls`` names the activation (``Relu``/``TopK``/``BatchTopK``);
  still subtracts ``b_dec``, except files written by the twelve commits of 2025-07-31 listed in
  :data:`SCHEMA1_WITHOUT_B_DEC` (the header's ``commit`` tells; saev kept schema 1 for them).
- schema 2-5 (2025-07-31 on): ``cfg.activation = {cls, params}``; encode ``act(x @ W_enc + b_enc)``.

Activations: ``Relu`` → SAELens ``standard``; ``TopK`` keeps the k largest values even when negative
→ ``signed_topk`` (this package's class; ``import sae_vision_ext`` registers it); ``BatchTopK`` from
schema 4 on evaluates as a JumpReLU on the stored ``activation.threshold`` (ReLU while it is ≤ 0) →
SAELens ``jumprelu``; older ``BatchTopK`` and ``AbsBatchTopK`` take the top k over the whole flattened
batch, so a token's code depends on the other tokens in its batch: refused. saev normalises inputs as
``(x − mean) / scalar`` outside the SAE and does not store those statistics: apply them yourself.
Decoding is ``f @ W_dec + b_dec`` (Matryoshka SAEs decode the same way with all prefixes).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from ..io import torch_load
from .base import ConverterOutput, base_cfg, finish, register_format
from .weights import find_weights

SCHEMA1_WITHOUT_B_DEC = (
    "65c5a2b55e11c380d1b0ae537524977b240b346d", "f5d892c65a1b2cec1603651f820b884c13656a93",
    "8aecac1833f6412b9f6262b28b90248da6d49d26", "ea2c9f59a17924f1a66b60a03fecbad66fbe9848",
    "5fee417720e4c3cacca1ad2d8177c1455877838a", "6845bc22bdfe38d2a3e1b401b067ba8fa1a555be",
    "9f39cf867fc2bcf75bdbb04dfb6f2ffa1531e932", "5056de48451e471a2978972abcf2196b291da32c",
    "795479bf1f82bb1c16f7e3bbb06ff71e35730e24", "fad99298d1458e372361f3f16693cbd672f9d71a",
    "ab690dc03fe95926b0f9215476db0fca46a06a2b", "e7ca004660a3ab414da7002fcecfc157d5b786aa",
)  # fmt: skip
"""saev commits (2025-07-31) whose ``dump`` wrote schema 1 but whose encode no longer subtracted ``b_dec``."""

_BATCH_GLOBAL = (
    "saev {cls} (schema {schema}) takes the top k over the whole flattened batch, so a token's code depends on the "
    "other tokens in its batch: no per-token SAE equals it. Re-train with TopK, or with BatchTopK from saev schema 4 "
    "on (which evaluates with a fixed threshold)."
)


def _file(path: Path) -> Path:
    return path / "sae.pt" if path.is_dir() else path


def _is_saev(path: Path) -> bool:
    file = _file(path)
    if not file.is_file() or file.suffix != ".pt":
        return False
    with open(file, "rb") as fd:
        return fd.read(1) == b"{"


def subtracts_b_dec(header: dict[str, Any]) -> bool:
    """Whether the saev version that wrote ``header`` encoded ``(x − b_dec) @ W_enc + b_enc``."""
    schema = header.get("schema")
    if schema is None:
        return True
    if schema == 1:
        commit = str(header.get("commit") or "")
        return not (len(commit) >= 7 and any(full.startswith(commit) for full in SCHEMA1_WITHOUT_B_DEC))
    return False


def _activation(header: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    cfg = header.get("cfg", header) if "schema" in header else header
    if header.get("schema") == 1 and header.get("cls") in ("Relu", "TopK", "BatchTopK"):
        return header["cls"], {"top_k": cfg.get("top_k")}
    activation = cfg.get("activation")
    if activation is None:
        return "Relu", {}
    if isinstance(activation, str):
        return activation, {}
    return str(activation.get("cls", "Relu")), dict(activation.get("params") or {})


@register_format("saev", detect=_is_saev, description="saev sae.pt (one JSON header line, then a torch state dict)")
def saev_disk_converter(
    path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None, allow_pickle: bool = False
) -> ConverterOutput:
    """SAELens disk converter for a saev ``sae.pt`` (or a folder holding one), every schema."""
    file = _file(Path(path))
    with open(file, "rb") as fd:
        try:
            header = json.loads(fd.readline())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file} does not start with a saev JSON header line; it is not a saev sae.pt.") from e
        raw = torch_load(io.BytesIO(fd.read()), device, allow_pickle, f"saev checkpoint {file}")
    state = find_weights(raw, f"saev checkpoint {file}")
    schema = header.get("schema")
    cls, params = _activation(header)
    d_in, d_sae = state["W_enc"].shape
    meta = {"saev_schema": schema, "saev_lib": header.get("lib"), "saev_commit": header.get("commit")}
    if cls == "Relu":
        cfg = base_cfg("standard", d_in, d_sae, device, "saev", **meta)
    elif cls == "TopK":
        from ..signed_topk import ensure_registered

        ensure_registered()
        cfg = base_cfg("signed_topk", d_in, d_sae, device, "saev", **meta)
        k = (cfg_overrides or {}).get("k", params.get("top_k"))
        if k is None:  # saev's dump always writes top_k; its default (32) may not be what was trained
            raise ValueError(
                f"{file}: the saev header's TopK activation has no top_k (the number of active latents). Add it to "
                "the header's activation params or pass load_sae(..., cfg_overrides={'k': <k>})."
            )
        cfg.update(k=k, rescale_acts_by_decoder_norm=False)
    elif cls == "BatchTopK" and isinstance(raw, dict) and "activation.threshold" in raw:
        cfg = base_cfg("jumprelu", d_in, d_sae, device, "saev", **meta)
        threshold = raw["activation.threshold"].float().clamp(min=0.0)  # saev: ReLU while the threshold is <= 0
        state["threshold"] = threshold.expand(d_sae).clone()
    elif cls in ("BatchTopK", "AbsBatchTopK"):
        raise ValueError(_BATCH_GLOBAL.format(cls=cls, schema=schema))
    else:
        raise ValueError(f"{file}: unsupported saev activation {cls!r}; supported: Relu, TopK, BatchTopK.")
    cfg["apply_b_dec_to_input"] = subtracts_b_dec(header)
    return finish(cfg, state, device, cfg_overrides)
