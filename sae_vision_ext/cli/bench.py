"""``sae-vision bench``: ViSAEBench's metrics of SAEs on a model (``saes/benchmark.py``), a table on
stdout, ``bench.md``, ``bench.json`` and ``radar.png`` in ``--out``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._shared import _load_images, _sae_refs, _step


def add_bench_command(sub: argparse._SubParsersAction, n_images_type: object) -> None:
    """Register ``bench`` (called by the parser in ``cli/__init__.py``)."""
    from ..saes.benchmark import METRICS

    p = sub.add_parser("bench", help="ViSAEBench's metrics of SAEs: table, JSON and radar plot (offline on sve:)")
    p.add_argument("--model", default="sve:shapes-vit", help="model id, e.g. sve:shapes-vit")
    p.add_argument(
        "--saes", default="sve", help="'sve' (the model's shipped SAEs), a folder of SAE folders, or refs a,b,c"
    )
    p.add_argument("--dataset", default="sve:shapes", help="image source with labels (sve:shapes, an image folder)")
    p.add_argument("--n-images", type=n_images_type, default=256, help="images the metrics run on")
    p.add_argument("--seed", type=int, default=4242, help="image seed for sve:shapes sources")
    p.add_argument("--metrics", default="all", help=f"'all' or comma-separated ViSAEBench keys: {','.join(METRICS)}")
    p.add_argument(
        "--evaluator",
        default="none",
        help="M5's second backbone, a model other than --model (e.g. sve:shapes-vit-biased); none: M5 skipped",
    )
    p.add_argument(
        "--ood", default="none", help="M6's out-of-domain image source (e.g. sve:shapes-marker); none: M6 skipped"
    )
    p.add_argument("--ood-images", type=n_images_type, default=128, help="images of the --ood source")
    p.add_argument(
        "--groups",
        choices=("auto", "none"),
        default="auto",
        help="M7's class hierarchy: auto = one parent of all the data set's named classes; none: M7 skipped",
    )
    p.add_argument("--out", default="bench", help="folder for bench.md, bench.json and radar.png")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from ..models import HookedViT
    from ..saes.benchmark import METRICS, benchmark_sae, import_visaebench, metric_keys
    from ..saes.benchmark_report import format_table, plot_radar
    from ..saes.loading import load_sae

    metrics = list(METRICS) if args.metrics == "all" else metric_keys(args.metrics.split(","))
    import_visaebench()  # the extra's absence fails here, before any model loads
    model = HookedViT.from_pretrained(args.model)
    evaluator = None if args.evaluator == "none" else HookedViT.from_pretrained(args.evaluator)
    refs = _sae_refs(args.saes, args.model, model.cfg.n_layers)
    pixels, labels, names = _load_images(model, args.dataset, args.n_images, args.seed)
    ood = None
    if args.ood != "none":
        ood_pixels, ood_labels, _ = _load_images(model, args.ood, args.ood_images, args.seed + 1)
        if ood_labels is None:
            raise ValueError(f"--ood {args.ood!r} has no labels; M6 needs one class id per image.")
        ood = {args.ood: (ood_pixels, ood_labels)}
    groups = None
    if args.groups == "auto" and names:
        groups = {"all classes": list(range(len(names)))}
    results = []
    for ref in refs:
        _step(f"bench {ref}")
        sae = load_sae(ref)
        results.append(
            benchmark_sae(model, sae, pixels, labels, metrics, evaluator=evaluator, ood=ood, sibling_groups=groups)
        )
    titles = [r.hook_name for r in results]
    table = format_table(results, titles)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = f"ViSAEBench metrics of {args.model} SAEs on {len(pixels)} {args.dataset} images (patch tokens)"
    (out / "bench.md").write_text(f"{header}\n\n{table}\n")
    (out / "bench.json").write_text(json.dumps([r.to_dict() for r in results], indent=2, default=str))
    radar = None
    ran = [r for r in results[0].rows if r.value is not None]
    if len(ran) >= 3:
        radar = plot_radar(results, out / "radar.png", titles, title=f"ViSAEBench: {args.model}")
    print(f"{header}\n\n{table}\n")
    print(
        f"written: {out / 'bench.md'}, {out / 'bench.json'}"
        + (f", {radar}" if radar else " (no radar: < 3 metrics ran)")
    )
    return 0
