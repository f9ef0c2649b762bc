"""Tables and the radar plot of :func:`~sae_vision_ext.saes.benchmark.benchmark_sae` results.

The radar has one axis per metric that ran (skipped ones are left off and named under the plot),
each on a 0-1 "higher is better" scale: ``fvu`` as ``1 - fvu`` (explained variance), ``absorption``
as ``1 - rate``, ``downstream_preservation`` (a ratio in [0, 2]) capped at 1, Moran's I
(``localization``) and monosemanticity (a mean cosine) clipped to [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .benchmark import BenchmarkResult, MetricRow

SHORT = {
    "localization": "M1 localization",
    "fvu": "M2 FVU",
    "downstream_preservation": "M3 downstream",
    "sparse_probing": "M4 sparse probing",
    "monosemanticity": "M5 monosemanticity",
    "cross_domain": "M6 cross-domain",
    "absorption": "M7 absorption",
}


def radar_value(row: MetricRow) -> float:
    """``row``'s value on the radar's 0-1, higher-is-better scale (module docstring)."""
    if row.value is None:
        raise ValueError(f"{row.key} was skipped ({row.skipped}); it has no radar value.")
    v = float(row.value)
    if not row.higher_is_better:
        v = 1.0 - v
    return min(max(v, 0.0), 1.0)


def format_table(results: Sequence[BenchmarkResult], names: Sequence[str] | None = None) -> str:
    """A markdown table: one row per metric, one column per result (``names``: column titles, default
    the hook names); skipped metrics say ``skipped`` (the reasons follow the table), metrics a result
    did not request ``not run``."""
    names = list(names) if names is not None else [r.hook_name for r in results]
    if len(names) != len(results):
        raise ValueError(f"names: {len(names)} titles for {len(results)} results.")
    rows = {row.key: row for res in reversed(results) for row in res.rows}
    keys = [k for k in SHORT if k in rows]
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    reasons: dict[str, str] = {}
    for key in keys:
        cells = []
        for res in results:
            row = next((r for r in res.rows if r.key == key), None)
            if row is None:
                cells.append("not run")
            elif row.value is None:
                cells.append("skipped")
                reasons[key] = row.skipped or ""
            else:
                cells.append(f"{row.value:.4f}")
        arrow = "↑" if rows[key].higher_is_better else "↓"
        lines.append(f"| {SHORT.get(key, key)} {arrow} | " + " | ".join(cells) + " |")
    for key, why in reasons.items():
        lines.append(f"\n{SHORT.get(key, key)} skipped: {why}.")
    return "\n".join(lines)


def plot_radar(
    results: Sequence[BenchmarkResult], path: str | Path, names: Sequence[str] | None = None, title: str = "ViSAEBench"
) -> Path:
    """One polygon per result over the metrics that ran in all of them; a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(names) if names is not None else [r.hook_name for r in results]
    keys = [row.key for row in results[0].rows if all(r.row(row.key).value is not None for r in results)]
    if len(keys) < 3:
        raise ValueError(f"a radar needs at least 3 metrics that ran; got {keys}.")
    angles = np.linspace(0, 2 * np.pi, len(keys), endpoint=False).tolist()
    fig, ax = plt.subplots(figsize=(6.5, 6.5), subplot_kw={"projection": "polar"})
    for res, name in zip(results, names, strict=True):
        vals = [radar_value(res.row(k)) for k in keys]
        ax.plot([*angles, angles[0]], [*vals, vals[0]], linewidth=1.5, label=name)
        ax.fill([*angles, angles[0]], [*vals, vals[0]], alpha=0.08)
    ax.set_xticks(angles)
    ax.set_xticklabels([SHORT.get(k, k) for k in keys], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title(title, pad=18)
    ax.legend(loc="upper right", bbox_to_anchor=(1.3, 1.12), fontsize=7)
    skipped = [SHORT.get(row.key, row.key) for row in results[0].rows if row.key not in keys]
    note = "1-FVU, 1-absorption; others clipped to [0, 1]"
    if skipped:
        note += "; skipped: " + ", ".join(skipped)
    fig.text(0.5, 0.02, note, ha="center", fontsize=7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
