"""``benchmark_sae``: ViSAEBench's metrics (``visaebench`` 0.1.0, the ``[bench]`` extra) on any hooked
ViT and SAELens SAE, through adapters to its two interfaces.

ViSAEBench scores an SAE on a backbone's patch tokens with seven metrics (M1-M7). Its own metric
classes (``visaebench.metrics.METRIC_REGISTRY``) run here, unchanged, each through its public
``Metric.compute``; this module only supplies what they read:

- :class:`VisaeBenchSAE` satisfies ``visaebench.SAEInterface`` (``encode``/``decode`` of
  ``[batch, d_in]``) with the SAELens SAE's own ``encode``/``decode``;
- :class:`VisaeBenchBackbone` satisfies ``visaebench.BackboneInterface``
  (``extract_activations(images, *, layer)`` -> patch tokens ``[B, P, d]``) with a ``HookedViT``'s
  ``blocks.{layer}.hook_resid_post``, prefix tokens (CLS, registers) dropped as ViSAEBench's
  backbones drop CLS;
- the activations: the SAE's hook on ``pixels``, patch tokens only (``[n, P, d]``, ``P`` = the
  model's patch grid, row-major as M1 needs), with no extra normalisation (``mean``/``std`` left
  ``None``: a SAELens SAE normalises its input itself).

Not ``MetricRunner.run``: it prints failures and drops the metric, and its M5 loads a Hub backbone
by name (DINOv2 or CLIP), so no local evaluator can be given. The dispatch here passes the same
arguments its ``_run_one`` passes. A metric whose input is missing is *skipped with the reason*,
never given a number:

| metric | needs | offline here |
|---|---|---|
| ``localization`` (M1) | patch grid | yes |
| ``fvu`` (M2) | activations | yes |
| ``downstream_preservation`` (M3), ``sparse_probing`` (M4) | ``labels`` (one class per image) | with labels |
| ``monosemanticity`` (M5) | a second backbone (``evaluator``, a different model) | with ``evaluator`` |
| ``cross_domain`` (M6) | out-of-domain image sets (``ood``) | with ``ood`` |
| ``absorption`` (M7) | a class hierarchy (``sibling_groups``; ViSAEBench's is ImageNet's WordNet) | with groups |

Warnings ViSAEBench raises (sklearn convergence, small classes) are recorded in each row's
``warnings``, never printed.
"""

from __future__ import annotations

import importlib
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from .._hooks import resid_post

if TYPE_CHECKING:
    from sae_lens import SAE

    from ..models.hooked_vit import HookedViT

METRICS: tuple[str, ...] = (
    "localization",
    "fvu",
    "downstream_preservation",
    "sparse_probing",
    "monosemanticity",
    "cross_domain",
    "absorption",
)
"""ViSAEBench's registry keys, in its M1-M7 order."""

INSTALL_HINT = "pip install 'sae_vision_ext[bench]' (or: pip install --no-deps visaebench==0.1.0 scikit-learn)"


def import_visaebench() -> Any:
    """``visaebench``, imported on first use; an ``ImportError`` naming the extra when it is missing."""
    try:
        return importlib.import_module("visaebench")
    except ImportError as e:
        raise ImportError(f"benchmark_sae needs ViSAEBench ({e}); {INSTALL_HINT}.") from e


class VisaeBenchSAE:
    """A SAELens SAE as ViSAEBench's ``SAEInterface``: ``encode``/``decode`` of ``[batch, d_in]``,
    without gradients, on the SAE's device and dtype (the codes and reconstructions come back float32).

    ViSAEBench calls ``decode(encode(batch))`` on one batch at a time, which keeps SAELens's per-token
    normalisation statistics (``layer_norm``) of the batch just encoded."""

    def __init__(self, sae: SAE) -> None:
        self.sae = sae
        self.d_sae = int(sae.cfg.d_sae)

    @torch.no_grad()
    def encode(self, x: Float[Tensor, "batch d_in"]) -> Float[Tensor, "batch d_sae"]:
        p = next(self.sae.parameters())
        return self.sae.encode(x.to(p.device, p.dtype)).float()

    @torch.no_grad()
    def decode(self, z: Float[Tensor, "batch d_sae"]) -> Float[Tensor, "batch d_in"]:
        p = next(self.sae.parameters())
        return self.sae.decode(z.to(p.device, p.dtype)).float()


