"""Loading SAEs: SAELens folders, ViT-Prisma and saev checkpoints, known public releases, embedded ones.

``load_sae(ref)`` accepts a local path (format detected), ``sve:<model>/<hook>`` (shipped with the
package), a registered release name (``sae-vision saes`` lists them), or ``prisma:<org/repo>``,
``saev:<org/repo>[/<file>]``, ``saelens:<org/repo>/<folder>`` on the Hugging Face Hub.
The converters are SAELens converters, so plain SAELens works too::

    SAE.load_from_disk(path, converter=prisma_disk_converter)
    SAE.from_pretrained("Prisma-Multimodal/sae-top_k-64-cls_only-layer_9-hook_resid_post", "",
                        converter=prisma_hf_converter)

Format facts (checked against each project's public code):

- ViT-Prisma: ``config.json`` (its ``VisionModelSAERunnerConfig``) beside a torch file
  (``weights.pt`` or ``n_images_*.pt``) holding ``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec``,
  ``b_dec`` (optionally under ``state_dict``). Encoding subtracts ``b_dec``; ``layer_norm``
  normalisation standardises each token and is undone after decoding (SAELens's ``layer_norm`` is
  the same formula). ``activation_fn_str`` ``topk`` (``activation_fn_kwargs.k``) or ``relu``.
- saev: ``sae.pt`` = one JSON header line (``schema`` 2: ``cfg`` with ``d_vit``, ``exp_factor``,
  ``activation {cls: Relu|TopK|BatchTopK, params: {top_k}}``; older files: cfg keys at top level)
  then ``torch.save(state_dict)``. Encoding is ``act(x @ W_enc + b_enc)`` with no ``b_dec``
  subtraction; its TopK keeps negative values (mapped to ``signed_topk``).

Tensors are always loaded with ``torch.load(weights_only=True)``; a file that needs arbitrary
unpickling raises ``ValueError`` unless ``allow_pickle=True`` is passed explicitly.
"""

from __future__ import annotations

import functools
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .._registry import Registry
from .io import sae_lens_version, torch_load
from .rrm_checkpoints import RRM_MODELS

Format = Literal["saelens", "prisma", "saev", "rrm"]
_WEIGHT_KEYS = ("W_enc", "b_enc", "W_dec", "b_dec")


@dataclass(frozen=True)
class SAERelease:
    """A public SAE checkpoint this package knows how to fetch and convert."""

    format: Format
    repo_id: str
    model: str
    """Model id the SAE was trained on (for ``HookedViT.from_pretrained``)."""
    hook_name: str | None
    """Hook it reads; ``None`` when the checkpoint does not record it (pass ``hook_name=``)."""
    description: str


RELEASES: Registry[SAERelease] = Registry("SAE release")
_PRISMA_CLIP = "open_clip:hf-hub:laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K"
for _layer in range(12):
    RELEASES.register(f"prisma-clip-b32-topk64-cls-layer{_layer}-resid_post")(
        SAERelease("prisma", f"Prisma-Multimodal/sae-top_k-64-cls_only-layer_{_layer}-hook_resid_post", _PRISMA_CLIP,
                   f"blocks.{_layer}.hook_resid_post", f"ViT-Prisma TopK-64 x64 SAE, CLS token, layer {_layer}")
    )  # fmt: skip
RELEASES.register("saev-clip-b16-in1k")(
    SAERelease("saev", "osunlp/SAE_CLIP_24K_ViT-B-16_IN1K", "open_clip:ViT-B-16/openai", None,
               "saev ReLU SAE (24K features) on OpenAI CLIP ViT-B/16, ImageNet-1K activations")
)  # fmt: skip
RELEASES.register("saev-dinov2-b14-in1k")(
    SAERelease("saev", "osunlp/SAE_DINOv2_24K_ViT-B-14_IN1K", "hf:facebook/dinov2-base", None,
               "saev ReLU SAE (24K features) on DINOv2 ViT-B/14, ImageNet-1K activations")
)  # fmt: skip
RELEASES.register("saev-bioclip-b16-inat21")(
    SAERelease("saev", "osunlp/SAE_BioCLIP_24K_ViT-B-16_iNat21", "open_clip:hf-hub:imageomics/bioclip", None,
               "saev ReLU SAE (24K features) on BioCLIP ViT-B/16, iNat21 activations")
)  # fmt: skip

