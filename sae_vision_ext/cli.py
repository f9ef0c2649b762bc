"""``sae-vision``: command-line entry point.

sae-vision models                   adapters, model sources and embedded models
sae-vision hooks MODEL              every hook name with its shape for one image
sae-vision saes                     checkpoint formats, public releases, embedded SAEs
sae-vision cache | train            harvest into the on-disk cache | train one SAE per hook
sae-vision eval                     SAEs spliced into a model: reconstruction and output metrics
sae-vision dashboard                offline HTML pages of SAE features
sae-vision faithfulness | trace     replacement model vs model | attribution graph of one image
sae-vision demo                     the main job on the embedded shapes model (no download)

Many processes: `torchrun --nproc_per_node=N -m sae_vision_ext.cli cache|train ...` (each process
takes its share: cache shards by rank, SAEs by hook; see docs/scaling.md). `--distributed` insists
on torchrun's environment.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ._errors import TrainingInterrupted


def _step(message: str) -> None:
    """One progress line on stderr (stdout keeps the results)."""
    print(f"[sae-vision] {message}...", file=sys.stderr, flush=True)


def _cmd_models(args: argparse.Namespace) -> int:
    from .models import LOADERS, list_adapters, list_embedded_models

    print("Adapters (HookedViT.from_model accepts these module types):")
    for a in list_adapters():
        print(f"  {a['name']:<16} {', '.join(a['supported_types'])}")
    print("\nModel sources for HookedViT.from_pretrained('<source>:<name>'):")
    print("  " + ", ".join(LOADERS.names()))
    print("\nEmbedded models (no download):")
    for name, desc in list_embedded_models().items():
        print(f"  sve:{name:<20} {desc}")
    return 0


def _cmd_hooks(args: argparse.Namespace) -> int:
    from .models import HookedViT

    model = HookedViT.from_pretrained(args.model, pretrained=not args.random)
    shapes = model.hook_shapes(batch_size=1)
    width = max(len(n) for n in shapes)
    print(f"{args.model}: {len(shapes)} hook points, shapes for one {model.cfg.image_size} image")
    for name, shape in shapes.items():
        print(f"  {name:<{width}}  {list(shape)}")
    return 0


_CONFIG_FLAGS = {
    "model_name": str,
    "hook_names": str,
    "dataset": str,
    "n_images": int,
    "token_selection": str,
    "architecture": str,
    "k": int,
    "expansion_factor": float,
    "training_tokens": int,
    "train_batch_size": int,
    "lr": float,
    "output_dir": str,
    "cache_dir": str,
    "cache_dtype": str,
    "device": str,
    "seed": int,
    "init_seed": int,
}


def _training_config(args: argparse.Namespace):
    from .training.config import VisionSAETrainingConfig

    base = VisionSAETrainingConfig.from_file(args.config).to_dict() if args.config else {}
    for key in _CONFIG_FLAGS:
        value = getattr(args, key, None)
        if value is not None:
            base[key] = value
    if args.layers:
        base["layers"] = [int(v) for v in args.layers.split(",")]
    return VisionSAETrainingConfig.from_dict(base)


def _cmd_cache(args: argparse.Namespace) -> int:
    from .activations.cache import CachedActivations, build_cache, cache_root
    from .activations.harvest import resolve_hook_names
    from .data.sources import open_image_source
    from .models import HookedViT
    from .training.train import cache_settings

    cfg = _training_config(args)
    if cfg.cache_dir is None:
        raise ValueError("Give --cache-dir (or cache_dir in the config) for `sae-vision cache`.")
    rank, _ = _join_process_group(args)
    model = HookedViT.from_pretrained(cfg.model_name, device=cfg.device)
    dataset = open_image_source(cfg.dataset, model.preprocess, cfg.n_images, cfg.seed)
    hooks = resolve_hook_names(cfg.hook_names, model.cfg.n_layers, cfg.layers)
    settings = cache_settings(cfg, hooks, len(dataset))
    root = cache_root(cfg.cache_dir, settings)
    if args.verify and (root / settings.key / "metadata.json").exists():
        problems = CachedActivations(root / settings.key, verify=True).verify_shards(remove=True)
        for problem in problems:
            print(f"removed: {problem}")
        print(
            f"verified {root / settings.key}: {len(problems)} bad shard(s) removed"
            + (", rewriting" if problems else "")
        )
    folder = build_cache(model, dataset, settings, root, cfg.num_workers, cfg.image_batch_size)
    if rank == 0:
        print(f"cache ready: {folder}")
    return 0


def _join_process_group(args: argparse.Namespace) -> tuple[int, int]:
    """Join torchrun's process group when launched by it (or insist on it with --distributed)."""
    from .distributed import init_from_env, require_launcher

    return require_launcher() if args.distributed else init_from_env()


