"""``build_dashboard``: static, offline HTML dashboards for SAE features (Jinja2, no CDN, no server).

Layout under ``out_dir``::

    index.html                 SAEs, layer evolution of feature kinds, density histograms, image links
    <hook>/index.html          sortable table of live features (kind, densities, max, selectivity, prefix-token share)
    <hook>/f<id>.html + .png   top images with true heatmaps and crops, histogram, spatial map,
                               label distribution, neighbours by decoder cosine
    images/img<i>.html + .png  one image with the strongest features of every layer and their heatmaps
    stats/<hook>/              the FeatureStats (rebuild without recomputing: pass ``stats=``)

Numbers on feature pages come from the streaming statistics; each top-image row carries
``data-image``/``data-token`` so a test can recompute the activation (``tests/integration/test_dashboard.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..models.naflex import take
from .html import hist_svg, spatial_svg, template_env
from .lens import top_bottom
from .plots import (
    _overlay,
    display_images,
    feature_kinds,
    plot_density_histograms,
    plot_layer_evolution,
    plot_spatial_maps,
    plot_top_patches,
)
from .stats import HIST_EDGES, FeatureStats, collect_feature_stats

if TYPE_CHECKING:
    from sae_lens import SAE

    from ..models.hooked_vit import HookedViT


def _feature_rows(s: FeatureStats, kinds: list[str], labels: Tensor | None, names: Sequence[str]) -> list[dict]:
    rows = []
    for f in torch.argsort(s.fire_images, descending=True).tolist():
        if s.fire_tokens[f] == 0:
            continue
        top_label = ""
        if labels is not None and s.n_classes:
            dist = s.label_distribution(f, labels)
            top_label = names[int(dist.argmax())] if int(dist.sum()) else ""
        rows.append(
            {
                "id": f,
                "kind": kinds[f],
                "density": float(s.density_tokens[f]),
                "image_density": float(s.density_images[f]),
                "max_act": float(s.max_act[f]),
                "mean_act": float(s.mean_act[f]),
                "selectivity": float(s.class_selectivity[f]),
                "prefix_share": float(s.prefix_share[f]),
                "top_label": top_label,
                "page": False,
            }
        )
    return rows


PAGE_REASONS = ("in circuit", "max activation", "class-selective", "position-bound", "densest")
"""Why a feature gets a page, in the order pages are listed."""


def choose_feature_pages(
    s: FeatureStats, n: int, extra: Sequence[int] = (), min_images: int = 3
) -> dict[int, list[str]]:
    """Features that get a page, with the reasons (``PAGE_REASONS``): every live feature of ``extra``
    (e.g. the features of a traced circuit), then, taking turns, the highest maximum activation, the
    most class-selective and the most position-bound (both among features firing on at least
    ``min_images`` images) and the densest, until ``n`` pages (plus the extras) are chosen."""
    live = s.fire_tokens > 0
    enough = live & (s.fire_images >= min(min_images, max(s.n_images, 1)))
    neg = torch.full((s.d_sae,), -float("inf"))
    rankings = {
        "max activation": torch.where(live, s.max_act.float(), neg),
        "class-selective": torch.where(enough & (s.class_selectivity > 0), s.class_selectivity.float(), neg),
        "position-bound": torch.where(enough, s.spatial_concentration.float(), neg),
        "densest": torch.where(live, s.fire_images.float(), neg),
    }
    chosen: dict[int, list[str]] = {int(f): ["in circuit"] for f in extra if bool(live[int(f)])}
    orders = {k: [f for f in v.argsort(descending=True).tolist() if v[f] > -float("inf")] for k, v in rankings.items()}
    picked = 0
    while picked < n and any(orders.values()):
        for reason, order in orders.items():
            while order and picked < n:
                f = order.pop(0)
                if f not in chosen:
                    chosen[f] = [reason]
                    picked += 1
                    break
                if reason not in chosen[f]:
                    chosen[f].append(reason)
    for reason, ranking in rankings.items():  # every reason a chosen feature also qualifies for in its top n
        top = set(ranking.argsort(descending=True)[:n].tolist())
        for f, reasons in chosen.items():
            if f in top and ranking[f] > -float("inf") and reason not in reasons:
                reasons.append(reason)
    return chosen


def build_dashboard(  # noqa: PLR0913 (keyword-only page options, each documented)
    model: HookedViT,
    saes: Sequence[SAE],
    pixels: Tensor | Sequence[Tensor],
    out_dir: str | Path,
    labels: Tensor | None = None,
    *,
    label_names: Sequence[str] | None = None,
    top_k: int = 8,
    n_feature_pages: int = 16,
    n_image_pages: int = 8,
    stats: dict[str, FeatureStats] | None = None,
    progress: bool = True,
    logit_lens: dict[str, Tensor] | None = None,
    extra_features: dict[str, Sequence[int]] | None = None,
    feature_labels: dict[str, dict[int, str]] | None = None,
) -> Path:
    """Write the dashboard for ``saes`` on the preprocessed ``pixels``; returns ``out_dir/index.html``.

    Feature pages: ``n_feature_pages`` per SAE chosen by ``choose_feature_pages`` (highest maximum,
    most class-selective, most position-bound, densest), plus every live feature listed for its hook
    in ``extra_features`` (a traced circuit's, say). ``logit_lens`` (``{hook: [d_sae, n_classes]}``
    from ``circuits.evaluate.logit_lens``) adds each page's top and bottom classes; ``feature_labels``
    (``{hook: {feature: label}}``, e.g. ``labels.json`` of ``sae-vision analyse``) a one-line label on
    pages and in the tables. The table lists every live feature.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    saes = list(saes)
    stats = stats or collect_feature_stats(model, saes, pixels, labels, top_k=top_k, progress=progress)
    n_classes = next(iter(stats.values())).n_classes
    with torch.no_grad():
        logits = torch.cat([model(take(pixels, slice(i, i + 128))) for i in range(0, len(pixels), 128)])
    site = _Site(
        out=out,
        env=template_env(),
        model=model,
        pixels=pixels,
        labels=labels,
        names=list(label_names) if label_names is not None else [str(i) for i in range(max(n_classes, 1))],
        logits=logits,
        image_ids=list(range(min(n_image_pages, len(pixels)))),
    )
    hooks = [sae.cfg.metadata.hook_name for sae in saes]
    choices = {h: choose_feature_pages(stats[h], n_feature_pages, (extra_features or {}).get(h, ())) for h in hooks}
    site.page_ids = {h: set(c) for h, c in choices.items()}
    bar = tqdm(
        total=sum(len(c) for c in choices.values()) + len(site.image_ids),
        desc="dashboard",
        unit="page",
        disable=not progress,
    )
    kinds_by_hook = {h: feature_kinds(stats[h]) for h in hooks}
    summary = [
        _sae_pages(
            site,
            sae,
            stats[h],
            kinds_by_hook[h],
            choices[h],
            labels_of=(feature_labels or {}).get(h, {}),
            lens=(logit_lens or {}).get(h),
            bar=bar,
        )
        for h, sae in zip(hooks, saes, strict=True)
    ]
    plot_density_histograms(stats, out / "density.png")
    plot_layer_evolution(kinds_by_hook, out / "layer_evolution.png")
    (out / "images").mkdir(exist_ok=True)
    for i in site.image_ids:
        _image_page(site, saes, i)
        bar.update(1)
    bar.close()
    index = out / "index.html"
    index.write_text(
        site.env.get_template("index.html.j2").render(
            title="index",
            crumbs=[],
            model_name=site.model_name,
            n_images=len(pixels),
            saes=summary,
            image_pages=site.image_ids,
        )
    )
    return index