for _kind, _model in (
    ("vit-base-patch16-224", "vit"),
    ("dinov2-vitb14-reg-lc", "dinov2"),
    ("clip-vit-base-patch16", "clip_vit"),
):
    RELEASES.register(f"rrm-{_model.replace('_', '-')}")(
        SAERelease("rrm", f"timespt/topksae-{_kind}", RRM_MODELS[_model], None,
                   f"The seed paper's (Kim et al. 2025) TopK SAEs on blocks 0-10 of {_model}: load_sae gives the list")
    )  # fmt: skip


def _find_weights(obj: Any) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and all(k in obj for k in _WEIGHT_KEYS):
        return {k: obj[k] for k in _WEIGHT_KEYS}
    if isinstance(obj, dict):
        for key in ("state_dict", "autoencoder", "model"):
            if key in obj:
                return _find_weights(obj[key])
        suffixed = {k.rsplit(".", 1)[-1]: v for k, v in obj.items() if k.rsplit(".", 1)[-1] in _WEIGHT_KEYS}
        if len(suffixed) == 4:
            return suffixed
    raise ValueError(f"No SAE weights ({', '.join(_WEIGHT_KEYS)}) found in the checkpoint.")


def _prisma_files(path: Path) -> tuple[Path, Path]:
    folder = path if path.is_dir() else path.parent
    cfg = folder / "config.json"
    if path.is_file() and path.suffix == ".pt":
        weights = path
    else:
        # VisionSAETrainer.checkpoint() writes n_images_<N>.pt beside n_images_<N>_log_feature_sparsity.pt:
        # the newest checkpoint is the largest N (numerically: 999 < 1300000), never a sparsity file
        numbered = [
            (int(m.group(1)), p)
            for p in folder.glob("n_images_*.pt")
            if (m := re.fullmatch(r"n_images_(\d+)\.pt", p.name))
        ]
        others = sorted(p for p in folder.glob("*.pt") if "sparsity" not in p.name)
        if (folder / "weights.pt").exists():
            weights = folder / "weights.pt"
        elif numbered:
            weights = max(numbered)[1]
        elif others:
            weights = others[-1]
        else:
            raise ValueError(f"No ViT-Prisma weights (weights.pt, n_images_<N>.pt) in {folder}.")
    if not cfg.exists():
        raise ValueError(f"No ViT-Prisma config.json beside {weights}.")
    return cfg, weights


