"""``collect_feature_stats``: per-feature statistics of SAEs over an image set, in one streaming pass.

Memory is O(d_sae · (top_k + bins + n_patches + n_classes)) per SAE, whatever the number of images:
no per-image activation is kept. Several SAEs (e.g. every layer) share each model forward, which
stops after the deepest SAE's block. Activations come from each SAE's own ``encode`` (normalisation,
bias and activation function included).

Per feature:

- ``top_values/top_images/top_tokens``: the ``top_k`` images with the highest activation of the
  feature on any of their tokens, one entry per image, sorted descending (``-1`` pads unused slots);
  the token is that image's hottest position (prefix tokens first, then patches row-major).
- ``fire_tokens`` / ``fire_images``: tokens and images where the feature is non-zero; densities
  divide by ``n_tokens`` / ``n_images``.
- ``sum_act``, ``max_act``; ``hist``: counts of log10(activation) of firing tokens in fixed bins.
- ``fire_prefix``: firing count on prefix tokens (prefix share = fire_prefix / fire_tokens).
- ``spatial_sum``: activation summed per patch position (``spatial_map`` averages over images). Images
  whose own grid differs from the stats grid (NaFlex batches of mixed sizes) add their map resampled
  to it (bilinear).

NaFlex batches of mixed sizes: padding tokens (``model.token_mask``) are left out of every count,
sum, histogram and top example; ``top_tokens`` index each image's own layout (prefix tokens, then its
``rows x cols`` patches row-major).
- with labels: ``class_sum`` (activation summed per class over an image's tokens) and
  ``class_images`` (images per class) for the label distribution of top images and selectivity.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .._compat import renamed_kwargs

if TYPE_CHECKING:
    from sae_lens import SAE

    from ..models.hooked_vit import HookedViT

HIST_EDGES = torch.linspace(-4.0, 2.0, 31)  # log10 activation bins


@dataclass
class FeatureStats:
    """Statistics of one SAE's features; see the module docstring for each field's meaning."""

    hook_name: str
    d_sae: int
    top_k: int
    n_prefix: int
    grid: tuple[int, int]
    n_classes: int = 0
    n_images: int = 0
    n_tokens: int = 0
    tensors: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def empty(
        cls, hook_name: str, d_sae: int, top_k: int, n_prefix: int, grid: tuple[int, int], *, n_classes: int = 0
    ) -> FeatureStats:
        s = cls(hook_name, d_sae, top_k, n_prefix, tuple(grid), n_classes)
        n_patch = grid[0] * grid[1]
        s.tensors = {
            "top_values": torch.full((d_sae, top_k), -float("inf")),
            "top_images": torch.full((d_sae, top_k), -1, dtype=torch.long),
            "top_tokens": torch.full((d_sae, top_k), -1, dtype=torch.long),
            "fire_tokens": torch.zeros(d_sae, dtype=torch.long),
            "fire_images": torch.zeros(d_sae, dtype=torch.long),
            "fire_prefix": torch.zeros(d_sae, dtype=torch.long),
            "sum_act": torch.zeros(d_sae, dtype=torch.float64),
            "max_act": torch.zeros(d_sae),
            "hist": torch.zeros(d_sae, len(HIST_EDGES) - 1, dtype=torch.long),
            "spatial_sum": torch.zeros(d_sae, n_patch, dtype=torch.float64),
            "class_sum": torch.zeros(d_sae, max(n_classes, 1), dtype=torch.float64),
            "class_images": torch.zeros(max(n_classes, 1), dtype=torch.long),
        }
        return s

    def __getattr__(self, name: str) -> Tensor:
        tensors = self.__dict__.get("tensors", {})
        if name in tensors:
            return tensors[name]
        raise AttributeError(name)

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def update(
        self,
        feats: Tensor,
        image_offset: int,
        labels: Tensor | None = None,
        token_mask: Tensor | None = None,
        grid_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        """Fold one batch of feature activations ``[batch, pos, d_sae]`` (images numbered from ``image_offset``).

        ``token_mask`` (``[batch, pos]``, ``True`` for real tokens) and ``grid_sizes`` (each image's
        ``(rows, cols)``) describe a NaFlex batch of mixed sizes: padding is left out."""
        t = self.tensors
        feats = feats.detach().float().cpu()
        b, n_pos, _ = feats.shape
        real = None if token_mask is None or bool(token_mask.all()) else token_mask.cpu()
        if real is not None:
            feats = feats * real[..., None]  # padding never fires, sums nothing, is never a top token
        fires = feats != 0
        t["fire_tokens"] += fires.sum((0, 1))
        t["fire_images"] += fires.any(1).sum(0)
        t["fire_prefix"] += fires[:, : self.n_prefix].sum((0, 1))
        t["sum_act"] += feats.sum((0, 1)).double()
        img_max, img_tok = feats.max(1)  # [b, d_sae]
        t["max_act"] = torch.maximum(t["max_act"], img_max.max(0).values)
        logs = torch.log10(feats[fires].clamp_min(1e-12))
        bins = torch.bucketize(logs, HIST_EDGES[1:-1])
        feat_idx = fires.nonzero()[:, 2]
        t["hist"].view(-1).index_add_(0, feat_idx * (len(HIST_EDGES) - 1) + bins, torch.ones_like(bins))
        patches = feats[:, self.n_prefix :]
        if grid_sizes is not None and any(tuple(g) != self.grid for g in grid_sizes):
            t["spatial_sum"] += self._resampled_patch_sum(patches, grid_sizes)
        elif patches.shape[1] == t["spatial_sum"].shape[1]:
            t["spatial_sum"] += patches.sum(0).T.double()
        if labels is not None and self.n_classes:
            labels = labels.cpu()
            t["class_sum"].index_add_(1, labels, feats.sum(1).T.double())
            t["class_images"] += torch.bincount(labels, minlength=self.n_classes)
        images = torch.arange(image_offset, image_offset + b).expand(self.d_sae, b)
        values = torch.cat([t["top_values"], img_max.T], dim=1)
        order = values.topk(self.top_k, dim=1).indices
        t["top_values"] = values.gather(1, order)
        t["top_images"] = torch.cat([t["top_images"], images], dim=1).gather(1, order)
        t["top_tokens"] = torch.cat([t["top_tokens"], img_tok.T], dim=1).gather(1, order)
        self.n_images += b
        self.n_tokens += b * n_pos if real is None else int(real.sum())

    def _resampled_patch_sum(self, patches: Tensor, grid_sizes: Sequence[tuple[int, int]]) -> Tensor:
        """``[d_sae, n_patch]``: each image's ``[rows, cols]`` map resampled to the stats grid, summed."""
        import torch.nn.functional as F

        out = torch.zeros(self.d_sae, self.grid[0] * self.grid[1], dtype=torch.float64)
        for i, (r, c) in enumerate(grid_sizes):
            m = patches[i, : r * c].T.reshape(1, self.d_sae, r, c)
            if (r, c) != self.grid:
                m = F.interpolate(m, size=self.grid, mode="bilinear", align_corners=False)
            out += m.reshape(self.d_sae, -1).double()
        return out

    # ------------------------------------------------------------------ views
    def top_examples(self, feature: int) -> list[tuple[float, int, int]]:
        """``[(activation, image_index, token_index), ...]`` for images where the feature fires, best first."""
        t = self.tensors
        out = []
        rows = zip(t["top_values"][feature], t["top_images"][feature], t["top_tokens"][feature], strict=True)
        for v, i, tok in rows:
            if i >= 0 and v > 0:
                out.append((float(v), int(i), int(tok)))
        return out

    @property
    def density_tokens(self) -> Tensor:
        return self.tensors["fire_tokens"].float() / max(self.n_tokens, 1)

    @property
    def density_images(self) -> Tensor:
        return self.tensors["fire_images"].float() / max(self.n_images, 1)

    @property
    def mean_act(self) -> Tensor:
        """Mean activation over all tokens (zeros included)."""
        return (self.tensors["sum_act"] / max(self.n_tokens, 1)).float()

    @property
    def prefix_share(self) -> Tensor:
        """Share of a feature's firings that are on prefix tokens (CLS, registers: timm's
        ``num_prefix_tokens``)."""
        return self.tensors["fire_prefix"].float() / self.tensors["fire_tokens"].clamp_min(1).float()

    @property
    def cls_share(self) -> Tensor:
        """Deprecated name of :attr:`prefix_share` (it always covered every prefix token)."""
        warnings.warn("FeatureStats.cls_share is now prefix_share.", DeprecationWarning, stacklevel=2)
        return self.prefix_share

    def spatial_map(self, feature: int | None = None) -> Tensor:
        """Mean activation per patch position ``[grid_h, grid_w]`` (all features: ``[d_sae, h, w]``)."""
        m = (self.tensors["spatial_sum"] / max(self.n_images, 1)).float().view(-1, *self.grid)
        return m if feature is None else m[feature]

    @property
    def spatial_concentration(self) -> Tensor:
        """How position-bound each feature is: share of its spatial mass in its top 10% positions."""
        m = self.tensors["spatial_sum"].float().clamp_min(0)
        k = max(1, m.shape[1] // 10)
        return m.topk(k, dim=1).values.sum(1) / m.sum(1).clamp_min(1e-12)

    def label_distribution(self, feature: int, labels: Sequence[int] | Tensor) -> Tensor:
        """Counts per class among the feature's top images (``labels`` indexed by image)."""
        labels = torch.as_tensor(labels)
        idx = [i for _, i, _ in self.top_examples(feature)]
        return torch.bincount(labels[idx], minlength=self.n_classes) if idx else torch.zeros(self.n_classes)

    @property
    def class_selectivity(self) -> Tensor:
        """(best class mean - mean of the others) / best class mean, per feature; 0 without labels."""
        if not self.n_classes:
            return torch.zeros(self.d_sae)
        mean = (self.tensors["class_sum"] / self.tensors["class_images"].clamp_min(1)).float()
        best = mean.max(1).values
        others = (mean.sum(1) - best) / max(self.n_classes - 1, 1)
        return torch.where(best > 0, (best - others) / best.clamp_min(1e-12), torch.zeros_like(best))

    # ------------------------------------------------------------------ disk
    def save(self, folder: str | Path) -> Path:
        """``folder/<hook_name>/stats.safetensors`` + ``meta.json``; returns that directory."""
        from safetensors.torch import save_file

        d = Path(folder) / self.hook_name
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(d / "stats.safetensors"))
        meta = {
            k: getattr(self, k)
            for k in ("hook_name", "d_sae", "top_k", "n_prefix", "n_classes", "n_images", "n_tokens")
        }
        (d / "meta.json").write_text(json.dumps(meta | {"grid": list(self.grid)}))
        return d

    @classmethod
    def load(cls, folder: str | Path) -> FeatureStats:
        from safetensors.torch import load_file

        d = Path(folder)
        meta = json.loads((d / "meta.json").read_text())
        s = cls(**(meta | {"grid": tuple(meta["grid"])}))
        s.tensors = load_file(str(d / "stats.safetensors"))
        return s


