"""``sae-vision``: command-line entry point.

sae-vision models                   adapters, model sources and embedded models
sae-vision hooks MODEL              every hook name with its shape for one image
sae-vision saes                     checkpoint formats, public releases, embedded SAEs
sae-vision cache | train            harvest into the on-disk cache | train one SAE per hook
sae-vision eval                     SAEs spliced into a model: reconstruction and output metrics
sae-vision analyse                  feature analysis against known attributes: AUROC, types, labels
sae-vision dashboard                offline HTML pages of SAE features
sae-vision faithfulness | trace     replacement model vs model | attribution graph of one image
sae-vision bench                    ViSAEBench's metrics of SAEs: table, JSON, radar plot
sae-vision demo                     the main job on the embedded shapes model (no download)

Many processes: `torchrun --nproc_per_node=N -m sae_vision_ext.cli cache|train ...` (each process
takes its share: cache shards by rank, SAEs by hook; see docs/scaling.md). `--distributed` insists
on torchrun's environment.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .._errors import TrainingInterrupted
from ..circuits.engine.defaults import DEFAULT_MAX_FEATURE_NODES
from ._shared import _preflight
from .bench import add_bench_command
from .features import _cmd_analyse, _cmd_dashboard, _cmd_faithfulness, _cmd_trace
from .setup import _cmd_demo, _cmd_hooks, _cmd_models, _cmd_saes
from .training import _CONFIG_FLAGS, YAML_ONLY, _cmd_cache, _cmd_eval, _cmd_train


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default: ``(required)`` for required ones, and for the config
    flags of cache/train the config field's docstring and default (read when help is shown, so parsing
    stays light)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        field = getattr(action, "config_field", None)
        if field is not None:
            import dataclasses

            from .._config import field_docs
            from ..training.config import VisionSAETrainingConfig

            (f,) = (f for f in dataclasses.fields(VisionSAETrainingConfig) if f.name == field)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            text = field_docs(VisionSAETrainingConfig).get(field, text)
            if getattr(action.type, "__name__", "").endswith("|none"):
                text += " Pass none for None."
            return (text + f" (default: the --config file's value, else {default!r})").replace("%", "%%")
        if action.required:
            return text + " (required)"
        return super()._get_help_string(action) or ""


def _count(minimum: int, what: str) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``minimum``, refused with ``what`` it counts."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum} ({what}); got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum} ({what}); got {value}")
        return value

    parse.__name__ = f"count>={minimum}"
    return parse


def _unit_share(name: str, low_open: float | None = None) -> Callable[[str], float]:
    """An argparse type: a number in ``[0, 1]``, or ``(low_open, 1]`` when ``low_open`` is given."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number ({name}); got {text!r}") from None
        ok = (low_open < value <= 1.0) if low_open is not None else (0.0 <= value <= 1.0)  # NaN fails both
        if not ok:
            valid = f"({low_open}, 1]" if low_open is not None else "[0, 1]"
            raise argparse.ArgumentTypeError(f"must be in {valid} ({name}); got {text}")
        return value

    parse.__name__ = "share"
    return parse