def prisma_disk_converter(
    path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None, allow_pickle: bool = False
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """SAELens disk converter for a ViT-Prisma checkpoint folder (or its ``.pt`` file)."""
    cfg_path, weights_path = _prisma_files(Path(path))
    pc = json.loads(cfg_path.read_text())
    state = _find_weights(torch_load(weights_path, device, allow_pickle, f"ViT-Prisma weights {weights_path}"))
    d_in, d_sae = state["W_enc"].shape
    act = str(pc.get("activation_fn_str", "relu")).lower()
    k = (pc.get("activation_fn_kwargs") or {}).get("k")
    norm = pc.get("normalize_activations") or "none"
    norm = {"none": "none", "layer_norm": "layer_norm", "constant_norm_rescale": "constant_norm_rescale"}.get(norm)
    if norm is None:
        raise ValueError(f"Unsupported ViT-Prisma normalize_activations {pc.get('normalize_activations')!r}.")
    layer, subtype = pc.get("hook_point_layer"), pc.get("layer_subtype", "hook_resid_post")
    if isinstance(layer, list):
        layer = layer[0]
    selection = "cls" if pc.get("cls_token_only") else "patches" if pc.get("use_patches_only") else "all"
    cfg: dict[str, Any] = {
        "architecture": "topk" if act == "topk" else "standard",
        "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": device,
        "apply_b_dec_to_input": True, "normalize_activations": norm,
        "metadata": {
            "model_name": pc.get("model_name"), "hook_name": None if layer is None else f"blocks.{layer}.{subtype}",
            "token_selection": selection, "context_size": pc.get("context_size"), "source_format": "vit_prisma",
            "sae_lens_version": sae_lens_version(),
        },
    }  # fmt: skip
    if act == "topk":
        if k is None:
            raise ValueError("ViT-Prisma config has activation_fn_str 'topk' but no activation_fn_kwargs.k.")
        cfg.update(k=int(k), rescale_acts_by_decoder_norm=False)
    elif act != "relu":
        raise ValueError(f"Unsupported ViT-Prisma activation_fn_str {act!r}; supported: relu, topk.")
    cfg.update(cfg_overrides or {})
    return cfg, {k: v.to(device=device, dtype=torch.float32).contiguous() for k, v in state.items()}


def _saev_file(path: Path) -> Path:
    return path / "sae.pt" if path.is_dir() else path


def saev_disk_converter(
    path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None, allow_pickle: bool = False
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """SAELens disk converter for a saev ``sae.pt`` (or a folder holding one)."""
    from .signed_topk import ensure_registered

    file = _saev_file(Path(path))
    with open(file, "rb") as fd:
        try:
            header = json.loads(fd.readline())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} does not start with a saev JSON header line.") from e
        state = _find_weights(torch_load(io.BytesIO(fd.read()), device, allow_pickle, f"saev checkpoint {file}"))
    cfg_src = header.get("cfg", header) if "schema" in header else header
    activation = cfg_src.get("activation") or {"cls": header.get("cls", "Relu"), "params": {}}
    if isinstance(activation, str):
        activation = {"cls": activation, "params": {}}
    cls_name = activation.get("cls", "Relu")
    top_k = (activation.get("params") or {}).get("top_k", cfg_src.get("top_k", 32))
    d_in, d_sae = state["W_enc"].shape
    cfg: dict[str, Any] = {
        "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": device,
        "apply_b_dec_to_input": False, "normalize_activations": "none",
        "metadata": {"hook_name": None, "model_name": None, "source_format": "saev",
                     "saev_schema": header.get("schema"), "saev_lib": header.get("lib"),
                     "sae_lens_version": sae_lens_version()},
    }  # fmt: skip
    if cls_name in ("TopK", "BatchTopK"):
        ensure_registered()
        cfg.update(architecture="signed_topk", k=int(top_k), rescale_acts_by_decoder_norm=False)
    elif cls_name == "Relu":
        cfg["architecture"] = "standard"
    else:
        raise ValueError(f"Unsupported saev activation {cls_name!r}; supported: Relu, TopK, BatchTopK.")
    cfg.update(cfg_overrides or {})
    return cfg, {k: v.to(device=device, dtype=torch.float32).contiguous() for k, v in state.items()}


def _download(repo_id: str, filename: str | None, force_download: bool = False) -> Path:
    import huggingface_hub

    try:
        if filename is None:
            return Path(huggingface_hub.snapshot_download(repo_id, force_download=force_download))
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, force_download=force_download))
    except Exception as e:
        raise ValueError(
            f"Could not fetch {repo_id}{'/' + filename if filename else ''} from the Hugging Face Hub "
            f"({type(e).__name__}: {e}). Are you offline? Download it elsewhere and pass the local path."
        ) from e


def prisma_hf_converter(
    repo_id: str,
    folder_name: str,
    device: str,
    force_download: bool = False,
    cfg_overrides: dict | None = None,
    allow_pickle: bool = False,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], None]:
    """SAELens Hub converter (``SAE.from_pretrained(repo_id, folder, converter=...)``) for ViT-Prisma."""
    root = _download(repo_id, None, force_download)
    folder = root / folder_name if folder_name else root
    return (*prisma_disk_converter(folder, device, cfg_overrides, allow_pickle=allow_pickle), None)


def saev_hf_converter(
    repo_id: str,
    folder_name: str,
    device: str,
    force_download: bool = False,
    cfg_overrides: dict | None = None,
    allow_pickle: bool = False,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], None]:
    """SAELens Hub converter for saev (``folder_name``: path of ``sae.pt`` in the repo, default root)."""
    file = _download(repo_id, f"{folder_name.rstrip('/')}/sae.pt" if folder_name else "sae.pt", force_download)
    return (*saev_disk_converter(file, device, cfg_overrides, allow_pickle=allow_pickle), None)


def detect_format(path: str | Path) -> Format:
    """``saelens`` (cfg.json + sae_weights.safetensors), ``prisma`` (config.json + .pt) or ``saev``."""
    p = Path(path)
    if p.is_dir() and (p / "cfg.json").exists() and (p / "sae_weights.safetensors").exists():
        return "saelens"
    if (p.is_dir() and (p / "sae.pt").exists()) or (p.is_file() and p.name.endswith(".pt") and _has_json_line(p)):
        return "saev"
    folder = p if p.is_dir() else p.parent
    if (folder / "config.json").exists() and (p.suffix == ".pt" or any(folder.glob("*.pt"))):
        return "prisma"
    raise ValueError(
        f"Cannot tell the SAE format of {p}. Expected a SAELens folder (cfg.json + sae_weights.safetensors), "
        "a ViT-Prisma folder (config.json + weights.pt / n_images_*.pt) or a saev sae.pt."
    )