@dataclass
class _Site:
    """What every page of one dashboard shares."""

    out: Path
    env: Any
    model: HookedViT
    pixels: Tensor | Sequence[Tensor]
    """Preprocessed images: a batch, or (NaFlex) a list of images of their own sizes."""
    labels: Tensor | None
    names: list[str]
    logits: Tensor
    image_ids: list[int]
    page_ids: dict[str, set[int]] = field(default_factory=dict)
    """Per hook, the features that get a page (links point only there)."""

    @property
    def model_name(self) -> str:
        return self.model.cfg.model_name

    @cached_property
    def image_labels(self) -> list[str] | None:
        return [self.names[int(c)] for c in self.labels] if self.labels is not None else None


def _sae_pages(
    site: _Site,
    sae: SAE,
    s: FeatureStats,
    kinds: list[str],
    reasons: dict[int, list[str]],
    *,
    labels_of: dict[int, str],
    lens: Tensor | None,
    bar: Any,
) -> dict[str, Any]:
    """One SAE's folder: its stats, feature pages (those in ``reasons``) and table; its index row."""
    hook = sae.cfg.metadata.hook_name
    s.save(site.out / "stats")
    d = site.out / hook
    d.mkdir(exist_ok=True)
    rows = _feature_rows(s, kinds, site.labels, site.names)
    hook_labels = {int(k): v for k, v in labels_of.items()}
    for row in rows:
        row["page"] = row["id"] in reasons
        row["reasons"] = reasons.get(row["id"], [])
        row["label"] = hook_labels.get(row["id"], "")
    paged = sorted((r for r in rows if r["page"]), key=lambda r: list(reasons).index(r["id"]))
    plot_spatial_maps(s, d / "spatial.png")
    w_dec = torch.nn.functional.normalize(sae.W_dec.detach().float(), dim=-1)
    for row in paged:
        _feature_page(site, sae, s, row, w_dec=w_dec, lens=lens)
        bar.update(1)
    (d / "index.html").write_text(
        site.env.get_template("sae.html.j2").render(
            title=hook,
            crumbs=[(site.model_name, "../index.html")],
            hook=hook,
            features=rows,
            alive=len(rows),
            d_sae=s.d_sae,
            n_images=s.n_images,
        )
    )
    return {
        "hook": hook,
        "dir": hook,
        "d_sae": s.d_sae,
        "alive": len(rows),
        "dead": s.d_sae - len(rows),
        "pages": len(paged),
    }


