"""PNG figures with matplotlib (Agg): top-activating images with true per-patch heatmaps, crops,
density histograms, spatial maps and the evolution of feature kinds across layers.

Heatmaps are recomputed with the SAE's own ``encode`` on the model's activations for the shown
images (normalisation, bias and activation function included), never a decoder-direction proxy.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from .._compat import renamed_kwargs, reordered_args
from .._hooks import layer_of
from .stats import FeatureStats

if TYPE_CHECKING:
    from types import ModuleType

    from sae_lens import SAE

    from ..models.hooked_vit import HookedViT

KINDS = ("dead", "dense", "position", "class", "colour", "other")


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@torch.no_grad()
def feature_heatmaps(
    model: HookedViT, sae: SAE, pixels: Tensor | Sequence[Tensor], feature: int
) -> Tensor | list[Tensor]:
    """The feature's activation at every patch of each image: ``[n, grid_h, grid_w]``; for a NaFlex list
    of images of different sizes, each image's own ``[rows, cols]`` map in a list."""
    from ..models.naflex import patch_maps

    hook = sae.cfg.metadata.hook_name
    layer = layer_of(hook)
    stop = layer + 1 if layer is not None else None
    _, cache = model.run_with_cache(pixels, names_filter=hook, stop_at_layer=stop, return_cache_object=False)
    acts = sae.encode(cache[hook])[:, model.cfg.n_prefix_tokens :, feature]
    return patch_maps(acts, model.grid_sizes)


