"""The HTML side of the visualisers: one Jinja environment over ``vis/templates`` (autoescaped) and
the inline SVG figures the pages embed.

The dashboard (``vis/dashboard.py``) and the graph viewer (``circuits/graph/viewer.py``) render with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import jinja2
    import markupsafe
    from torch import Tensor


def template_env() -> jinja2.Environment:
    """A ``jinja2.Environment`` loading this package's templates, HTML autoescaped."""
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("sae_vision_ext.vis", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
    )


def hist_svg(counts: Tensor) -> markupsafe.Markup:
    """Bars of the log10-activation histogram (``FeatureStats.hist`` over ``HIST_EDGES``) with its
    axes: bin edges below, the count scale left."""
    import markupsafe

    from .stats import HIST_EDGES

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


def spatial_svg(m: Tensor, cell: int = 18) -> markupsafe.Markup:
    """A feature's mean activation per patch as a grid of cells, with its colour scale."""
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
