"""Commands that list what is available and run the demo: models, hooks, saes, demo."""

from __future__ import annotations

import argparse


def _cmd_models(args: argparse.Namespace) -> int:
    from ..models import LOADERS, list_adapters, list_embedded_models

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
    from ._shared import load_model

    model = load_model(args.model, random_weights=args.random)
    shapes = model.hook_shapes(batch_size=1)
    width = max(len(n) for n in shapes)
    print(f"{args.model}: {len(shapes)} hook points, shapes for one {model.cfg.image_size} image")
    for name, shape in shapes.items():
        print(f"  {name:<{width}}  {list(shape)}")
    return 0


def _cmd_saes(args: argparse.Namespace) -> int:
    from ..models.embedded import checkpoint_dir
    from ..saes.formats import FORMATS
    from ..saes.loading import RELEASES

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
    kinds = sorted(p.parent for p in root.glob("*/transcoders/summary.json")) if root.exists() else []
    kinds += sorted(p.parent for p in root.glob("*/clt/W_enc_0.safetensors")) if root.exists() else []
    if kinds:
        print("\nEmbedded transcoders (load_sae('sve:<model>/transcoders'): the per-layer list; '.../clt': a CLT):")
        for folder in kinds:
            print(f"  sve:{folder.parent.name}/{folder.name}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    return run_demo(n_images=args.n_images, batch_size=args.batch_size, model_id=args.model, out_dir=args.out)
