"""Loading SAEs: SAELens folders, the other projects' checkpoints, known public releases, embedded ones.

``load_sae(ref)`` accepts a local path (its format detected among :data:`~.formats.FORMATS`),
``sve:<model>/<hook>`` (shipped with the package), a registered release name (``sae-vision saes``
lists them), ``rrm:<path>`` (the seed paper's folders: one SAE or the per-layer list) or
``<format>:<org/repo>[/<folder>]`` on the Hugging Face Hub for any registered format
(``saelens:``, ``prisma:``, ``saev:``, ``sparsify:``, ``dictionary_learning:``, ...). The converters are
SAELens converters, so plain SAELens works too::

    SAE.load_from_disk(path, converter=prisma_disk_converter)
    SAE.from_pretrained("Prisma-Multimodal/sae-top_k-64-cls_only-layer_9-hook_resid_post", "",
                        converter=prisma_hf_converter)

Each format's module (``saes/formats/<name>.py``) states what it reads and what it refuses.
Tensors are always loaded with ``torch.load(weights_only=True)`` or safetensors; a file that needs
arbitrary unpickling raises ``ValueError`` unless ``allow_pickle=True`` is passed explicitly, and a
corrupt or truncated file raises ``ValueError`` saying so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from .._hooks import resid_post
from .._registry import Registry
from .formats import FORMATS, detect_format
from .formats.base import ConverterOutput
from .formats.dictionary_learning import dictionary_learning_disk_converter
from .formats.overcomplete import overcomplete_disk_converter
from .formats.prisma import prisma_disk_converter
from .formats.saelens import saelens_disk_converter
from .formats.saev import saev_disk_converter
from .formats.sparsify import sparsify_disk_converter
from .rrm_checkpoints import RRM_MODELS

if TYPE_CHECKING:
    from collections.abc import Callable

    from sae_lens import SAE

    from .clt import CrossLayerTranscoder

__all__ = [
    "RELEASES",
    "SAERelease",
    "detect_format",
    "dictionary_learning_disk_converter",
    "hub_converter",
    "load_sae",
    "overcomplete_disk_converter",
    "prisma_disk_converter",
    "prisma_hf_converter",
    "saev_disk_converter",
    "saev_hf_converter",
    "sparsify_disk_converter",
]

Format = Literal[
    "saelens", "prisma", "saev", "rrm", "sparsify", "dictionary_learning", "overcomplete", "circuit_tracer_clt"
]


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
        SAERelease(
            "prisma",
            f"Prisma-Multimodal/sae-top_k-64-cls_only-layer_{_layer}-hook_resid_post",
            _PRISMA_CLIP,
            resid_post(_layer),
            f"ViT-Prisma TopK-64 x64 SAE, CLS token, layer {_layer}",
        )
    )
RELEASES.register("saev-clip-b16-in1k")(
    SAERelease(
        "saev",
        "osunlp/SAE_CLIP_24K_ViT-B-16_IN1K",
        "open_clip:ViT-B-16/openai",
        None,
        "saev ReLU SAE (24K features) on OpenAI CLIP ViT-B/16, ImageNet-1K activations",
    )
)
RELEASES.register("saev-dinov2-b14-in1k")(
    SAERelease(
        "saev",
        "osunlp/SAE_DINOv2_24K_ViT-B-14_IN1K",
        "hf:facebook/dinov2-base",
        None,
        "saev ReLU SAE (24K features) on DINOv2 ViT-B/14, ImageNet-1K activations",
    )
)
RELEASES.register("saev-bioclip-b16-inat21")(
    SAERelease(
        "saev",
        "osunlp/SAE_BioCLIP_24K_ViT-B-16_iNat21",
        "open_clip:hf-hub:imageomics/bioclip",
        None,
        "saev ReLU SAE (24K features) on BioCLIP ViT-B/16, iNat21 activations",
    )
)

for _kind, _model in (
    ("vit-base-patch16-224", "vit"),
    ("dinov2-vitb14-reg-lc", "dinov2"),
    ("clip-vit-base-patch16", "clip_vit"),
):
    RELEASES.register(f"rrm-{_model.replace('_', '-')}")(
        SAERelease(
            "rrm",
            f"timespt/topksae-{_kind}",
            RRM_MODELS[_model],
            None,
            f"The seed paper's (Kim et al. 2025) TopK SAEs on blocks 0-10 of {_model}: load_sae gives the list",
        )
    )


def _download(repo_id: str, folder: str | None, force_download: bool = False) -> Path:
    """A local snapshot of ``repo_id`` (only ``folder`` when given); ``ValueError`` when offline."""
    import huggingface_hub

    try:
        root = huggingface_hub.snapshot_download(
            repo_id, allow_patterns=f"{folder.strip('/')}/*" if folder else None, force_download=force_download
        )
    except Exception as e:
        raise ValueError(
            f"Could not fetch {repo_id}{'/' + folder if folder else ''} from the Hugging Face Hub "
            f"({type(e).__name__}: {e}). Are you offline? Download it elsewhere and pass the local path."
        ) from e
    return Path(root) / folder if folder else Path(root)


def hub_converter(format_name: str, allow_pickle: bool = False) -> Callable[..., ConverterOutput]:
    """A SAELens Hub converter (``SAE.from_pretrained(repo_id, folder, converter=...)``) for a registered
    format: downloads ``folder`` of the repo and runs the format's disk converter on it."""
    fmt = FORMATS.get(format_name)

    def convert(
        repo_id: str,
        folder_name: str,
        device: str = "cpu",
        force_download: bool = False,
        cfg_overrides: dict[str, Any] | None = None,
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor], None]:
        local = _download(repo_id, folder_name or None, force_download)
        return (*fmt.convert(local, device, cfg_overrides, allow_pickle=allow_pickle), None)

    convert.__name__ = f"{format_name}_hf_converter"
    return convert