def _has_json_line(file: Path) -> bool:
    with open(file, "rb") as fd:
        return fd.read(1) == b"{"


def load_sae(ref: str | Path, device: str = "cpu", hook_name: str | None = None, allow_pickle: bool = False) -> Any:
    """Load an SAE as a ``sae_lens.SAE`` from a path, ``sve:``/``prisma:``/``saev:``/``saelens:`` ref or release.

    ``rrm:<path>`` reads the seed paper's checkpoints (``saes/rrm_checkpoints.py``): one SAE for an
    ``epoch<N>.pth`` or ``L<layer>`` folder, the per-layer list for a model or ``K<k>_R<R>`` folder.

    ``hook_name`` sets (or overrides) ``cfg.metadata.hook_name``, needed for saev checkpoints
    before splicing. ``allow_pickle`` opts in to full unpickling for files that need it.
    """
    from sae_lens import SAE

    ref_s = str(ref)
    prefix, sep, rest = ref_s.partition(":")
    if ref_s in RELEASES and RELEASES.get(ref_s).format == "rrm":
        from .rrm_checkpoints import load_rrm

        saes = load_rrm(_download(RELEASES.get(ref_s).repo_id, None), device=device)
        for sae in saes:
            sae.cfg.metadata.model_name = sae.cfg.metadata.model_name or RELEASES.get(ref_s).model
        return saes
    if ref_s in RELEASES:
        rel = RELEASES.get(ref_s)
        loader = prisma_hf_converter if rel.format == "prisma" else saev_hf_converter
        loader = functools.partial(loader, allow_pickle=allow_pickle)
        sae = SAE.from_pretrained(rel.repo_id, "", device=device, converter=loader)
        hook_name = hook_name or rel.hook_name
        sae.cfg.metadata.model_name = sae.cfg.metadata.model_name or rel.model
    elif sep and prefix == "sve":
        from ..models.embedded import checkpoint_dir

        model, _, hook = rest.partition("/")
        folder = checkpoint_dir() / "saes" / model / hook
        if not (folder / "cfg.json").exists():
            raise ValueError(f"No embedded SAE {ref_s!r} (looked in {folder}). `sae-vision saes` lists them.")
        sae = SAE.load_from_disk(folder, device=device, dtype="float32")  # shipped as float16
    elif sep and prefix == "rrm":
        from .rrm_checkpoints import load_rrm

        return load_rrm(rest, device=device)
    elif sep and prefix in ("prisma", "saev", "saelens") and not Path(ref_s).exists():
        repo, sub = _split_repo(rest)
        if prefix == "saelens":
            sae = SAE.from_pretrained(repo, sub, device=device)
        else:
            loader = prisma_hf_converter if prefix == "prisma" else saev_hf_converter
            sae = SAE.from_pretrained(
                repo, sub, device=device, converter=functools.partial(loader, allow_pickle=allow_pickle)
            )
    else:
        path = Path(ref_s)
        if not path.exists():
            raise ValueError(
                f"SAE reference {ref_s!r} is not a path, a known release ({', '.join(RELEASES.names()[:3])}, ...), "
                "or a 'sve:', 'prisma:', 'saev:', 'saelens:' reference."
            )
        fmt = detect_format(path)
        if fmt == "saelens":
            from .signed_topk import ensure_registered

            ensure_registered()  # a folder this package saved may name its signed_topk class
            sae = SAE.load_from_disk(path, device=device)
        else:
            conv = prisma_disk_converter if fmt == "prisma" else saev_disk_converter
            sae = SAE.load_from_disk(path, device=device, converter=functools.partial(conv, allow_pickle=allow_pickle))
    if hook_name is not None:
        sae.cfg.metadata.hook_name = hook_name
    return sae


def _split_repo(rest: str) -> tuple[str, str]:
    parts = rest.split("/")
    if len(parts) < 2:
        raise ValueError(f"Expected '<org>/<repo>[/<folder>]', got {rest!r}.")
    return "/".join(parts[:2]), "/".join(parts[2:])
