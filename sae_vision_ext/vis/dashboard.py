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
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .html import template_env
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


def _hist_svg(counts: Tensor) -> str:
    """Bars of the log10-activation histogram with its axes: bin edges below, the count scale left."""
    import markupsafe

    counts = counts.float()
    top = float(counts.max()) or 1.0
    w, h, left, bottom = 8, 80, 30, 18
    bars = "".join(
        f'<rect x="{left + i * w}" y="{h - (h - 2) * float(c) / top:.1f}" width="{w - 1}" '
        f'height="{(h - 2) * float(c) / top:.1f}" fill="#4c7fc0"><title>{int(c)}</title></rect>'
        for i, c in enumerate(counts)
    )
    ticks = "".join(
        f'<text x="{left + i * w}" y="{h + 13}" font-size="9" text-anchor="middle">1e{float(e):.0f}</text>'
        for i, e in enumerate(HIST_EDGES.tolist())
        if i % 5 == 0
    )
    axis = (
        f'<line x1="{left}" y1="{h}" x2="{left + w * len(counts)}" y2="{h}" stroke="#555"/>'
        f'<line x1="{left}" y1="0" x2="{left}" y2="{h}" stroke="#555"/>'
        f'<text x="{left - 3}" y="9" font-size="9" text-anchor="end">{int(top)}</text>'
        f'<text x="{left - 3}" y="{h}" font-size="9" text-anchor="end">0</text>'
    )
    width = left + w * len(counts) + 10
    return markupsafe.Markup(f'<svg width="{width}" height="{h + bottom}" role="img">{axis}{bars}{ticks}</svg>')


def _spatial_svg(m: Tensor, cell: int = 18) -> str:
    import markupsafe

    top = float(m.max()) if float(m.max()) > 0 else 1.0
    rects = []
    for r in range(m.shape[0]):
        for c in range(m.shape[1]):
            v = max(0.0, float(m[r, c]) / top)
            colour = f"rgb({int(255 - 200 * v)},{int(255 - 140 * v)},{int(255 - 40 * v)})"
            rects.append(f'<rect x="{c * cell}" y="{r * cell}" width="{cell}" height="{cell}" fill="{colour}"/>')
    w, h = m.shape[1] * cell, m.shape[0] * cell
    legend = "".join(
        f'<rect x="{w + 8}" y="{h - (i + 1) * h / 10:.1f}" width="10" height="{h / 10 + 0.5:.1f}" '
        f'fill="rgb({int(255 - 20 * i)},{int(255 - 14 * i)},{int(255 - 4 * i)})"/>'
        for i in range(10)
    )
    legend += (
        f'<text x="{w + 21}" y="9" font-size="9">{top:.3g}</text><text x="{w + 21}" y="{h}" font-size="9">0</text>'
    )
    return markupsafe.Markup(f'<svg width="{w + 60}" height="{h}">{"".join(rects)}{legend}</svg>')


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


