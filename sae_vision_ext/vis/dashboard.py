"""``build_dashboard``: static, offline HTML dashboards for SAE features (Jinja2, no CDN, no server).

Layout under ``out_dir``::

    index.html                 SAEs, layer evolution of feature kinds, density histograms, image links
    <hook>/index.html          sortable table of live features (kind, densities, max, selectivity, CLS share)
    <hook>/f<id>.html + .png   top images with true heatmaps and crops, histogram, spatial map,
                               label distribution, neighbours by decoder cosine
    images/img<i>.html + .png  one image with the strongest features of every layer and their heatmaps
    stats/<hook>/              the FeatureStats (rebuild without recomputing: pass ``stats=``)

Numbers on feature pages come from the streaming statistics; each top-image row carries
``data-image``/``data-token`` so a test can recompute the activation (``tests/test_dashboard.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .html import template_env
from .plots import (
    display_images,
    feature_kinds,
    plot_density_histograms,
    plot_layer_evolution,
    plot_spatial_maps,
    plot_top_patches,
)
from .stats import HIST_EDGES, FeatureStats, collect_feature_stats


def _hist_svg(counts: Tensor) -> str:
    import markupsafe

    counts = counts.float()
    top = float(counts.max()) or 1.0
    w = 8
    bars = "".join(
        f'<rect x="{i * w}" y="{80 - 78 * float(c) / top:.1f}" width="{w - 1}" height="{78 * float(c) / top:.1f}" '
        f'fill="#4c7fc0"/>'
        for i, c in enumerate(counts)
    )
    return markupsafe.Markup(f'<svg width="{w * len(counts)}" height="80" role="img">{bars}</svg>')


def _spatial_svg(m: Tensor, cell: int = 18) -> str:
    import markupsafe

    top = float(m.max()) if float(m.max()) > 0 else 1.0
    rects = []
    for r in range(m.shape[0]):
        for c in range(m.shape[1]):
            v = max(0.0, float(m[r, c]) / top)
            colour = f"rgb({int(255 - 200 * v)},{int(255 - 140 * v)},{int(255 - 40 * v)})"
            rects.append(f'<rect x="{c * cell}" y="{r * cell}" width="{cell}" height="{cell}" fill="{colour}"/>')
    return markupsafe.Markup(f'<svg width="{m.shape[1] * cell}" height="{m.shape[0] * cell}">{"".join(rects)}</svg>')


def _feature_rows(s: FeatureStats, kinds: list[str], labels: Tensor | None, names: Sequence[str]) -> list[dict]:
    rows = []
    for f in torch.argsort(s.fire_images, descending=True).tolist():
        if s.fire_tokens[f] == 0:
            continue
        top_label = ""
        if labels is not None and s.n_classes:
            dist = s.label_distribution(f, labels)
            top_label = names[int(dist.argmax())] if int(dist.sum()) else ""
        rows.append({
            "id": f, "kind": kinds[f], "density": float(s.density_tokens[f]),
            "image_density": float(s.density_images[f]), "max_act": float(s.max_act[f]),
            "mean_act": float(s.mean_act[f]), "selectivity": float(s.class_selectivity[f]),
            "cls_share": float(s.cls_share[f]), "top_label": top_label, "page": False,
        })  # fmt: skip
    return rows


def build_dashboard(
    model: Any,
    saes: Sequence[Any],
    pixels: Tensor,
    out_dir: str | Path,
    labels: Tensor | None = None,
    label_names: Sequence[str] | None = None,
    top_k: int = 8,
    n_feature_pages: int = 16,
    n_image_pages: int = 8,
    stats: dict[str, FeatureStats] | None = None,
    progress: bool = True,
) -> Path:
    """Write the dashboard for ``saes`` on the preprocessed ``pixels``; returns ``out_dir/index.html``.

    Feature pages are written for the ``n_feature_pages`` live features of each SAE that fire on
    the most images; the table lists every live feature.
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
    bar = tqdm(total=len(saes) * n_feature_pages + n_image_pages, desc="dashboard", unit="page", disable=not progress)
    for sae in saes:
        hook = sae.cfg.metadata.hook_name
        s = stats[hook]
        s.save(out / "stats")
        d = out / hook
        d.mkdir(exist_ok=True)
        kinds = feature_kinds(s)
        kinds_by_hook[hook] = kinds
        rows = _feature_rows(s, kinds, labels, names)
        for row in rows[:n_feature_pages]:
            row["page"] = True
        page_ids[hook] = {r["id"] for r in rows if r["page"]}
        plot_spatial_maps(s, d / "spatial.png")
        w_dec = torch.nn.functional.normalize(sae.W_dec.detach().float(), dim=-1)
        for row in rows[:n_feature_pages]:
            f = row["id"]
            examples = [{"value": v, "image": i, "token": t, "page": i in image_ids,
                         "label": names[int(labels[i])] if labels is not None else ""}
                        for v, i, t in s.top_examples(f)]  # fmt: skip
            plot_top_patches(s, f, pixels, d / f"f{f}.png", model, sae, labels=[e["label"] for e in examples])
            cos = w_dec @ w_dec[f]
            cos[f] = -2
            neighbours = [{"id": int(j), "cos": float(cos[j]), "page": int(j) in page_ids[hook]}
                          for j in cos.topk(5).indices]  # fmt: skip
            dist = s.label_distribution(f, labels) if labels is not None and n_classes else torch.zeros(0)
            total = max(int(dist.sum()), 1)
            label_bars = [(names[c], int(n), 100 * int(n) / total) for c, n in enumerate(dist.tolist()) if n]
            html = env.get_template("feature.html.j2").render(
                title=f"feature {f}", crumbs=[*crumbs_root, (hook, "index.html")], hook=hook, f=row,
                examples=examples, hist_svg=_hist_svg(s.hist[f]), spatial_svg=_spatial_svg(s.spatial_map(f)),
                hist_range=f"10^{HIST_EDGES[0]:.0f} to 10^{HIST_EDGES[-1]:.0f}", label_bars=label_bars,
                neighbours=neighbours,
            )  # fmt: skip
            (d / f"f{f}.html").write_text(html)
            bar.update(1)
        (d / "index.html").write_text(env.get_template("sae.html.j2").render(
            title=hook, crumbs=[(model_name, "../index.html")], hook=hook, features=rows, alive=len(rows),
            d_sae=s.d_sae, n_images=s.n_images))  # fmt: skip
        summary.append({"hook": hook, "dir": hook, "d_sae": s.d_sae, "alive": len(rows), "dead": s.d_sae - len(rows),
                        "pages": min(n_feature_pages, len(rows))})  # fmt: skip
    plot_density_histograms(stats, out / "density.png")
    plot_layer_evolution(kinds_by_hook, out / "layer_evolution.png")
    (out / "images").mkdir(exist_ok=True)
    for i in image_ids:
        _image_page(env, model, saes, pixels, i, out, names, labels, logits, page_ids, crumbs_root)
        bar.update(1)
    bar.close()
    index = out / "index.html"
    index.write_text(env.get_template("index.html.j2").render(
        title="index", crumbs=[], model_name=model_name, n_images=len(pixels), saes=summary,
        image_pages=image_ids))  # fmt: skip
    return index