def _feature_page(
    site: _Site, sae: SAE, s: FeatureStats, row: dict[str, Any], *, w_dec: Tensor, lens: Tensor | None
) -> None:
    """``f{feature}.html`` and its top-patches figure: top examples, histogram, spatial map, label
    distribution, nearest decoder directions and (``lens``) the logit lens."""
    hook, f, d = sae.cfg.metadata.hook_name, row["id"], site.out / sae.cfg.metadata.hook_name
    image_labels = site.image_labels
    examples = [
        {
            "value": v,
            "image": i,
            "token": t,
            "page": i in site.image_ids,
            "label": image_labels[i] if image_labels is not None else "",
        }
        for v, i, t in s.top_examples(f)
    ]
    plot_top_patches(site.model, sae, s, f, site.pixels, path=d / f"f{f}.png", labels=image_labels)
    cos = w_dec @ w_dec[f]
    cos[f] = -2
    neighbours = [
        {"id": int(j), "cos": float(cos[j]), "page": int(j) in site.page_ids[hook]} for j in cos.topk(5).indices
    ]
    has_labels = site.labels is not None and s.n_classes
    dist = s.label_distribution(f, site.labels) if has_labels else torch.zeros(0)
    total = max(int(dist.sum()), 1)
    html = site.env.get_template("feature.html.j2").render(
        title=f"feature {f}",
        crumbs=[(site.model_name, "../index.html"), (hook, "index.html")],
        hook=hook,
        f=row,
        examples=examples,
        hist_svg=hist_svg(s.hist[f]),
        spatial_svg=spatial_svg(s.spatial_map(f)),
        hist_range=f"10^{HIST_EDGES[0]:.0f} to 10^{HIST_EDGES[-1]:.0f}",
        label_bars=[(site.names[c], int(n), 100 * int(n) / total) for c, n in enumerate(dist.tolist()) if n],
        neighbours=neighbours,
        lens=top_bottom(lens, f, site.names) if lens is not None else None,
    )
    (d / f"f{f}.html").write_text(html)


@torch.no_grad()
def _image_page(site: _Site, saes: list[SAE], i: int) -> None:
    """``images/img{i}.html``: the image with the top three features of every SAE and their heatmaps."""
    from .plots import pyplot

    plt, model = pyplot(), site.model
    x = take(site.pixels, slice(i, i + 1))
    img = display_images(model, x)[0]
    rows = []
    fig, axes = plt.subplots(len(saes), 4, figsize=(6.4, 1.6 * len(saes)), squeeze=False)
    hooks = [sae.cfg.metadata.hook_name for sae in saes]
    _, cache = model.run_with_cache(x, names_filter=hooks, return_cache_object=False)  # one forward for all SAEs
    for r, sae in enumerate(saes):
        hook = sae.cfg.metadata.hook_name
        token_acts = sae.encode(cache[hook])[0]  # [pos, d_sae]; heatmaps below read it, no second forward
        acts = token_acts.amax(0)  # [d_sae]: max over tokens
        top = acts.topk(3)
        feats = [
            {"id": int(f), "value": float(v), "page": int(f) in site.page_ids[hook]}
            for v, f in zip(top.values, top.indices, strict=True)
        ]
        rows.append({"hook": hook, "dir": hook, "features": feats})
        axes[r, 0].imshow(img)
        axes[r, 0].set_title(hook.replace(".hook_", " "), fontsize=6)
        for c, feat in enumerate(feats, start=1):
            rows_, cols_ = model.grid_sizes[0]  # this image's own grid
            heat = token_acts[model.cfg.n_prefix_tokens :, feat["id"]][: rows_ * cols_].reshape(rows_, cols_).numpy()
            _overlay(axes[r, c], img, heat, float(heat.max()))
            axes[r, c].set_title(f"f{feat['id']} {feat['value']:.2f}", fontsize=6)
        for ax in axes[r]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(site.out / "images" / f"img{i}.png", dpi=90)
    plt.close(fig)
    pred = int(site.logits[i].argmax()) if site.logits.ndim == 2 else None
    html = site.env.get_template("image.html.j2").render(
        title=f"image {i}",
        crumbs=[(site.model_name, "../index.html")],
        image=i,
        label=site.names[int(site.labels[i])] if site.labels is not None else "",
        prediction=(site.names[pred] if pred is not None and pred < len(site.names) else pred),
        rows=rows,
    )
    (site.out / "images" / f"img{i}.html").write_text(html)
