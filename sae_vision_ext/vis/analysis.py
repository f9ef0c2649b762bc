"""``analyse_features``: every feature of every SAE scored against labelled attributes, in one
streaming pass, with feature types and one-line labels (the seed paper's feature analysis, measured
instead of annotated).

An :class:`Attribute` labels every image (``level="image"``: ``values [n]``) or every patch
(``level="patch"``: ``values [n, n_patches]``, patches row-major) with integer codes (``-1``:
unknown, left out). A feature's score is its activation from the SAE's own ``encode``: the maximum
over an image's tokens for image attributes, the activation at the patch for patch attributes.
For each attribute value ``v`` (one against the rest) the AUROC says how well the score separates
positives (value ``v``) from negatives; it is computed from histograms of the scores (bin 0: exactly
zero; then ``N_BINS - 1`` log-spaced bins from 1e-3 to 1e2), ties within a bin counted one half,
so memory does not grow with the number of images and the numbers can be recomputed from
``sae.encode`` with :func:`score_bins` (``tests/integration/test_analysis.py``).

Per feature: the best ``(attribute, value)`` and its AUROC, the margin over the best value of any
other attribute, and a type from the attribute's ``kind`` (``class``, ``colour``, ``texture``,
``position``, ``other``), or ``dead``, or ``uninterpretable`` when the best AUROC is below
``threshold``. A position feature must also be content-independent: a best attribute of kind
``position`` counts only when no ``class``/``colour``/``texture`` attribute reaches ``threshold``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

from .._hooks import layer_of

if TYPE_CHECKING:
    from pathlib import Path

    from sae_lens import SAE

    from ..data.shapes import ShapesData
    from ..models.hooked_vit import HookedViT

N_BINS = 64
"""Score bins: bin 0 is an exact zero, then log-spaced bins over [1e-3, 1e2]."""
_EDGES = torch.logspace(-3, 2, N_BINS - 2)

Kind = Literal["class", "colour", "texture", "position", "other"]


@dataclass
class Attribute:
    """One labelled attribute of the images."""

    name: str
    """Shown in labels and tables, e.g. ``shape``."""
    values: Any
    """Integer codes: ``[n]`` per image or ``[n, n_patches]`` per patch (``-1``: unknown)."""
    names: Sequence[str]
    """Name of each code."""
    level: Literal["image", "patch"] = "image"
    """Whether a feature is scored per image (its maximum over tokens) or per patch."""
    kind: Kind = "other"
    """Feature type a best match on this attribute gives."""
    not_a_label: tuple[int, ...] = ()
    """Codes scored but never a feature's best match (the absent value of a yes/no attribute, whose
    one-against-the-rest AUROC only mirrors the present value's)."""

    def __post_init__(self) -> None:
        self.values = torch.as_tensor(np.array(self.values, dtype=np.int64))
        if self.level not in ("image", "patch"):
            raise ValueError(f"Attribute {self.name!r}: level must be 'image' or 'patch'; got {self.level!r}.")
        want = 1 if self.level == "image" else 2
        if self.values.ndim != want:
            raise ValueError(
                f"Attribute {self.name!r}: {self.level} values must have {want} dimension(s) "
                f"([n]{'' if want == 1 else ', n_patches'}); got shape {tuple(self.values.shape)}."
            )
        if int(self.values.max()) >= len(self.names):
            raise ValueError(
                f"Attribute {self.name!r}: code {int(self.values.max())} has no name ({len(self.names)} names)."
            )


def score_bins(scores: Tensor) -> Tensor:
    """The histogram bin of each score (see the module docstring)."""
    b = torch.bucketize(scores.float().clamp_min(0), _EDGES) + 1
    return torch.where(scores > 0, b, torch.zeros_like(b))


def auroc_from_histograms(pos: Tensor, neg: Tensor) -> Tensor:
    """AUROC per row of ``[..., N_BINS]`` positive/negative histograms (ties within a bin: one half);
    NaN where a row has no positives or no negatives."""
    pos, neg = pos.double(), neg.double()
    below = neg.cumsum(-1) - neg
    n_pos, n_neg = pos.sum(-1), neg.sum(-1)
    area = (pos * (below + 0.5 * neg)).sum(-1)
    out = area / (n_pos * n_neg)
    return torch.where((n_pos > 0) & (n_neg > 0), out, torch.full_like(out, float("nan")))


@dataclass
class FeatureAnalysis:
    """The analysis of one SAE (see the module docstring)."""

    hook_name: str
    attributes: list[str]
    value_names: list[list[str]]
    kinds: list[str]
    auroc: list[Tensor]
    """Per attribute ``[d_sae, n_values]``."""
    fires: Tensor
    """``[d_sae]``: images on which the feature fires."""
    threshold: float = 0.9
    not_a_label: list[tuple[int, ...]] = field(default_factory=list)
    best_attribute: Tensor = field(default_factory=lambda: torch.zeros(0))
    best_value: Tensor = field(default_factory=lambda: torch.zeros(0))
    best_auroc: Tensor = field(default_factory=lambda: torch.zeros(0))
    margin: Tensor = field(default_factory=lambda: torch.zeros(0))
    types: list[str] = field(default_factory=list)

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


