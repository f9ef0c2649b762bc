"""``sae-vision``: command-line entry point.

sae-vision models                   adapters, model sources and embedded models
sae-vision hooks MODEL              every hook name with its shape for one image
sae-vision demo                     the main job on the embedded shapes model (no download)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


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


def _cmd_saes(args: argparse.Namespace) -> int:
    from .models.embedded import checkpoint_dir
    from .saes.loading import RELEASES

    print("Public releases (load_sae(NAME) fetches and converts them when online):")
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

    return run_demo(n_images=args.n_images, batch_size=args.batch_size, model_id=args.model)


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

    p = sub.add_parser("saes", help="list known public SAE releases and the embedded SAEs")
    p.set_defaults(func=_cmd_saes)

    p = sub.add_parser("demo", help="run the main job on the embedded shapes model (offline)")
    p.add_argument("--model", default="sve:shapes-vit", help="embedded model to use (default: %(default)s)")
    p.add_argument("--n-images", type=int, default=512, help="shapes images to run (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="images per forward (default: %(default)s)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"sae-vision {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