def display_images(model: HookedViT, pixels: Tensor | Sequence[Tensor]) -> np.ndarray | list[np.ndarray]:
    """Undo the model's normalisation: ``[n, h, w, 3]`` floats in [0, 1] for plotting (a list of
    ``[h, w, 3]`` arrays for a list of images)."""
    cfg = model.data_config
    mean = torch.tensor(cfg["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, -1, 1, 1)
    if not isinstance(pixels, Tensor):
        return [display_images(model, t[None])[0] for t in pixels]
    return (pixels.cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _overlay(ax: Any, img: np.ndarray, heat: np.ndarray, vmax: float) -> None:
    h, w = img.shape[:2]
    ax.imshow(img)
    masked = np.ma.masked_where(heat <= 0, heat)  # where the feature is silent the image shows through
    ax.imshow(
        masked, cmap="magma", alpha=0.6, vmin=0, vmax=max(vmax, 1e-6), extent=(0, w, h, 0), interpolation="nearest"
    )
    ax.axis("off")


@reordered_args(
    ("stats", "feature", "pixels", "path", "model", "sae", "labels", "crop_patches"),
    is_old=lambda args: isinstance(args[0], FeatureStats),
)
@renamed_kwargs(images="pixels")
def plot_top_patches(
    model: HookedViT,
    sae: SAE,
    stats: FeatureStats,
    feature: int,
    pixels: Tensor | Sequence[Tensor],
    *,
    path: str | Path,
    labels: Sequence[str] | None = None,
    crop_patches: int = 3,
) -> Path:
    """Top images of ``feature`` of ``sae`` with its heatmap (top row, one colour scale for all, drawn beside
    them) and a crop around the hottest patch (bottom).

    ``pixels`` are the preprocessed images the stats were collected on (indexed by image index; a list of
    images of their own sizes for NaFlex models, each heatmap on its own grid);
    ``labels``, when given, name every image of ``pixels`` (indexed by image index, like ``pixels``);
    ``model`` and ``sae`` recompute the true per-patch activations for the heatmaps.
    """
    plt = pyplot()
    examples = stats.top_examples(feature)
    path = Path(path)
    if not examples:
        fig, ax = plt.subplots(figsize=(3, 1))
        ax.text(0.5, 0.5, f"feature {feature} never fires", ha="center", va="center")
        ax.axis("off")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        return path
    from ..models.naflex import take

    idx = [i for _, i, _ in examples]
    heat = [h.cpu().numpy() for h in feature_heatmaps(model, sae, take(pixels, idx), feature)]  # own grid each
    imgs = display_images(model, take(pixels, idx))
    vmax = max(float(h.max()) for h in heat)
    ps = model.cfg.patch_size
    fig, axes = plt.subplots(2, len(idx), figsize=(1.7 * len(idx) + 0.7, 3.6), squeeze=False)
    for j, ((value, image, _), img, hm) in enumerate(zip(examples, imgs, heat, strict=True)):
        _overlay(axes[0, j], img, hm, vmax)
        title = f"{value:.2f} · #{image}"
        if labels is not None:
            title += f"\n{labels[image]}"
        axes[0, j].set_title(title, fontsize=7)
        r, c = np.unravel_index(int(hm.argmax()), hm.shape)
        half = crop_patches // 2
        r0, c0 = max(0, r - half) * ps, max(0, c - half) * ps
        axes[1, j].imshow(img[r0 : r0 + crop_patches * ps, c0 : c0 + crop_patches * ps])
        axes[1, j].axis("off")
    fig.suptitle(f"{stats.hook_name} feature {feature}", fontsize=9)
    fig.tight_layout()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    bar = fig.colorbar(
        ScalarMappable(Normalize(0, max(vmax, 1e-6)), cmap="magma"), ax=list(axes[0]), fraction=0.02, pad=0.01
    )
    bar.set_label("activation", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_density_histograms(stats: dict[str, FeatureStats], path: str | Path) -> Path:
    """log10 token density of every feature, one panel per SAE (dead features counted in the title)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(stats), figsize=(2.6 * len(stats), 2.4), squeeze=False, sharey=True)
    for ax, (hook, s) in zip(axes[0], stats.items(), strict=True):
        d = s.density_tokens
        ax.hist(torch.log10(d[d > 0]).numpy(), bins=30, range=(-6, 0), color="#3b6ea8")
        ax.set_title(f"{hook.replace('.hook_', ' ')}\n{int((d == 0).sum())} dead", fontsize=7)
        ax.set_xlabel("log10 density", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_spatial_maps(stats: FeatureStats, path: str | Path, n: int = 16) -> Path:
    """Mean activation per patch of the ``n`` most position-concentrated live features."""
    plt = pyplot()
    alive = stats.fire_tokens > 0
    conc = torch.where(alive, stats.spatial_concentration, torch.full_like(stats.spatial_concentration, -1))
    order = conc.argsort(descending=True)[:n].tolist()
    cols = min(8, len(order))
    rows = -(-len(order) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.45 * rows), squeeze=False)
    maps = stats.spatial_map()
    for ax in axes.flat:
        ax.axis("off")
    for ax, f in zip(axes.flat, order, strict=False):
        ax.imshow(maps[f].numpy(), cmap="viridis")
        ax.set_title(f"f{f} {float(conc[f]):.2f}", fontsize=6)
    fig.suptitle(f"{stats.hook_name}: most position-bound features", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def feature_kinds(
    stats: FeatureStats,
    colour_stats: FeatureStats | None = None,
    dense: float = 0.3,
    position: float = 0.5,
    selective: float = 0.5,
) -> list[str]:
    """A kind per feature, first match wins: ``dead`` (never fires), ``dense`` (token density above
    ``dense``), ``class`` (class selectivity above ``selective``), ``colour`` (selectivity over the
    colour factor, from ``colour_stats`` collected with colour ids as labels), ``position`` (over
    ``position`` of its spatial mass in its top 10% patches), else ``other``."""
    kinds = []
    col = colour_stats.class_selectivity if colour_stats is not None else torch.zeros(stats.d_sae)
    sel, conc, dens = stats.class_selectivity, stats.spatial_concentration, stats.density_tokens
    for f in range(stats.d_sae):
        if stats.fire_tokens[f] == 0:
            kinds.append("dead")
        elif dens[f] > dense:
            kinds.append("dense")
        elif sel[f] > selective:
            kinds.append("class")
        elif col[f] > selective:
            kinds.append("colour")
        elif conc[f] > position:
            kinds.append("position")
        else:
            kinds.append("other")
    return kinds


def plot_layer_evolution(
    kinds_by_layer: dict[str, list[str]],
    path: str | Path,
    kinds: Sequence[str] = KINDS,
    colours: Sequence[str] = ("#bbbbbb", "#555555", "#4c9be8", "#e8704c", "#e8c34c", "#8fc97a"),
    ylabel: str = "share of features",
) -> Path:
    """Stacked shares of feature kinds per layer (how features change with depth): for each hook, the
    share of its list in each of ``kinds`` (``feature_kinds`` by default; the feature analysis passes
    its types)."""
    plt = pyplot()
    hooks = list(kinds_by_layer)
    shares = np.array([[k.count(kind) / max(len(k), 1) for kind in kinds] for k in kinds_by_layer.values()])
    fig, ax = plt.subplots(figsize=(1.1 * len(hooks) + 2.5, 3))
    bottom = np.zeros(len(hooks))
    for i, kind in enumerate(kinds):
        ax.bar(range(len(hooks)), shares[:, i], bottom=bottom, label=kind, color=colours[i % len(colours)])
        bottom += shares[:, i]
    ax.set_xticks(range(len(hooks)), [str(layer_of(h)) if layer_of(h) is not None else h for h in hooks])
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