prisma_hf_converter = hub_converter("prisma")
"""SAELens Hub converter for ViT-Prisma repos (files needing unpickling are refused)."""
saev_hf_converter = hub_converter("saev")
"""SAELens Hub converter for saev repos (``folder_name``: the folder holding ``sae.pt``, default root)."""


def _disk_converter(
    format_name: str, allow_pickle: bool, overrides: dict[str, Any] | None, epoch: int | None = None
) -> Any:
    fmt = FORMATS.get(format_name)
    extra: dict[str, Any] = {"allow_pickle": allow_pickle}
    if epoch is not None:
        if format_name != "rrm":
            raise ValueError(
                f"epoch={epoch} only applies to RRM checkpoints; this path is in the {format_name} format."
            )
        extra["epoch"] = epoch

    def convert(path: str | Path, device: str = "cpu", cfg_overrides: dict[str, Any] | None = None) -> ConverterOutput:
        return fmt.convert(path, device, {**(overrides or {}), **(cfg_overrides or {})}, **extra)

    return convert


def load_sae(
    ref: str | Path,
    device: str = "cpu",
    hook_name: str | None = None,
    allow_pickle: bool = False,
    format: str | None = None,
    *,
    cfg_overrides: dict[str, Any] | None = None,
    epoch: int | None = None,
) -> SAE | list[SAE] | CrossLayerTranscoder:
    """Load an SAE as a ``sae_lens.SAE`` from a path, a ``<prefix>:`` reference or a release name.

    ``rrm:<path>`` and the ``rrm-*`` releases give the per-layer list for a model or ``K<k>_R<R>``
    folder (ready for ``ResidualReplacementModel``); ``sve:<model>/transcoders`` the embedded per-layer
    transcoders; a cross-layer transcoder folder (circuit-tracer's layout) or ``sve:<model>/clt`` a
    :class:`~.clt.CrossLayerTranscoder`; everything else gives one SAE.
    ``hook_name`` sets (or overrides) ``cfg.metadata.hook_name`` (saev files do not record it).
    ``allow_pickle`` opts in to full unpickling for files that need it. ``format`` skips detection
    (one of :data:`FORMATS`); ``cfg_overrides`` reach the converter (``overcomplete`` needs
    ``{"architecture": "topk", "k": ...}``). ``epoch`` picks an RRM checkpoint's ``epoch<N>.pth``: for
    ``rrm:`` references and the ``rrm-*`` releases the default is the authors' 50, for an RRM folder
    given as a plain path the largest present.

    Every config is checked before SAELens builds the SAE (``saes/checks.py``; docs/saes.md, "What
    load_sae checks"): a missing or invalid ``architecture``, ``d_in``, ``d_sae`` or ``k``, shapes that do
    not match the weights, unreadable JSON, truncated weights or a failed checksum raise ``ValueError``.
    """
    from sae_lens import SAE

    ref_s = str(ref)
    prefix, sep, rest = ref_s.partition(":")
    if ref_s in RELEASES:
        return _load_release(RELEASES.get(ref_s), device, hook_name, allow_pickle, epoch)
    if epoch is not None and sep and prefix != "rrm" and not Path(ref_s).exists():
        raise ValueError(
            f"epoch={epoch} only applies to RRM checkpoints ('rrm:' references, RRM folders); got {ref_s!r}."
        )
    if sep and prefix == "sve":
        sae = _load_embedded(ref_s, rest, device)
        if not hasattr(sae, "cfg") or not hasattr(sae.cfg, "metadata"):  # a list of transcoders, a CLT
            return sae
    elif sep and prefix == "rrm":
        from .rrm_checkpoints import load_rrm

        return load_rrm(rest, device=device, epoch=epoch)
    elif sep and prefix in FORMATS and not Path(ref_s).exists():
        repo, sub = _split_repo(rest)
        if prefix == "saelens":
            sae = SAE.from_pretrained(repo, sub, device=device)
        else:
            sae = SAE.from_pretrained(repo, sub, device=device, converter=hub_converter(prefix, allow_pickle))
    else:
        path = Path(ref_s)
        if not path.exists():
            raise ValueError(
                f"SAE reference {ref_s!r} is not a path, a known release ({', '.join(RELEASES.names()[:3])}, ...), "
                f"or a '<prefix>:' reference; prefixes: sve, rrm, {', '.join(FORMATS.names())}."
            )
        fmt = FORMATS.get(format).name if format else detect_format(path)
        if FORMATS.get(fmt).load is not None:  # not one SAELens SAE (a cross-layer transcoder)
            return FORMATS.get(fmt).load(path, device=device)
        converter = _disk_converter(fmt, allow_pickle, cfg_overrides, epoch)
        sae = SAE.load_from_disk(path, device=device, converter=converter)
    if hook_name is not None:
        sae.cfg.metadata.hook_name = hook_name
    return sae