class VisaeBenchBackbone:
    """A ``HookedViT`` as ViSAEBench's ``BackboneInterface``: ``extract_activations(images, layer=l)``
    returns the patch tokens of ``blocks.{l}.hook_resid_post`` (``-1``: the last block), ``[B, P, d]``.
    ``images``: a preprocessed batch ``[B, chan, h, w]`` or a sequence of preprocessed images
    ``[chan, h, w]`` (ViSAEBench's M5 and M6 pass lists of what they were given)."""

    def __init__(self, model: HookedViT) -> None:
        self.model = model

    @torch.no_grad()
    def extract_activations(self, images: Any, *, layer: int = -1) -> Float[Tensor, "batch patches d"]:
        pixels = images if isinstance(images, Tensor) else torch.stack([torch.as_tensor(i) for i in images])
        n_layers = self.model.cfg.n_layers
        block = layer if layer >= 0 else n_layers + layer
        if not 0 <= block < n_layers:
            raise ValueError(f"layer={layer} is outside the model's blocks 0..{n_layers - 1} (or -1 for the last).")
        hook = resid_post(block)
        _, cache = self.model.run_with_cache(
            pixels, names_filter=hook, stop_at_layer=block + 1, return_cache_object=False
        )
        return cache[hook][:, self.model.cfg.n_prefix_tokens :].float()


@dataclass
class MetricRow:
    """One ViSAEBench metric of one SAE: its value, or why it was skipped."""

    key: str
    """ViSAEBench's registry key (``METRICS``)."""
    name: str
    """The metric's own ``name`` (e.g. ``sparse_probing_auc``)."""
    dimension: str
    """ViSAEBench's capability dimension."""
    higher_is_better: bool
    value: float | None = None
    """``None`` exactly when skipped."""
    skipped: str | None = None
    """Why the metric did not run (what it needs that was not given)."""
    seconds: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)
    """ViSAEBench's metadata (per-feature lists dropped, see :func:`_small_metadata`)."""
    warnings: list[str] = field(default_factory=list)


@dataclass
class BenchmarkResult:
    """ViSAEBench's metrics of one SAE on one data set (``rows`` in M1-M7 order)."""

    hook_name: str
    model_name: str
    n_images: int
    n_patches: int
    rows: list[MetricRow]

    def row(self, key: str) -> MetricRow:
        """The row of a registry key (``KeyError`` listing the keys)."""
        for r in self.rows:
            if r.key == key:
                return r
        raise KeyError(f"no metric {key!r}; this result has {[r.key for r in self.rows]}")

    def values(self) -> dict[str, float | None]:
        """``{key: value}`` (``None`` for skipped metrics)."""
        return {r.key: r.value for r in self.rows}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every row's fields."""
        from dataclasses import asdict

        return asdict(self)


def _small_metadata(meta: Mapping[str, Any]) -> dict[str, Any]:
    """ViSAEBench's metadata without its long per-feature / per-pair lists (kept: scalars, small dicts)."""
    out: dict[str, Any] = {}
    for key, value in meta.items():
        if isinstance(value, list | tuple | np.ndarray) and len(value) > 16:
            continue
        if isinstance(value, Mapping):
            value = _small_metadata(value)
        out[str(key)] = value.item() if isinstance(value, np.generic) else value
    return out