def _class_id(text: str) -> int:
    """``--target``: a class id >= 0 (its upper bound is checked once the model is loaded)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a class id (a whole number >= 0); got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"class ids count from 0 (negative ids are not read from the end); got {value}. "
            "Pass a class id, or leave out --target for the predicted class"
        )
    return value


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


_N_IMAGES = _count(1, "images to run")


def _layer_list(text: str) -> list[int]:
    """``--layers 0,3,5``: distinct block indices >= 0, in the order given."""
    try:
        layers = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of layer indices (write e.g. 0,3,5)"
        ) from None
    if any(layer < 0 for layer in layers) or len(set(layers)) != len(layers):
        raise argparse.ArgumentTypeError(f"{text!r}: layers must be distinct indices >= 0 (e.g. 0,3,5)")
    return layers


_SEED_HELP = "seed of the shapes images"


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
    add_bench_command(sub, _N_IMAGES)
    for command in sub.choices.values():  # every option's help shows its default
        command.formatter_class = _HelpFormatter
    return parser


_RANDOM_HELP = (
    "build the architecture with random weights (pretrained=False, seeded with 0: the same weights every run); "
    "downloads nothing, for tests and users without the weights"
)


def _setup_commands(sub: argparse._SubParsersAction) -> None:
    """``models``, ``hooks``, ``saes``, ``demo``."""
    p = sub.add_parser("models", help="list adapters, model sources and embedded models")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("hooks", help="list every hook name of a model with its activation shape")
    p.add_argument("model", help="model id, e.g. sve:shapes-vit or timm:vit_base_patch16_224")
    p.add_argument("--random", "--random-weights", dest="random", action="store_true", help=_RANDOM_HELP)
    p.set_defaults(func=_cmd_hooks)

    p = sub.add_parser("saes", help="list known public SAE releases and the embedded SAEs")
    p.set_defaults(func=_cmd_saes)

    p = sub.add_parser("demo", help="run the main job on the embedded shapes model (offline)")
    p.add_argument("--model", default="sve:shapes-vit", help="embedded model to use")
    p.add_argument("--n-images", type=_N_IMAGES, default=512, help="shapes images to run")
    p.add_argument("--batch-size", type=_count(1, "images per forward"), default=128, help="images per forward")
    p.add_argument("--out", default="sae-vision-demo", help="folder for the demo's outputs")
    p.set_defaults(func=_cmd_demo)


def _training_commands(sub: argparse._SubParsersAction) -> None:
    """``cache``, ``train``, ``eval``."""
    for name, func, text in (
        ("cache", _cmd_cache, "harvest activations into the on-disk cache (resumable)"),
        ("train", _cmd_train, "train one SAE per hook and save in SAELens format"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument(
            "--config",
            help=f"YAML or JSON VisionSAETrainingConfig; flags below override it ({', '.join(YAML_ONLY)}: file only)",
        )
        p.add_argument(
            "--layers", type=_layer_list, help="comma-separated layers for an all_* hook group, e.g. 0,3,5 (none: all)"
        )
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
        p.add_argument("--random-weights", action="store_true", help=_RANDOM_HELP)
        for key, typ in _CONFIG_FLAGS.items():  # help: the field's docstring (_HelpFormatter)
            flag = "--model" if key == "model_name" else f"--{key.replace('_', '-')}"  # --model, as elsewhere
            kind = {"action": argparse.BooleanOptionalAction} if typ is bool else {"type": typ}
            action = p.add_argument(flag, dest=key, default=None, help=f"config field {key}", **kind)
            action.config_field = key  # type: ignore[attr-defined]  (the formatter shows the config's default)
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
    p.add_argument("--dataset", default="sve:shapes", help="sve:shapes or an image folder")
    p.add_argument("--n-images", type=_N_IMAGES, default=256, help="images to evaluate on")
    p.add_argument("--seed", type=int, default=4242, help="image seed for sve:shapes")
    p.add_argument("--hook-name", default=None, help="set the SAE's hook (for checkpoints that lack it)")
    p.add_argument("--out", default=None, help="folder for one JSON file per SAE (none: print only)")
    p.set_defaults(func=_cmd_eval)


def _feature_commands(sub: argparse._SubParsersAction) -> None:
    """``analyse``, ``dashboard``."""
    p = sub.add_parser("analyse", help="feature analysis: AUROC against known attributes, types, labels")
    p.add_argument("--model", default="sve:shapes-vit", help="an embedded shapes model")
    p.add_argument("--saes", default="sve", help="'sve' (shipped SAEs), a folder of SAE folders, or refs a,b,c")
    p.add_argument("--out", required=True, help="folder for analysis.md, labels.json, type_evolution.png")
    p.add_argument(
        "--n-images",
        type=_N_IMAGES,
        default=512,
        help="balanced shapes images; enough that every shape class appears (the error says how many)",
    )
    p.add_argument("--seed", type=int, default=31, help=_SEED_HELP)
    p.add_argument(
        "--threshold",
        type=_unit_share("an AUROC threshold: 0.5 is chance, 1 a perfect separation", low_open=0.5),
        default=0.9,
        help="AUROC in (0.5, 1] a feature's best attribute value needs to count as interpretable",
    )
    p.set_defaults(func=_cmd_analyse)

    p = sub.add_parser("dashboard", help="write an offline HTML dashboard of SAE features")
    p.add_argument("--model", required=True, help="model id, e.g. sve:shapes-vit")
    p.add_argument("--saes", required=True, help="'sve' (shipped SAEs), a folder of SAE folders, or refs a,b,c")
    p.add_argument("--out", required=True, help="output folder (open <out>/index.html from disk)")
    p.add_argument("--dataset", default="sve:shapes-marker", help="image source")
    p.add_argument("--n-images", type=_N_IMAGES, default=512, help="images the statistics are collected on")
    p.add_argument("--seed", type=int, default=4242, help="image seed for sve:shapes sources")
    p.add_argument("--top-k", type=_count(1, "top images per feature"), default=8, help="top images per feature")
    p.add_argument("--feature-pages", type=_count(0, "pages"), default=16, help="feature pages per SAE")
    p.add_argument("--image-pages", type=_count(0, "pages"), default=8, help="pages of single images")
    p.add_argument("--labels", default=None, help="labels.json of `sae-vision analyse` (shown on pages and tables)")
    p.set_defaults(func=_cmd_dashboard)


def _circuit_commands(sub: argparse._SubParsersAction) -> None:
    """``faithfulness``, ``trace``."""
    for name, func, text in (
        ("faithfulness", _cmd_faithfulness, "replacement model vs original model"),
        ("trace", _cmd_trace, "attribution graph of one image"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--model", required=True, help="model id, e.g. sve:shapes-vit")
        p.add_argument("--saes", required=True, help="'sve', a folder of SAE folders (one per layer), or refs a,b,c")
        p.add_argument("--seed", type=int, default=4242, help=_SEED_HELP)
        p.add_argument("--random-weights", action="store_true", help=_RANDOM_HELP)
        if name == "faithfulness":
            p.add_argument("--dataset", default="sve:shapes", help="image source")
            p.add_argument("--n-images", type=_N_IMAGES, default=256, help="images to compare on")
        else:
            _trace_options(p)
        p.set_defaults(func=func)


def _trace_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", default=None, help="image file (none: shapes image --shapes-index)")
    p.add_argument(
        "--shapes-index",
        type=_count(0, "shapes images are numbered 0, 1, 2, ... for each seed"),
        default=0,
        help="which shapes image without --image (0 or more)",
    )
    p.add_argument("--target", type=_class_id, default=None, help="class id, 0..classes-1 (none: the prediction)")
    p.add_argument(
        "--node-threshold",
        type=_unit_share("cumulative influence share of the kept nodes"),
        default=0.8,
        help="pruning: keep nodes up to this cumulative influence share, in [0, 1]",
    )
    p.add_argument(
        "--edge-threshold",
        type=_unit_share("cumulative share of the kept edges"),
        default=0.98,
        help="pruning: keep edges up to this cumulative share, in [0, 1]",
    )
    p.add_argument(
        "--max-feature-nodes",
        type=_budget,
        default=DEFAULT_MAX_FEATURE_NODES,
        help="budget of feature rows, explored by influence (circuit-tracer's default; 'all' for every row)",
    )
    p.add_argument("--mlp-leaves", action="store_true", help="MLP outputs as leaf nodes (second mode)")
    p.add_argument(
        "--reference-images",
        type=_count(0, "reference images; 0 for none"),
        default=64,
        help="shapes images for the viewer's top patches per feature (0: none)",
    )
    p.add_argument("--labels", default=None, help="labels.json of `sae-vision analyse` (node labels)")
    p.add_argument(
        "--supernodes",
        choices=("feature", "spatial", "none"),
        default="feature",
        help="supernodes written to circuit-tracer's qParams.supernodes and the viewer: each feature's positions "
        "('feature'), its connected patch regions ('spatial'), or none",
    )
    p.add_argument(
        "--attention-edges",
        type=_count(0, "edges; 0 for none"),
        default=50,
        help="strongest edges through attention split over heads, into <slug>.attention.json and the viewer (0: none)",
    )
    p.add_argument(
        "--attention-entries",
        type=_count(0, "attention entries; 0 for none"),
        default=20,
        help="strongest attention entries (block, head, query, key) split into query x key feature pairs",
    )
    p.add_argument("--out", required=True, help="folder for circuit-tracer's files, graph.html and summary.json")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _preflight(args)  # output folders, image and labels files: checked before any work
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"sae-vision {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(f"sae-vision {args.command}: interrupted. {e}", file=sys.stderr)
        return 130
