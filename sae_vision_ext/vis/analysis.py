"""``analyse_features``: every feature of every SAE scored against labelled attributes, in one
streaming pass, with feature types and one-line labels (the seed paper's feature analysis, measured
instead of annotated).

An :class:`Attribute` labels every image (``level="image"``: ``values [n]``) or every patch
(``level="patch"``: ``values [n, n_patches]``, patches row-major) with integer codes (``-1``:
unknown, left out). A feature's score is its activation from the SAE's own ``encode``: the maximum
over an image's tokens for image attributes, the activation at the patch for patch attributes.
For each attribute value ``v`` (one against the rest) the AUROC says how well the score separates
positives (value ``v``) from negatives. It is exact (``vis/auroc.py``: the Mann-Whitney rank
statistic, ties counted one half) while the scores kept for it fit ``max_exact_bytes`` (4 bytes per
sample and feature summed over the SAEs: ``n`` samples for image attributes, ``n · n_patches`` for
patch attributes; the image level is served first); a level that does not fit is streamed through
histograms (bin 0: ``score <= 0``; then ``N_BINS - 1`` log-spaced bins from 1e-3 to 1e2, pairs in one
bin counted one half) whose error bound ``FeatureAnalysis.auroc_bound`` is
``Σ_b pos_b·neg_b / (2·n_pos·n_neg)`` (zero where exact; ``FeatureAnalysis.exact`` says which).
Every value needs a positive and a negative (``Attribute`` refuses codes that leave one undefined).

Per feature: the best ``(attribute, value)`` and its AUROC, the margin over the best value of any
other attribute, and a type from the attribute's ``kind`` (``class``, ``colour``, ``texture``,
``position``, ``other``), or ``dead``, or ``uninterpretable`` when the best AUROC is below
``threshold``. A position feature must also be content-independent: a best attribute of kind
``position`` counts only when no ``class``/``colour``/``texture`` attribute reaches ``threshold``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .._hooks import layer_of
from .attributes import KINDS as KINDS
from .attributes import Attribute as Attribute
from .attributes import Kind as Kind
from .attributes import shapes_attributes as shapes_attributes
from .auroc import N_BINS as N_BINS
from .auroc import AurocAccumulator
from .auroc import auroc_from_histograms as auroc_from_histograms
from .auroc import histogram_bound as histogram_bound
from .auroc import score_bins as score_bins

if TYPE_CHECKING:
    from pathlib import Path

    from sae_lens import SAE

    from ..models.hooked_vit import HookedViT

MAX_EXACT_BYTES = 512 << 20
"""Default memory budget of the scores kept for exact AUROCs (module docstring)."""


@dataclass
class FeatureAnalysis:
    """The analysis of one SAE (see the module docstring)."""

    hook_name: str
    attributes: list[str]
    value_names: list[list[str]]
    kinds: list[str]
    auroc: list[Tensor]
    """Per attribute ``[d_sae, n_values]`` (float64; NaN for a value without a positive or a negative)."""
    fires: Tensor
    """``[d_sae]``: images on which the feature fires."""
    threshold: float = 0.9
    not_a_label: list[tuple[int, ...]] = field(default_factory=list)
    best_attribute: Tensor = field(default_factory=lambda: torch.zeros(0))
    best_value: Tensor = field(default_factory=lambda: torch.zeros(0))
    best_auroc: Tensor = field(default_factory=lambda: torch.zeros(0))
    margin: Tensor = field(default_factory=lambda: torch.zeros(0))
    types: list[str] = field(default_factory=list)
    auroc_bound: list[Tensor] = field(default_factory=list)
    """Per attribute ``[d_sae, n_values]``: bound on ``|auroc − exact AUROC|`` (zero where exact)."""
    exact: list[bool] = field(default_factory=list)
    """Per attribute: whether its AUROCs are the exact rank statistic."""

    def __post_init__(self) -> None:
        usable = []
        for k, a in enumerate(self.auroc):
            a = a.nan_to_num(0.0).clone()
            skip = list(self.not_a_label[k]) if k < len(self.not_a_label) else []
            a[:, skip] = 0.0
            usable.append(a)
        per_attr = torch.stack([a.max(1).values for a in usable], 1)  # [d_sae, n_attr]
        arg = torch.stack([a.argmax(1) for a in usable], 1)
        content = [i for i, k in enumerate(self.kinds) if k in ("class", "colour", "texture")]
        position = [i for i, k in enumerate(self.kinds) if k == "position"]
        ranked = per_attr.clone()
        if position and content:  # position only when content-independent
            content_hit = per_attr[:, content].max(1).values >= self.threshold
            ranked[:, position] = torch.where(
                content_hit[:, None], torch.zeros_like(ranked[:, position]), ranked[:, position]
            )
        self.best_attribute = ranked.argmax(1)
        rows = torch.arange(len(ranked))
        self.best_auroc = per_attr[rows, self.best_attribute]
        self.best_value = arg[rows, self.best_attribute]
        others = ranked.clone()
        others[rows, self.best_attribute] = 0
        self.margin = self.best_auroc - others.max(1).values
        self.types = []
        for f in range(len(ranked)):
            if self.fires[f] == 0:
                self.types.append("dead")
            elif self.best_auroc[f] < self.threshold:
                self.types.append("uninterpretable")
            else:
                self.types.append(self.kinds[int(self.best_attribute[f])])

    @property
    def layer(self) -> int | None:
        parts = self.hook_name.split(".")
        return int(parts[1]) if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit() else None

    def label(self, feature: int) -> str:
        """``"circle (shape), layer 4, AUROC 0.97"`` (``dead`` when it never fires)."""
        if self.fires[feature] == 0:
            return "dead"
        a, v = int(self.best_attribute[feature]), int(self.best_value[feature])
        where = f", layer {self.layer}" if self.layer is not None else ""
        return f"{self.value_names[a][v]} ({self.attributes[a]}){where}, AUROC {float(self.best_auroc[feature]):.2f}"

    def summary(self) -> dict[str, Any]:
        """Live features, the interpretable share and the type mix."""
        live = int((self.fires > 0).sum())
        mix = {t: self.types.count(t) for t in ("class", "colour", "texture", "position", "other", "uninterpretable")}
        interpretable = live - mix["uninterpretable"]
        return {
            "hook": self.hook_name,
            "live": live,
            "interpretable": interpretable,
            "interpretable_share": interpretable / max(live, 1),
            "types": mix,
        }


def _check_analysis_inputs(
    model: HookedViT,
    saes: Sequence[SAE],
    pixels: Tensor | Sequence[Tensor],
    attributes: Sequence[Attribute],
    options: tuple[float, int, int],
) -> None:
    threshold, batch_size, max_exact_bytes = options
    if not 0.5 < threshold <= 1.0:  # also refuses NaN
        raise ValueError(
            f"threshold must be in (0.5, 1] (an AUROC a feature's best value must reach; 0.5 is chance); "
            f"got {threshold!r}."
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    if max_exact_bytes < 0:
        raise ValueError(f"max_exact_bytes must be >= 0 (0: always stream histograms); got {max_exact_bytes}.")
    if not saes:
        raise ValueError("analyse_features() needs at least one SAE; got none.")
    if not attributes:
        raise ValueError("analyse_features() needs at least one Attribute; got none.")
    hooks = [sae.cfg.metadata.hook_name for sae in saes]
    dup = next((h for h in hooks if hooks.count(h) > 1), None)
    if dup is not None:
        raise ValueError(f"Two SAEs read {dup!r}; the analyses are keyed by hook, give one SAE per hook.")
    n = len(pixels)
    for a in attributes:
        a._validate()
        if a.values.shape[0] != n:
            raise ValueError(f"Attribute {a.name!r} labels {a.values.shape[0]} images; pixels has {n}.")
        if a.level == "patch" and a.values.shape[1] != model.cfg.n_patches:
            raise ValueError(
                f"Attribute {a.name!r} labels {a.values.shape[1]} patches; the model has {model.cfg.n_patches}."
            )
    for h in hooks:
        model.check_hook_name(h)


def _accumulators(
    saes: Sequence[SAE], attributes: Sequence[Attribute], sizes: tuple[int, int], max_exact_bytes: int, device: Any
) -> dict[str, dict[str, AurocAccumulator]]:
    """Per SAE hook and level an accumulator; a level is exact when its scores (and the image level's,
    when that is exact) fit ``max_exact_bytes``."""
    n, n_patches = sizes
    per_level = {"image": n, "patch": n * n_patches}
    used, exact = 0, {}
    for level in ("image", "patch"):
        if any(a.level == level for a in attributes):
            need = 4 * per_level[level] * sum(sae.cfg.d_sae for sae in saes)
            exact[level] = used + need <= max_exact_bytes
            used += need if exact[level] else 0
    out: dict[str, dict[str, AurocAccumulator]] = {}
    for sae in saes:
        out[sae.cfg.metadata.hook_name] = {
            level: AurocAccumulator(
                sae.cfg.d_sae,
                per_level[level],
                [a.values for a in attributes if a.level == level],
                [len(a.names) for a in attributes if a.level == level],
                exact=exact[level],
                device=device,
            )
            for level in exact
        }
    return out


@torch.no_grad()
def analyse_features(
    model: HookedViT,
    saes: Sequence[SAE],
    pixels: Tensor | Sequence[Tensor],
    attributes: Sequence[Attribute],
    threshold: float = 0.9,
    *,
    batch_size: int = 64,
    max_exact_bytes: int = MAX_EXACT_BYTES,
    progress: bool = False,
) -> dict[str, FeatureAnalysis]:
    """Score every feature of every SAE against every attribute (module docstring) in one pass over
    ``pixels`` (preprocessed, the images the attributes describe); ``{hook_name: FeatureAnalysis}``.
    ``threshold`` in ``(0.5, 1]``. AUROCs are exact while the kept scores (4 bytes per sample and
    feature, over all SAEs) fit ``max_exact_bytes`` (default 512 MiB), else streamed from histograms
    with the error bound in ``FeatureAnalysis.auroc_bound``."""
    from tqdm.auto import tqdm

    from ..models.naflex import take

    _check_analysis_inputs(model, saes, pixels, attributes, (threshold, batch_size, max_exact_bytes))
    n, n_patches = len(pixels), model.cfg.n_patches
    device = pixels.device if isinstance(pixels, Tensor) else pixels[0].device
    hooks = [sae.cfg.metadata.hook_name for sae in saes]
    acc = _accumulators(saes, attributes, (n, n_patches), max_exact_bytes, device)
    fires = {h: torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=device) for h, sae in zip(hooks, saes, strict=True)}
    np_ = model.cfg.n_prefix_tokens
    blocks = [layer_of(h) for h in hooks]
    stop = max(blocks) + 1 if all(b is not None for b in blocks) else None
    for start in tqdm(range(0, n, batch_size), desc="analyse_features", unit="batch", disable=not progress):
        x = take(pixels, slice(start, start + batch_size))
        _, cache = model.run_with_cache(x, names_filter=hooks, return_cache_object=False, stop_at_layer=stop)
        padding = ~model.token_mask[..., None]  # NaFlex images of mixed sizes: padding is never a token's score
        if "patch" in acc[hooks[0]] and any(tuple(g) != model.cfg.grid_size for g in model.grid_sizes):
            raise ValueError(
                f"Patch-level attributes label {n_patches} patches per image on the {model.cfg.grid_size} grid; "
                f"these images have grids {sorted(set(model.grid_sizes))[:4]}. Analyse patch attributes on "
                "images of the model's size (model.preprocess), image attributes on any."
            )
        for h, sae in zip(hooks, saes, strict=True):
            acts = sae.encode(cache[h]).float()  # [b, pos, d_sae]
            image = acts.masked_fill(padding, -float("inf")).amax(1) if padding.any() else acts.amax(1)
            fires[h] += (image > 0).sum(0).to(fires[h].device)
            if "image" in acc[h]:
                acc[h]["image"].add(start, image)
            if "patch" in acc[h]:
                acc[h]["patch"].add(start * n_patches, acts[:, np_:].reshape(-1, acts.shape[-1]))
    out = {}
    for h in hooks:
        results = {level: a.result() for level, a in acc[h].items()}
        slot = {"image": 0, "patch": 0}
        aurocs, bounds = [], []
        for a in attributes:
            values, bound = results[a.level]
            aurocs.append(values[slot[a.level]].cpu())
            bounds.append(bound[slot[a.level]].cpu())
            slot[a.level] += 1
        out[h] = FeatureAnalysis(
            h,
            [a.name for a in attributes],
            [list(a.names) for a in attributes],
            [a.kind for a in attributes],
            aurocs,
            fires[h].cpu(),
            threshold,
            [a.not_a_label for a in attributes],
            auroc_bound=bounds,
            exact=[acc[h][a.level].exact for a in attributes],
        )
    return out


def feature_labels(analyses: Mapping[str, FeatureAnalysis]) -> dict[tuple[int, int], str]:
    """``{(layer, feature): label}`` of every live feature whose type is not ``uninterpretable``: what
    the dashboards and the circuit exporter's clerps show."""
    out = {}
    for a in analyses.values():
        if a.layer is None:
            continue
        for f, t in enumerate(a.types):
            if t not in ("dead", "uninterpretable"):
                out[(a.layer, f)] = a.label(f)
    return out


def plot_type_evolution(analyses: Mapping[str, FeatureAnalysis], path: str | Path) -> Path:
    """Stacked shares of live features per type and layer (the paper's feature evolution)."""
    from .plots import plot_layer_evolution

    live_types = {h: [t for t in a.types if t != "dead"] for h, a in analyses.items()}
    return plot_layer_evolution(
        live_types,
        path,
        kinds=("class", "colour", "texture", "position", "other", "uninterpretable"),
        colours=("#e8704c", "#4c9be8", "#8fc97a", "#e8c34c", "#9b7fc9", "#dddddd"),
        ylabel="share of live features",
    )


def analysis_table(analyses: Mapping[str, FeatureAnalysis]) -> str:
    """Markdown: per SAE the live features, interpretable share and type mix."""
    head = "| SAE | live | interpretable | share | class | colour | texture | position | other |"
    lines = [head, "|" + "---|" * 9]
    for h, a in analyses.items():
        s = a.summary()
        t = s["types"]
        lines.append(
            f"| {h} | {s['live']} | {s['interpretable']} | {s['interpretable_share']:.2f} | {t['class']} | "
            f"{t['colour']} | {t['texture']} | {t['position']} | {t['other']} |"
        )
    return "\n".join(lines)