@torch.no_grad()
def patch_activations(
    model: HookedViT, hook_name: str, pixels: Tensor, batch_size: int = 64
) -> Float[Tensor, "n patches d"]:
    """The patch tokens (prefix tokens dropped) of ``hook_name`` on ``pixels``, float32 on the CPU."""
    layer = int(hook_name.split(".")[1]) if hook_name.startswith("blocks.") else None
    parts = []
    for i in range(0, len(pixels), batch_size):
        _, cache = model.run_with_cache(
            pixels[i : i + batch_size],
            names_filter=hook_name,
            stop_at_layer=None if layer is None else layer + 1,
            return_cache_object=False,
        )
        parts.append(cache[hook_name][:, model.cfg.n_prefix_tokens :].float().cpu())
    return torch.cat(parts)


def _skip_reason(
    key: str,
    labels: np.ndarray | None,
    evaluator: HookedViT | None,
    ood: Mapping[str, Any] | None,
    sibling_groups: Mapping[str, Any] | None,
) -> str | None:
    if key in ("downstream_preservation", "sparse_probing") and labels is None:
        return "needs labels (one class id per image); none given"
    if key == "monosemanticity" and evaluator is None:
        return (
            "needs a second backbone to embed each feature's top images (ViSAEBench pairs CLIP with DINOv2, "
            "downloaded from the Hub); pass evaluator= a different HookedViT"
        )
    if key == "cross_domain" and not ood:
        return (
            "needs out-of-domain image sets (ViSAEBench downloads EuroSAT and DTD); pass ood={name: (pixels, labels)}"
        )
    if key == "absorption":
        if labels is None:
            return "needs labels (one class id per image); none given"
        if not sibling_groups:
            return (
                "needs a class hierarchy (ViSAEBench's is ImageNet's WordNet, which does not apply to other labels); "
                "pass sibling_groups={parent: [class ids]}"
            )
    return None


def _compute(
    key: str,
    metric: Any,
    adapter: VisaeBenchSAE,
    acts: Tensor,
    *,
    common: dict[str, Any],
    inputs: dict[str, Any],
) -> Any:
    """``metric.compute`` with the arguments ViSAEBench's ``MetricRunner._run_one`` passes for ``key``."""
    if key == "fvu":  # flat tokens: on a 3-D tensor its token count would count images
        return metric.compute(adapter, acts.flatten(0, 1), dict_size=adapter.d_sae, **common)
    if key in ("downstream_preservation", "sparse_probing"):
        return metric.compute(adapter, acts, labels=inputs["labels"], **common)
    if key == "monosemanticity":
        return metric.compute(
            adapter,
            acts,
            images=inputs["evaluator_pixels"],
            evaluator_backbone=VisaeBenchBackbone(inputs["evaluator"]),
            evaluator_layer=inputs["evaluator"].cfg.n_layers - 1,
            **common,
        )
    if key == "cross_domain":
        return metric.compute(adapter, acts, ood_datasets=inputs["ood"], **common)
    if key == "absorption":
        return metric.compute(adapter, acts, labels=inputs["labels"], sibling_groups=inputs["sibling_groups"], **common)
    return metric.compute(adapter, acts, **common)


def metric_keys(metrics: str | Sequence[str]) -> list[str]:
    """Registry keys of ``metrics`` (``"all"``, one key or keys); unknown keys raise ``ValueError`` with close names."""
    keys = list(METRICS) if metrics == "all" else [metrics] if isinstance(metrics, str) else list(metrics)
    for key in keys:
        if key not in METRICS:
            from difflib import get_close_matches

            close = get_close_matches(key, METRICS, n=2)
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"metrics: unknown ViSAEBench metric {key!r}; valid: {', '.join(METRICS)}.{hint}")
    return keys


def _as_labels(labels: Tensor | np.ndarray | Sequence[int] | None, n: int, what: str) -> np.ndarray | None:
    if labels is None:
        return None
    from ..data.checks import check_labels

    return check_labels(torch.as_tensor(np.asarray(labels)), n).cpu().numpy().astype(np.int64)