def _given_any_config(args: argparse.Namespace) -> bool:
    return bool(args.config or args.layers or any(getattr(args, key, None) is not None for key in _CONFIG_FLAGS))


def _cmd_train(args: argparse.Namespace) -> int:
    import json

    from .training.train import train_saes

    cfg = _training_config(args)
    if not (_given_any_config(args) or args.yes or args.resume):
        print("No config given. `sae-vision train` would run these defaults (all fields of VisionSAETrainingConfig):")
        print(json.dumps(cfg.to_dict(), indent=1))
        print("Run them with `sae-vision train --yes`, or pass --config FILE.yaml and/or flags (see --help).")
        return 2
    rank, _ = _join_process_group(args)
    saes = train_saes(cfg, resume=args.resume)
    if rank == 0:
        for hook in saes:
            print(f"saved {hook} -> {cfg.output_dir}/{hook}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .models import HookedViT
    from .saes.evaluate import evaluate_sae, format_eval_table
    from .saes.loading import load_sae

    model = HookedViT.from_pretrained(args.model)
    images, labels, _ = _load_images(model, args.dataset, args.n_images, args.seed)
    for ref in args.sae:
        sae = load_sae(ref, hook_name=args.hook_name)
        out = None if args.out is None else f"{args.out}/{sae.cfg.metadata.hook_name}.json"
        metrics = evaluate_sae(model, sae, images, labels, out_path=out, progress=True)
        print(f"\n## {ref}\n\n{format_eval_table(metrics)}")
    return 0


def _load_images(model, dataset: str, n_images: int, seed: int):
    """Preprocessed images (and labels for sve:shapes sets) for eval and dashboard commands."""
    import torch

    from .data.shapes import SHAPES, make_shapes
    from .data.sources import open_image_source

    if dataset in ("sve:shapes", "sve:shapes-marker"):
        raw, labels = make_shapes(n_images, seed=seed, balanced=dataset.endswith("marker")).tensors()
        return model.preprocess(raw), labels, SHAPES
    ds = open_image_source(dataset, model.preprocess, n_images, seed)
    return torch.stack([ds[i] for i in range(min(n_images, len(ds)))]), None, None


def _sae_refs(spec: str, model_id: str, n_layers: int) -> list[str]:
    """``sve`` (the shipped SAEs of an embedded model), a folder of SAE folders, or comma-separated refs."""
    from pathlib import Path

    if spec == "sve":
        return [f"{model_id}/blocks.{layer}.hook_resid_post" for layer in range(n_layers)]
    path = Path(spec)
    if path.is_dir() and not (path / "cfg.json").exists():
        refs = sorted(str(p.parent) for p in path.glob("*/cfg.json"))
        if not refs:
            raise ValueError(f"No SAE folders (cfg.json) inside {path}.")
        return refs
    return spec.split(",")


def _read_labels(path: str | None) -> dict[str, dict[int, str]] | None:
    """``labels.json`` of ``sae-vision analyse``: ``{hook: {feature: label}}``."""
    if path is None:
        return None
    import json

    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(
            f"--labels {path!r}: not a readable labels.json ({e}); write one with sae-vision analyse."
        ) from e
    return {hook: {int(f): label for f, label in feats.items()} for hook, feats in raw.items()}


def _cmd_analyse(args: argparse.Namespace) -> int:
    from .analyse import run_analysis
    from .models.embedded import embedded_metadata

    n_layers = (
        embedded_metadata(args.model.removeprefix("sve:"))["arch"]["depth"] if args.model.startswith("sve:") else 0
    )
    report = run_analysis(args.model, _sae_refs(args.saes, args.model, n_layers), args.out, args.n_images, args.seed,
                          args.threshold)  # fmt: skip
    print(report["table"])
    print(f"analysis pass {report['seconds']:.1f} s; report: {(Path(args.out) / 'analysis.md').resolve()}")
    return 0


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from .models import HookedViT
    from .saes.loading import load_sae
    from .vis.dashboard import build_dashboard

    model = HookedViT.from_pretrained(args.model)
    saes = [load_sae(r) for r in _sae_refs(args.saes, args.model, model.cfg.n_layers)]
    saes.sort(key=lambda s: s.cfg.metadata.hook_name)
    pixels, labels, names = _load_images(model, args.dataset, args.n_images, args.seed)
    lens = None
    if model.adapter.output_kind() == "logits":
        from .circuits.logit_lens import logit_lens

        _step("logit lens of every feature (16 reference images)")
        try:
            lens = logit_lens(model, saes, pixels[:16])
        except ValueError as e:  # SAEs off the residual stream, or a readout that is not affine
            print(f"no logit lens: {e}", file=sys.stderr)
        if names is None and model.cfg.class_names:
            names = list(model.cfg.class_names)
    _step("feature statistics and pages")
    index = build_dashboard(model, saes, pixels, args.out, labels=labels, label_names=names, top_k=args.top_k,
                            n_feature_pages=args.feature_pages, n_image_pages=args.image_pages,
                            logit_lens=lens, feature_labels=_read_labels(args.labels))  # fmt: skip
    print(f"dashboard written: {index.resolve()}")
    return 0


def _rrm(args: argparse.Namespace):
    from .circuits.replacement import ResidualReplacementModel
    from .models import HookedViT
    from .saes.loading import load_sae

    model = HookedViT.from_pretrained(args.model)
    return ResidualReplacementModel(model, [load_sae(r) for r in _sae_refs(args.saes, args.model, model.cfg.n_layers)])


def _cmd_faithfulness(args: argparse.Namespace) -> int:
    rrm = _rrm(args)
    pixels, labels, _ = _load_images(rrm.model, args.dataset, args.n_images, args.seed)
    rows = rrm.faithfulness(pixels, labels, progress=True)
    keys = [k for k in rows[0] if k != "n_spliced"]
    print("layers spliced (no error terms) | " + " | ".join(keys))
    for row in rows:
        print(f"{row['n_spliced']:>31} | " + " | ".join(f"{row[k]:.4f}" for k in keys))
    return 0


def _cmd_trace(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    _step("loading the model and its SAEs")
    rrm = _rrm(args)
    model = rrm.model
    if args.image:
        from PIL import Image

        with Image.open(args.image) as im:
            pixels = model.preprocess(im.convert("RGB"))[None]
    else:
        pixels, _, _ = _load_images(model, "sve:shapes", args.shapes_index + 1, args.seed)
        pixels = pixels[args.shapes_index : args.shapes_index + 1]
    _step("attributing (one row per active feature)")
    graph = rrm.attribute(
        pixels, target=args.target, max_feature_nodes=args.max_feature_nodes, mlp_leaves=args.mlp_leaves, progress=True
    )
    _step(f"pruning {graph.n_nodes} nodes, {graph.adjacency._nnz()} edges")
    pruned = graph.prune(args.node_threshold, args.edge_threshold)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from .circuits.viewer import render_graph_html

    stats = ref = None
    if args.reference_images > 0:  # top patches per feature in the viewer, from a reference set
        from .vis.stats import collect_feature_stats

        ref, _, _ = _load_images(model, "sve:shapes", args.reference_images, args.seed + 1)
        stats = collect_feature_stats(model, rrm.saes, ref, top_k=4, progress=True)
    slug = Path(args.image).stem if args.image else f"shapes-{args.shapes_index}"
    _step("writing circuit-tracer's files and the viewer")
    labels = {
        (int(h.split(".")[1]), f): v for h, fs in (_read_labels(args.labels) or {}).items() for f, v in fs.items()
    }
    exported = pruned.to_json(out / "circuit-tracer" / f"{slug}.json", rrm=rrm, stats=stats, images=ref,
                              feature_labels=labels)  # fmt: skip
    render_graph_html(pruned, out / "graph.html", rrm, pixels, stats=stats, images=ref, feature_labels=labels)
    from .circuits.graph_ops import node_influence

    infl = node_influence(graph)
    feats = [i for i, k in enumerate(graph.node_kind) if k == "feature"]
    top = sorted(feats, key=lambda i: -float(infl[i]))[:10]
    summary = {
        "target": graph.target_names, "n_nodes": graph.n_nodes, "n_edges": int(graph.adjacency._nnz()),
        "kept_nodes": len(exported["nodes"]), "kept_edges": len(exported["links"]),
        "scores": pruned.scores(),
        "top_features": [{"layer": int(graph.node_layer[i]), "position": int(graph.node_pos[i]),
                          "feature": int(graph.node_feature[i]), "activation": float(graph.activation[i]),
                          "influence": float(infl[i])} for i in top],
    }  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"traced {graph.target_names[0]}: {graph.n_nodes} nodes, {summary['n_edges']} edges; kept "
          f"{summary['kept_nodes']} nodes, {summary['kept_edges']} edges")  # fmt: skip
    print("scores: " + ", ".join(f"{k} {v:.3f}" for k, v in summary["scores"].items()))
    ct_dir = (out / "circuit-tracer").resolve()
    serve = f"from circuit_tracer.frontend.local_server import serve; serve('{ct_dir}', port=8032).server_thread.join()"
    print(f"circuit-tracer files: {ct_dir}")
    print(f'  open them in its frontend: python -c "{serve}", then http://localhost:8032')
    print(f"viewer (open from disk): {(out / 'graph.html').resolve()}")
    return 0


def _cmd_saes(args: argparse.Namespace) -> int:
    from .models.embedded import checkpoint_dir
    from .saes.formats import FORMATS
    from .saes.loading import RELEASES

    print("Checkpoint formats (load_sae(PATH) detects them; '<format>:<org>/<repo>' on the Hub):")
    for name, fmt in FORMATS.items():
        print(f"  {name:<20} {fmt.description}")
    print("\nPublic releases (load_sae(NAME) fetches and converts them when online):")
    for name, rel in RELEASES.items():
        print(f"  {name:<46} {rel.format:<7} {rel.repo_id}")
    root = checkpoint_dir() / "saes"
    embedded = sorted(p.parent for p in root.glob("*/*/cfg.json")) if root.exists() else []
    print("\nEmbedded SAEs (load_sae('sve:<model>/<hook>'), offline):")
    for folder in embedded:
        print(f"  sve:{folder.parent.name}/{folder.name}")
    if not embedded:
        print("  (none shipped in this build)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(n_images=args.n_images, batch_size=args.batch_size, model_id=args.model, out_dir=args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae-vision",
        description="SAELens and TransformerLens workflows for vision transformers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list adapters, model sources and embedded models")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("hooks", help="list every hook name of a model with its activation shape")
    p.add_argument("model", help="model id, e.g. sve:shapes-vit or timm:vit_base_patch16_224")
    p.add_argument("--random", action="store_true", help="random weights (pretrained=False): no download")
    p.set_defaults(func=_cmd_hooks)

    for name, func, text in (
        ("cache", _cmd_cache, "harvest activations into the on-disk cache (resumable)"),
        ("train", _cmd_train, "train one SAE per hook and save in SAELens format"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", help="YAML or JSON VisionSAETrainingConfig; flags below override it")
        p.add_argument("--layers", help="comma-separated layers for an all_* hook group, e.g. 0,3,5")
        if name == "train":
            p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
            p.add_argument("--yes", action="store_true", help="run the default config (shown when none is given)")
        else:
            p.add_argument(
                "--verify", action="store_true", help="check every shard's checksum; remove bad shards (then rerun)"
            )
        p.add_argument(
            "--distributed",
            action="store_true",
            help="require torchrun's environment (under torchrun the group is joined anyway)",
        )
        for key, typ in _CONFIG_FLAGS.items():
            p.add_argument(f"--{key.replace('_', '-')}", dest=key, type=typ, default=None)
        p.set_defaults(func=func)

    p = sub.add_parser("eval", help="evaluate SAEs spliced into a model (table per SAE, JSON beside)")
    p.add_argument("--model", required=True, help="model id, e.g. sve:shapes-vit")
    p.add_argument("--sae", action="append", required=True, help="SAE reference (repeatable): path, sve:, release")
    p.add_argument("--dataset", default="sve:shapes", help="sve:shapes or an image folder (default: %(default)s)")
    p.add_argument("--n-images", type=int, default=256)
    p.add_argument("--seed", type=int, default=4242, help="image seed for sve:shapes (default: %(default)s)")
    p.add_argument("--hook-name", default=None, help="set the SAE's hook (for checkpoints that lack it)")
    p.add_argument("--out", default=None, help="folder for one JSON file per SAE")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("analyse", help="feature analysis: AUROC against known attributes, types, labels")
    p.add_argument("--model", default="sve:shapes-vit", help="an embedded shapes model (default: %(default)s)")
    p.add_argument("--saes", default="sve", help="'sve' (shipped SAEs), a folder of SAE folders, or refs a,b,c")
    p.add_argument("--out", required=True, help="folder for analysis.md, labels.json, type_evolution.png")
    p.add_argument("--n-images", type=int, default=512)
    p.add_argument("--seed", type=int, default=31)
    p.add_argument("--threshold", type=float, default=0.9, help="AUROC a feature needs to count as interpretable")
    p.set_defaults(func=_cmd_analyse)

    p = sub.add_parser("dashboard", help="write an offline HTML dashboard of SAE features")
    p.add_argument("--model", required=True, help="model id, e.g. sve:shapes-vit")
    p.add_argument("--saes", required=True, help="'sve' (shipped SAEs), a folder of SAE folders, or refs a,b,c")
    p.add_argument("--out", required=True, help="output folder (open <out>/index.html from disk)")
    p.add_argument("--dataset", default="sve:shapes-marker", help="image source (default: %(default)s)")
    p.add_argument("--n-images", type=int, default=512)
    p.add_argument("--seed", type=int, default=4242)
    p.add_argument("--top-k", type=int, default=8, help="top images per feature")
    p.add_argument("--feature-pages", type=int, default=16, help="feature pages per SAE")
    p.add_argument("--image-pages", type=int, default=8)
    p.add_argument("--labels", default=None, help="labels.json of `sae-vision analyse` (shown on pages and tables)")
    p.set_defaults(func=_cmd_dashboard)

    for name, func, text in (("faithfulness", _cmd_faithfulness, "replacement model vs original model"),
                             ("trace", _cmd_trace, "attribution graph of one image")):  # fmt: skip
        p = sub.add_parser(name, help=text)
        p.add_argument("--model", required=True)
        p.add_argument("--saes", required=True, help="'sve', a folder of SAE folders (one per layer), or refs a,b,c")
        p.add_argument("--seed", type=int, default=4242)
        if name == "faithfulness":
            p.add_argument("--dataset", default="sve:shapes")
            p.add_argument("--n-images", type=int, default=256)
        else:
            p.add_argument("--image", default=None, help="image file (default: a shapes image)")
            p.add_argument("--shapes-index", type=int, default=0, help="which shapes image without --image")
            p.add_argument("--target", type=int, default=None, help="class id (default: the prediction)")
            p.add_argument("--node-threshold", type=float, default=0.8)
            p.add_argument("--edge-threshold", type=float, default=0.98)
            p.add_argument(
                "--max-feature-nodes",
                type=int,
                default=None,
                help="budget of feature rows, explored by influence (default: all)",
            )
            p.add_argument("--mlp-leaves", action="store_true", help="MLP outputs as leaf nodes (second mode)")
            p.add_argument(
                "--reference-images",
                type=int,
                default=64,
                help="shapes images for the viewer's top patches per feature (0: none)",
            )
            p.add_argument("--labels", default=None, help="labels.json of `sae-vision analyse` (node labels)")
            p.add_argument("--out", required=True)
        p.set_defaults(func=func)

    p = sub.add_parser("saes", help="list known public SAE releases and the embedded SAEs")
    p.set_defaults(func=_cmd_saes)

    p = sub.add_parser("demo", help="run the main job on the embedded shapes model (offline)")
    p.add_argument("--model", default="sve:shapes-vit", help="embedded model to use (default: %(default)s)")
    p.add_argument("--n-images", type=int, default=512, help="shapes images to run (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward (default: %(default)s)")
    p.add_argument("--out", default="sae-vision-demo", help="folder for the demo's outputs (default: %(default)s)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"sae-vision {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(f"sae-vision {args.command}: interrupted. {e}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
