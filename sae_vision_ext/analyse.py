"""``sae-vision analyse``: the feature analysis of every SAE of a model, as a report.

On an embedded shapes model (whose ground truth is known) it scores every feature against the
shapes attributes (``vis/analysis.py``), adds the logit lens (``circuits/evaluate/logit_lens.py``) and writes
into ``out``: ``analysis.md`` (per layer: live features, interpretable share, type mix; then per
feature its one-line label and top/bottom classes), ``labels.json`` (``{hook: {feature: label}}``,
read by ``build_dashboard(feature_labels=...)`` and the circuit exporter's clerps) and
``type_evolution.png``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ._hooks import layer_of


def run_analysis(
    model_id: str,
    sae_refs: list[str],
    out: str | Path,
    n_images: int = 512,
    seed: int = 31,
    *,
    threshold: float = 0.9,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the report (module docstring); returns ``{"analyses", "lens", "seconds", "table"}``."""
    from .circuits.evaluate.logit_lens import logit_lens
    from .data.shapes import SHAPES, make_shapes
    from .models import HookedViT
    from .saes.loading import load_sae
    from .vis.analysis import analyse_features, analysis_table, plot_type_evolution, shapes_attributes
    from .vis.lens import top_bottom

    if not model_id.startswith("sve:shapes"):
        raise ValueError(
            f"sae-vision analyse knows the ground truth of the embedded shapes models only; got {model_id!r}. "
            "For other models call sve.analyse_features(model, saes, pixels, attributes) with your own "
            "Attribute labels (docs/analysis.md)."
        )
    if not 0.5 < threshold <= 1.0:  # also refuses NaN; before any work
        raise ValueError(
            f"threshold must be in (0.5, 1] (the AUROC a feature's best attribute value must reach; 0.5 is "
            f"chance, 1 a perfect separation); got {threshold!r}."
        )
    data = make_shapes(n_images, seed=seed, balanced=True)
    _check_classes_present(data.labels, n_images, seed, len(SHAPES))
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"out={str(out)!r}: cannot create the report folder ({e}); pass a folder path.") from e
    model = HookedViT.from_pretrained(model_id)
    saes = sorted((load_sae(r) for r in sae_refs), key=lambda s: layer_of(s.cfg.metadata.hook_name))
    raw, _ = data.tensors()
    pixels = model.preprocess(raw)
    start = time.perf_counter()
    analyses = analyse_features(
        model,
        saes,
        pixels,
        shapes_attributes(data, model.cfg.grid_size, raw.shape[-1]),
        threshold=threshold,
        progress=progress,
    )
    seconds = time.perf_counter() - start
    lens = logit_lens(model, saes, pixels[:16])
    table = analysis_table(analyses)
    lines = [
        f"# Feature analysis of {model_id}",
        "",
        f"{n_images} balanced shapes images (seed {seed}), AUROC threshold {threshold}; analysis pass {seconds:.1f} s.",
        "",
        table,
        "",
        "## Interpretable features",
        "",
    ]
    labels: dict[str, dict[int, str]] = {}
    for hook, a in analyses.items():
        labels[hook] = {}
        for f, t in enumerate(a.types):
            if t in ("dead", "uninterpretable"):
                continue
            labels[hook][f] = a.label(f)
            up, down = top_bottom(lens[hook], f, SHAPES, k=2)
            lines.append(f"- {hook} #{f} ({t}): {a.label(f)}; logit lens up {', '.join(up)}, down {', '.join(down)}")
    (out / "analysis.md").write_text("\n".join(lines) + "\n")
    (out / "labels.json").write_text(json.dumps(labels, indent=1))
    plot_type_evolution(analyses, out / "type_evolution.png")
    return {"analyses": analyses, "lens": lens, "seconds": seconds, "table": table}


def _check_classes_present(labels: Any, n_images: int, seed: int, n_classes: int) -> None:
    """A class's AUROC needs images with it and without it: refuse ``n_images`` that miss a shape
    class, naming the smallest count that holds every class for this seed (found by rendering on)."""
    import numpy as np

    from .data.shapes import SHAPES, render_image

    missing = sorted(set(range(n_classes)) - {int(c) for c in np.asarray(labels)})
    if not missing:
        return
    seen, n = {int(c) for c in np.asarray(labels)}, n_images
    while len(seen) < n_classes and n < 100_000:
        seen.add(render_image(seed, n, balanced=True)[1])
        n += 1
    raise ValueError(
        f"--n-images {n_images}: the first {n_images} shapes images of seed {seed} miss the class(es) "
        f"{', '.join(SHAPES[c] for c in missing)}, so their AUROCs are undefined (an AUROC needs images with "
        f"and without the value). With seed {seed} the minimum is {n} images (at least {n_classes}, one per "
        f"class, for any seed); use --n-images {max(n, 64)} or more for stable AUROCs."
    )