def build_dashboard(
    model: HookedViT,
    saes: Sequence[SAE],
    pixels: Tensor,
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
    from ``circuits.logit_lens``) adds each page's top and bottom classes; ``feature_labels``
    (``{hook: {feature: label}}``, e.g. ``labels.json`` of ``sae-vision analyse``) a one-line label on
    pages and in the tables. The table lists every live feature.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    saes = list(saes)
    stats = stats or collect_feature_stats(model, saes, pixels, labels, top_k=top_k, progress=progress)
    n_classes = next(iter(stats.values())).n_classes
    names = list(label_names) if label_names is not None else [str(i) for i in range(max(n_classes, 1))]
    env = template_env()
    model_name = model.cfg.model_name
    crumbs_root = [(model_name, "../index.html")]
    summary, kinds_by_hook, page_ids = [], {}, {}
    with torch.no_grad():
        logits = torch.cat([model(pixels[i : i + 128]) for i in range(0, len(pixels), 128)])
    image_ids = list(range(min(n_image_pages, len(pixels))))
    choices = {
        sae.cfg.metadata.hook_name: choose_feature_pages(
            stats[sae.cfg.metadata.hook_name],
            n_feature_pages,
            (extra_features or {}).get(sae.cfg.metadata.hook_name, ()),
        )
        for sae in saes
    }
    n_pages = sum(len(c) for c in choices.values()) + min(n_image_pages, len(pixels))
    bar = tqdm(total=n_pages, desc="dashboard", unit="page", disable=not progress)
    for sae in saes:
        hook = sae.cfg.metadata.hook_name
        s = stats[hook]
        s.save(out / "stats")
        d = out / hook
        d.mkdir(exist_ok=True)
        kinds = feature_kinds(s)
        kinds_by_hook[hook] = kinds
        rows = _feature_rows(s, kinds, labels, names)
        reasons = choices[hook]
        hook_labels = {int(k): v for k, v in (feature_labels or {}).get(hook, {}).items()}
        for row in rows:
            row["page"] = row["id"] in reasons
            row["reasons"] = reasons.get(row["id"], [])
            row["label"] = hook_labels.get(row["id"], "")
        page_ids[hook] = set(reasons)
        paged = sorted((r for r in rows if r["page"]), key=lambda r: list(reasons).index(r["id"]))
        plot_spatial_maps(s, d / "spatial.png")
        w_dec = torch.nn.functional.normalize(sae.W_dec.detach().float(), dim=-1)
        image_labels = [names[int(c)] for c in labels] if labels is not None else None
        for row in paged:
            f = row["id"]
            examples = [
                {
                    "value": v,
                    "image": i,
                    "token": t,
                    "page": i in image_ids,
                    "label": image_labels[i] if image_labels is not None else "",
                }
                for v, i, t in s.top_examples(f)
            ]
            plot_top_patches(s, f, pixels, d / f"f{f}.png", model, sae=sae, labels=image_labels)
            lens = None
            if logit_lens is not None and hook in logit_lens:
                lens = top_bottom(logit_lens[hook], f, names)
            cos = w_dec @ w_dec[f]
            cos[f] = -2
            neighbours = [
                {"id": int(j), "cos": float(cos[j]), "page": int(j) in page_ids[hook]} for j in cos.topk(5).indices
            ]
            dist = s.label_distribution(f, labels) if labels is not None and n_classes else torch.zeros(0)
            total = max(int(dist.sum()), 1)
            label_bars = [(names[c], int(n), 100 * int(n) / total) for c, n in enumerate(dist.tolist()) if n]
            html = env.get_template("feature.html.j2").render(
                title=f"feature {f}",
                crumbs=[*crumbs_root, (hook, "index.html")],
                hook=hook,
                f=row,
                examples=examples,
                hist_svg=_hist_svg(s.hist[f]),
                spatial_svg=_spatial_svg(s.spatial_map(f)),
                hist_range=f"10^{HIST_EDGES[0]:.0f} to 10^{HIST_EDGES[-1]:.0f}",
                label_bars=label_bars,
                neighbours=neighbours,
                lens=lens,
            )
            (d / f"f{f}.html").write_text(html)
            bar.update(1)
        (d / "index.html").write_text(
            env.get_template("sae.html.j2").render(
                title=hook,
                crumbs=[(model_name, "../index.html")],
                hook=hook,
                features=rows,
                alive=len(rows),
                d_sae=s.d_sae,
                n_images=s.n_images,
            )
        )
        summary.append(
            {
                "hook": hook,
                "dir": hook,
                "d_sae": s.d_sae,
                "alive": len(rows),
                "dead": s.d_sae - len(rows),
                "pages": len(paged),
            }
        )
    plot_density_histograms(stats, out / "density.png")
    plot_layer_evolution(kinds_by_hook, out / "layer_evolution.png")
    (out / "images").mkdir(exist_ok=True)
    for i in image_ids:
        _image_page(
            env,
            model,
            saes,
            pixels,
            i,
            out=out,
            names=names,
            labels=labels,
            logits=logits,
            page_ids=page_ids,
            crumbs_root=crumbs_root,
        )
        bar.update(1)
    bar.close()
    index = out / "index.html"
    index.write_text(
        env.get_template("index.html.j2").render(
            title="index", crumbs=[], model_name=model_name, n_images=len(pixels), saes=summary, image_pages=image_ids
        )
    )
    return index


@torch.no_grad()
def _image_page(env, model, saes, pixels, i, *, out, names, labels, logits, page_ids, crumbs_root) -> None:
    from .plots import pyplot

    plt = pyplot()
    x = pixels[i : i + 1]
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
            {"id": int(f), "value": float(v), "page": int(f) in page_ids[hook]}
            for v, f in zip(top.values, top.indices, strict=True)
        ]
        rows.append({"hook": hook, "dir": hook, "features": feats})
        axes[r, 0].imshow(img)
        axes[r, 0].set_title(hook.replace(".hook_", " "), fontsize=6)
        for c, feat in enumerate(feats, start=1):
            heat = token_acts[model.cfg.n_prefix_tokens :, feat["id"]].reshape(*model.cfg.grid_size).numpy()
            _overlay(axes[r, c], img, heat, float(heat.max()))
            axes[r, c].set_title(f"f{feat['id']} {feat['value']:.2f}", fontsize=6)
        for ax in axes[r]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "images" / f"img{i}.png", dpi=90)
    plt.close(fig)
    pred = int(logits[i].argmax()) if logits.ndim == 2 else None
    html = env.get_template("image.html.j2").render(
        title=f"image {i}",
        crumbs=[(crumbs_root[0][0], "../index.html")],
        image=i,
        label=names[int(labels[i])] if labels is not None else "",
        prediction=(names[pred] if pred is not None and pred < len(names) else pred),
        rows=rows,
    )
    (out / "images" / f"img{i}.html").write_text(html)