@torch.no_grad()
def _image_page(env, model, saes, pixels, i, out, names, labels, logits, page_ids, crumbs_root) -> None:
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
        feats = [{"id": int(f), "value": float(v), "page": int(f) in page_ids[hook]}
                 for v, f in zip(top.values, top.indices, strict=True)]  # fmt: skip
        rows.append({"hook": hook, "dir": hook, "features": feats})
        axes[r, 0].imshow(img)
        axes[r, 0].set_title(hook.replace(".hook_", " "), fontsize=6)
        for c, feat in enumerate(feats, start=1):
            heat = token_acts[model.cfg.n_prefix_tokens :, feat["id"]].reshape(*model.cfg.grid_size).numpy()
            h, w = img.shape[:2]
            axes[r, c].imshow(img)
            axes[r, c].imshow(np.ma.masked_where(heat <= 0, heat), cmap="magma", alpha=0.6, extent=(0, w, h, 0))
            axes[r, c].set_title(f"f{feat['id']} {feat['value']:.2f}", fontsize=6)
        for ax in axes[r]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "images" / f"img{i}.png", dpi=90)
    plt.close(fig)
    pred = int(logits[i].argmax()) if logits.ndim == 2 else None
    html = env.get_template("image.html.j2").render(
        title=f"image {i}", crumbs=[(crumbs_root[0][0], "../index.html")], image=i,
        label=names[int(labels[i])] if labels is not None else "",
        prediction=(names[pred] if pred is not None and pred < len(names) else pred), rows=rows,
    )  # fmt: skip
    (out / "images" / f"img{i}.html").write_text(html)
