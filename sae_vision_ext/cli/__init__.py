"""``sae-vision``: command-line entry point.

sae-vision models                   adapters, model sources and embedded models
sae-vision hooks MODEL              every hook name with its shape for one image
sae-vision saes                     checkpoint formats, public releases, embedded SAEs
sae-vision cache | train            harvest into the on-disk cache | train one SAE per hook
sae-vision eval                     SAEs spliced into a model: reconstruction and output metrics
sae-vision analyse                  feature analysis against known attributes: AUROC, types, labels
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

from .._errors import TrainingInterrupted
from ..circuits.defaults import DEFAULT_MAX_FEATURE_NODES
from .features import _cmd_analyse, _cmd_dashboard, _cmd_faithfulness, _cmd_trace
from .setup import _cmd_demo, _cmd_hooks, _cmd_models, _cmd_saes
from .training import _CONFIG_FLAGS, _cmd_cache, _cmd_eval, _cmd_train


def _budget(text: str) -> int | None:
    """``--max-feature-nodes``: a non-negative count, or ``all``."""
    if text.strip().lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of feature rows or 'all'; got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or 'all'; got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae-vision",
        description="SAELens and TransformerLens workflows for vision transformers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_setup_commands, _training_commands, _feature_commands, _circuit_commands):
        add(sub)
    return parser


def _setup_commands(sub: argparse._SubParsersAction) -> None:
    """``models``, ``hooks``, ``saes``, ``demo``."""
    p = sub.add_parser("models", help="list adapters, model sources and embedded models")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("hooks", help="list every hook name of a model with its activation shape")
    p.add_argument("model", help="model id, e.g. sve:shapes-vit or timm:vit_base_patch16_224")
    p.add_argument("--random", action="store_true", help="random weights (pretrained=False): no download")
    p.set_defaults(func=_cmd_hooks)

    p = sub.add_parser("saes", help="list known public SAE releases and the embedded SAEs")
    p.set_defaults(func=_cmd_saes)

    p = sub.add_parser("demo", help="run the main job on the embedded shapes model (offline)")
    p.add_argument("--model", default="sve:shapes-vit", help="embedded model to use (default: %(default)s)")
    p.add_argument("--n-images", type=int, default=512, help="shapes images to run (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward (default: %(default)s)")
    p.add_argument("--out", default="sae-vision-demo", help="folder for the demo's outputs (default: %(default)s)")
    p.set_defaults(func=_cmd_demo)


def _training_commands(sub: argparse._SubParsersAction) -> None:
    """``cache``, ``train``, ``eval``."""
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
            flag = "--model" if key == "model_name" else f"--{key.replace('_', '-')}"  # --model, as elsewhere
            p.add_argument(flag, dest=key, type=typ, default=None)
        p.add_argument("--model-name", dest="model_name_deprecated", default=None, help="deprecated: use --model")
        p.set_defaults(func=func)

    p = sub.add_parser("eval", help="evaluate SAEs spliced into a model (table per SAE, JSON beside)")
    p.add_argument("--model", required=True, help="model id, e.g. sve:shapes-vit")
    p.add_argument(
        "--saes", default=None, help="'sve' (the model's shipped SAEs), a folder of SAE folders, or refs a,b,c"
    )
    p.add_argument(
        "--sae", action="append", default=None, help="deprecated: one SAE reference (repeatable); use --saes"
    )
    p.add_argument("--dataset", default="sve:shapes", help="sve:shapes or an image folder (default: %(default)s)")
    p.add_argument("--n-images", type=int, default=256)
    p.add_argument("--seed", type=int, default=4242, help="image seed for sve:shapes (default: %(default)s)")
    p.add_argument("--hook-name", default=None, help="set the SAE's hook (for checkpoints that lack it)")
    p.add_argument("--out", default=None, help="folder for one JSON file per SAE")
    p.set_defaults(func=_cmd_eval)


def _feature_commands(sub: argparse._SubParsersAction) -> None:
    """``analyse``, ``dashboard``."""
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


def _circuit_commands(sub: argparse._SubParsersAction) -> None:
    """``faithfulness``, ``trace``."""
    for name, func, text in (
        ("faithfulness", _cmd_faithfulness, "replacement model vs original model"),
        ("trace", _cmd_trace, "attribution graph of one image"),
    ):
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
                type=_budget,
                default=DEFAULT_MAX_FEATURE_NODES,
                help=f"budget of feature rows, explored by influence (default {DEFAULT_MAX_FEATURE_NODES}, "
                "circuit-tracer's; 'all' for every row)",
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
