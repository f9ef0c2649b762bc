"""Train and ship the embedded SAEs: one TopK SAE per residual layer of each embedded shapes ViT.

    python examples/build_embedded_saes.py            # both models, about 5 minutes each on 2 cores
    python examples/build_embedded_saes.py --checksums-only   # (re)write checksums.json of the shipped SAEs

Training goes through the package's own CLI (``sae-vision train``) on ``sve:shapes-marker`` (the
corner marker on half of the images, independent of the class, so both models' SAEs can represent
it). Each SAE is evaluated on 512 fresh images (``evaluate_sae``: explained variance, L0,
accuracy with the SAE spliced in), converted to float16 and written to
``sae_vision_ext/checkpoints/saes/<model>/<hook>/`` with ``summary.json`` beside the hooks and the
weights' sha256 in each hook folder's ``checksums.json`` (``load_sae`` verifies it).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from sae_lens import SAE

from sae_vision_ext import HookedViT
from sae_vision_ext.cli import main as cli
from sae_vision_ext.data.shapes import make_shapes
from sae_vision_ext.models.embedded import checkpoint_dir
from sae_vision_ext.saes.evaluate import evaluate_sae
from sae_vision_ext.saes.io import write_weights_checksum

PER_LAYER_K = {0: 8, 1: 12, 2: 16, 3: 16, 4: 24, 5: 24}  # sparser early layers, as in the seed paper


def build(model_name: str, tokens: int, out_root: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {
            "model_name": f"sve:{model_name}", "hook_names": "all_resid_post", "dataset": "sve:shapes-marker",
            "n_images": 8000, "token_selection": "all", "architecture": "topk", "expansion_factor": 4.0,
            "k": 16, "training_tokens": tokens, "train_batch_size": 1024, "lr": 4e-4, "decoder_init_norm": 1.0,
            "seed": 0,  # lr and decoder norm: the shipped SAEs' recipe, pinned (the defaults changed in issue 27)
            "per_layer": {f"blocks.{layer}.hook_resid_post": {"k": k} for layer, k in PER_LAYER_K.items()},
            "output_dir": f"{tmp}/run",
        }  # fmt: skip
        Path(f"{tmp}/cfg.json").write_text(json.dumps(cfg))
        if cli(["train", "--config", f"{tmp}/cfg.json"]) != 0:
            raise SystemExit("training failed")
        model = HookedViT.from_pretrained(f"sve:{model_name}")
        data = make_shapes(512, seed=4242, balanced=True)
        x, y = data.tensors()
        pixels = model.preprocess(x)
        summary = {}
        for layer in range(model.cfg.n_layers):
            hook = f"blocks.{layer}.hook_resid_post"
            sae = SAE.load_from_disk(f"{tmp}/run/{hook}")
            m = evaluate_sae(model, sae, pixels, y)
            summary[hook] = {key: m[key] for key in ("explained_variance", "l0", "dead_fraction", "loss_recovered")}
            summary[hook] |= {"k": sae.cfg.k, "d_sae": sae.cfg.d_sae, "accuracy_clean": m["accuracy"]["clean"],
                              "accuracy_spliced": m["accuracy"]["spliced"]}  # fmt: skip
            sae = sae.to(torch.float16)
            sae.cfg.dtype = "float16"
            sae.save_model(out_root / model_name / hook)
            write_weights_checksum(out_root / model_name / hook)
        (out_root / model_name / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="shapes-vit,shapes-vit-biased")
    p.add_argument("--tokens", type=int, default=600_000, help="training tokens per SAE")
    p.add_argument("--out", type=Path, default=checkpoint_dir() / "saes")
    p.add_argument("--checksums-only", action="store_true", help="only write checksums.json of the SAEs in --out")
    args = p.parse_args()
    if args.checksums_only:
        for name in args.models.split(","):
            for folder in sorted(p.parent for p in (args.out / name).glob("*/sae_weights.safetensors")):
                print(write_weights_checksum(folder))
        return
    for name in args.models.split(","):
        summary = build(name, args.tokens, args.out)
        print(f"\n{name}")
        for hook, m in summary.items():
            print(f"  {hook}: EV {m['explained_variance']:.3f}  L0 {m['l0']:.1f}  acc clean "
                  f"{m['accuracy_clean']:.3f} spliced {m['accuracy_spliced']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