def _ood_entries(
    model: HookedViT, hook: str, ood: Mapping[str, tuple[Tensor, Any]] | None, batch_size: int
) -> dict[str, dict[str, Any]] | None:
    if not ood:
        return None
    entries = {}
    for name, (ood_pixels, ood_labels) in ood.items():
        entries[name] = {
            "activations": patch_activations(model, hook, ood_pixels, batch_size),
            "labels": _as_labels(ood_labels, len(ood_pixels), f"ood[{name!r}]"),
        }
    return entries


def benchmark_sae(
    model: HookedViT,
    sae: SAE,
    pixels: Tensor,
    labels: Tensor | np.ndarray | Sequence[int] | None = None,
    metrics: str | Sequence[str] = "all",
    *,
    evaluator: HookedViT | None = None,
    evaluator_pixels: Tensor | None = None,
    ood: Mapping[str, tuple[Tensor, Any]] | None = None,
    sibling_groups: Mapping[str, Sequence[int]] | None = None,
    seed: int = 42,
    batch_size: int = 64,
    metric_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> BenchmarkResult:
    """ViSAEBench's metrics of ``sae`` (at its hook of ``model``) on ``pixels`` (preprocessed
    ``[n, chan, h, w]``) with ``labels`` (one class id per image), run by ViSAEBench's own code.

    ``metrics``: ``"all"`` or registry keys (``METRICS``). ``evaluator``: the second backbone of M5
    (a different ``HookedViT``; its last block embeds the images, ``evaluator_pixels`` if its
    preprocessing differs, else ``pixels``). ``ood``: M6's out-of-domain sets ``{name: (pixels,
    labels)}`` (encoded at the same hook). ``sibling_groups``: M7's hierarchy ``{parent: [class
    ids]}``. ``metric_options``: constructor arguments per metric key (e.g. ``{"localization":
    {"min_images_per_feature": 20}}``). Missing inputs skip a metric with the reason (module docstring).
    """
    vb = import_visaebench()
    from ..models.ids import same_model

    hook = model.check_sae(sae)
    keys = metric_keys(metrics)
    if len(pixels) == 0:
        raise ValueError("benchmark_sae got 0 images; pass preprocessed images [n, chan, h, w].")
    label_arr = _as_labels(labels, len(pixels), "labels")
    if evaluator is not None and same_model(evaluator.cfg.model_name, model.cfg.model_name):
        raise ValueError(
            f"evaluator={evaluator.cfg.model_name!r} is the benchmarked model ({model.cfg.model_name!r}); "
            "M5 needs a different backbone (ViSAEBench: 'must differ ... to avoid circularity')."
        )
    groups = {
        str(k): {"class_indices": [int(c) for c in v], "hierarchy_depth": 1} for k, v in (sibling_groups or {}).items()
    }
    acts = patch_activations(model, hook, pixels, batch_size)
    adapter = VisaeBenchSAE(sae)
    device = str(next(sae.parameters()).device)
    common = {"device": device, "mean": None, "std": None, "seed": seed}
    inputs = {
        "labels": label_arr,
        "evaluator": evaluator,
        "evaluator_pixels": pixels if evaluator_pixels is None else evaluator_pixels,
        "ood": _ood_entries(model, hook, ood, batch_size),
        "sibling_groups": groups,
    }
    rows = []
    for key in keys:
        cls = vb.METRIC_REGISTRY[key]
        row = MetricRow(key, cls.name, cls.dimension, bool(cls.higher_is_better))
        row.skipped = _skip_reason(key, label_arr, evaluator, ood, groups)
        if row.skipped is None:
            options = dict((metric_options or {}).get(key, {}))
            if key == "localization":
                options.setdefault("grid_size", tuple(model.cfg.grid_size))
            start = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = _compute(key, cls(**options), adapter, acts, common=common, inputs=inputs)
            row.seconds = time.perf_counter() - start
            row.value = float(result.value)
            row.metadata = _small_metadata(result.metadata)
            row.warnings = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
        rows.append(row)
    return BenchmarkResult(hook, str(model.cfg.model_name), len(pixels), int(acts.shape[1]), rows)