def _batches(images: Tensor | Iterable[Tensor], batch_size: int) -> Iterable[Tensor | list[Tensor]]:
    from ..models.naflex import is_image_list

    if isinstance(images, Tensor) or is_image_list(images):
        for i in range(0, len(images), batch_size):
            yield images[i : i + batch_size]
    else:
        yield from images


@torch.no_grad()
@renamed_kwargs(images="pixels")
def collect_feature_stats(
    model: HookedViT,
    saes: SAE | Sequence[SAE] | Mapping[str, SAE],
    pixels: Tensor | Iterable[Tensor],
    labels: Tensor | None = None,
    top_k: int = 16,
    *,
    batch_size: int = 64,
    n_classes: int | None = None,
    progress: bool = True,
) -> FeatureStats | dict[str, FeatureStats]:
    """Statistics of one SAE (returns ``FeatureStats``) or several (``{hook_name: FeatureStats}``).

    ``pixels`` are preprocessed ``[n, chan, h, w]`` (or an iterable of such batches, in order; for NaFlex
    models a list of ``[chan, h, w]`` images of their own sizes, or an iterable of such lists);
    ``labels`` (``[n]``, class ids) enable the label distribution and class selectivity.
    """
    from tqdm import tqdm

    from ..activations.harvest import deepest_block

    single = not isinstance(saes, (list, tuple, dict))
    sae_list = [saes] if single else list(saes.values() if isinstance(saes, dict) else saes)
    from ..data.checks import check_labels
    from ..models.splicing import warn_if_trained_on_another_model

    if not sae_list:
        raise ValueError("collect_feature_stats got no SAE; pass one SAE, a list or a {hook_name: SAE} dict.")
    hooks = [model.check_sae(sae) for sae in sae_list]  # hook set, a hook of this model, d_in = its width
    for sae in sae_list:
        warn_if_trained_on_another_model(sae, model)
    from ..models.naflex import is_image_list

    sized = isinstance(pixels, Tensor) or is_image_list(pixels)
    if sized and len(pixels) == 0:
        raise ValueError("collect_feature_stats got 0 images; pass at least one preprocessed image.")
    if labels is not None:
        labels = check_labels(labels, len(pixels) if sized else None, n_classes)
    deepest = deepest_block(hooks)
    stop = None if deepest is None else deepest + 1
    n_classes = n_classes if n_classes is not None else (int(labels.max()) + 1 if labels is not None else 0)
    stats = {
        s.cfg.metadata.hook_name: FeatureStats.empty(
            s.cfg.metadata.hook_name,
            s.cfg.d_sae,
            top_k,
            model.cfg.n_prefix_tokens,
            model.cfg.grid_size,
            n_classes=n_classes,
        )
        for s in sae_list
    }
    total = len(pixels) if sized else None
    bar = tqdm(total=total, desc="feature stats", unit="img", disable=not progress)
    offset = 0
    for batch in _batches(pixels, batch_size):
        _, cache = model.run_with_cache(batch, names_filter=hooks, stop_at_layer=stop, return_cache_object=False)
        lab = None if labels is None else labels[offset : offset + len(batch)]
        for sae in sae_list:
            h = sae.cfg.metadata.hook_name
            stats[h].update(sae.encode(cache[h]), offset, lab, model.token_mask, model.grid_sizes)
        offset += len(batch)
        bar.update(len(batch))
    bar.close()
    if offset == 0:
        raise ValueError("collect_feature_stats got no images: the iterable of batches was empty.")
    if labels is not None and offset != len(labels):
        raise ValueError(f"labels has {len(labels)} entries but {offset} images were read; pass one label per image.")
    return next(iter(stats.values())) if single else stats