def shapes_attributes(data: ShapesData, grid: tuple[int, int], image_size: int) -> list[Attribute]:
    """The shapes set's ground truth as attributes: per image shape, colour, background, marker, size
    (three bins), rotation (four), the object's cell on a 3x3 grid; per patch the patch position and
    whether the patch holds the marker (top-left patch of marked images)."""
    from ..data.shapes import BACKGROUNDS, COLOURS, SHAPES

    f = data.factors
    n = len(data.labels)
    gh, gw = grid
    size = np.digitize(f["size"], np.quantile(f["size"], [1 / 3, 2 / 3]))
    rotation = (np.asarray(f["rotation"]) // (np.pi / 2)).astype(int) % 4
    cell = (
        np.minimum(np.asarray(f["cy"]) * 3 // image_size, 2) * 3 + np.minimum(np.asarray(f["cx"]) * 3 // image_size, 2)
    ).astype(int)
    patch = np.broadcast_to(np.arange(gh * gw), (n, gh * gw))
    marker_patch = np.zeros((n, gh * gw), dtype=int)
    marker_patch[:, 0] = np.asarray(f["marker"]).astype(int)
    return [
        Attribute("shape", data.labels, list(SHAPES), kind="class"),
        Attribute("colour", f["colour"].astype(int), list(COLOURS), kind="colour"),
        Attribute("background", f["background"].astype(int), list(BACKGROUNDS), kind="texture"),
        Attribute("marker", f["marker"].astype(int), ["no marker", "marker"], not_a_label=(0,)),
        Attribute("size", size, ["small", "medium", "large"]),
        Attribute("rotation", rotation, ["0-90°", "90-180°", "180-270°", "270-360°"]),
        Attribute("object cell", cell, [f"cell ({r},{c})" for r in range(3) for c in range(3)], kind="position"),
        Attribute(
            "patch", patch, [f"p({r},{c})" for r in range(gh) for c in range(gw)], level="patch", kind="position"
        ),
        Attribute("marker patch", marker_patch, ["other patch", "marker patch"], level="patch", not_a_label=(0,)),
    ]


@torch.no_grad()
def analyse_features(
    model: HookedViT,
    saes: Sequence[SAE],
    pixels: Tensor,
    attributes: Sequence[Attribute],
    threshold: float = 0.9,
    *,
    batch_size: int = 64,
    progress: bool = False,
) -> dict[str, FeatureAnalysis]:
    """Score every feature of every SAE against every attribute (module docstring) in one pass over
    ``pixels`` (preprocessed, the images the attributes describe); ``{hook_name: FeatureAnalysis}``."""
    from tqdm.auto import tqdm

    n = len(pixels)
    for a in attributes:
        if a.values.shape[0] != n:
            raise ValueError(f"Attribute {a.name!r} labels {a.values.shape[0]} images; pixels has {n}.")
        if a.level == "patch" and a.values.shape[1] != model.cfg.n_patches:
            raise ValueError(
                f"Attribute {a.name!r} labels {a.values.shape[1]} patches; the model has {model.cfg.n_patches}."
            )
    hooks = [sae.cfg.metadata.hook_name for sae in saes]
    for h in hooks:
        model.check_hook_name(h)
    pos = {
        h: [torch.zeros(sae.cfg.d_sae * len(a.names) * N_BINS, dtype=torch.long) for a in attributes]
        for h, sae in zip(hooks, saes, strict=True)
    }
    fires = {h: torch.zeros(sae.cfg.d_sae, dtype=torch.long) for h, sae in zip(hooks, saes, strict=True)}
    np_ = model.cfg.n_prefix_tokens
    blocks = [layer_of(h) for h in hooks]
    stop = max(blocks) + 1 if all(b is not None for b in blocks) else None
    for start in tqdm(range(0, n, batch_size), desc="analyse_features", unit="batch", disable=not progress):
        x = pixels[start : start + batch_size]
        _, cache = model.run_with_cache(x, names_filter=hooks, return_cache_object=False, stop_at_layer=stop)
        for h, sae in zip(hooks, saes, strict=True):
            acts = sae.encode(cache[h]).float()  # [b, pos, d_sae]
            d = acts.shape[-1]
            feats = torch.arange(d)
            img_bins = score_bins(acts.amax(1))  # [b, d]
            patch_bins = score_bins(acts[:, np_:])  # [b, n_patches, d]
            fires[h] += (acts.amax(1) > 0).sum(0)
            for k, a in enumerate(attributes):
                v = a.values[start : start + len(x)]
                if a.level == "image":
                    idx = ((v[:, None] * d + feats) * N_BINS + img_bins)[v >= 0]
                else:
                    idx = ((v[..., None] * d + feats) * N_BINS + patch_bins)[v >= 0]
                pos[h][k] += torch.bincount(idx.flatten(), minlength=len(pos[h][k]))
    out = {}
    for h, sae in zip(hooks, saes, strict=True):
        d = sae.cfg.d_sae
        aurocs = []
        for k, a in enumerate(attributes):
            p = pos[h][k].view(len(a.names), d, N_BINS).transpose(0, 1)  # [d, n_values, bins]
            known = p.sum(1, keepdim=True)  # every sample with a known value, per bin
            aurocs.append(auroc_from_histograms(p, known - p).float())
        out[h] = FeatureAnalysis(
            h,
            [a.name for a in attributes],
            [list(a.names) for a in attributes],
            [a.kind for a in attributes],
            aurocs,
            fires[h],
            threshold,
            [a.not_a_label for a in attributes],
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