def _load_release(
    rel: SAERelease, device: str, hook_name: str | None, allow_pickle: bool, epoch: int | None
) -> SAE | list[SAE]:
    from sae_lens import SAE

    if rel.format == "rrm":
        from .rrm_checkpoints import load_rrm

        saes = load_rrm(_download(rel.repo_id, None), device=device, epoch=epoch)
        for one in saes:
            one.cfg.metadata.model_name = one.cfg.metadata.model_name or rel.model
        return saes
    if epoch is not None:
        raise ValueError(f"epoch={epoch} only applies to RRM checkpoints; release {rel.repo_id!r} is {rel.format}.")
    sae = SAE.from_pretrained(rel.repo_id, "", device=device, converter=hub_converter(rel.format, allow_pickle))
    sae.cfg.metadata.hook_name = hook_name or rel.hook_name or sae.cfg.metadata.hook_name
    sae.cfg.metadata.model_name = sae.cfg.metadata.model_name or rel.model
    return sae


def _load_embedded(ref: str, rest: str, device: str) -> SAE | list[SAE] | CrossLayerTranscoder:
    from sae_lens import SAE

    from ..models.embedded import checkpoint_dir
    from .clt import is_clt_folder, load_clt

    model, _, hook = rest.partition("/")
    folder = checkpoint_dir() / "saes" / model / hook
    if is_clt_folder(folder):  # sve:<model>/clt, shipped as float16
        return load_clt(folder, device=device, dtype="float32")
    layers = sorted(folder.glob("blocks.*/cfg.json"), key=lambda p: int(p.parent.name.split(".")[1]))
    if not (folder / "cfg.json").exists() and layers:  # sve:<model>/transcoders: one per layer, in order
        return [_load_embedded(ref, f"{rest}/{p.parent.name}", device) for p in layers]  # type: ignore[misc]
    if not (folder / "cfg.json").exists():
        raise ValueError(f"No embedded SAE {ref!r} (looked in {folder}). `sae-vision saes` lists them.")
    # shipped as float16; the SAELens converter checks the config and the weights' checksum
    return SAE.load_from_disk(folder, device=device, dtype="float32", converter=saelens_disk_converter)


def _split_repo(rest: str) -> tuple[str, str]:
    parts = rest.split("/")
    if len(parts) < 2:
        raise ValueError(f"Expected '<org>/<repo>[/<folder>]', got {rest!r}.")
    return "/".join(parts[:2]), "/".join(parts[2:])
