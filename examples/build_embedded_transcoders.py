"""Train and ship the embedded transcoders: one TopK transcoder per block and one cross-layer transcoder
(CLT) for each embedded shapes ViT, loadable offline as ``sve:<model>/transcoders`` (the per-layer list)
and ``sve:<model>/clt``.

    python examples/build_embedded_transcoders.py                      # sve:shapes-vit, a few minutes on 2 cores
    python examples/build_embedded_transcoders.py --models shapes-vit,shapes-vit-biased

Training goes through the package's own CLI (``sae-vision train --architecture transcoder|clt``) on
``sve:shapes-marker``: every transcoder reads ``blocks.{l}.ln2.hook_normalized`` (the MLP's input) and
predicts ``blocks.{l}.hook_mlp_out``; the CLT's layer-``l`` features write to the MLP outputs of blocks
``l..5``. Both are evaluated on 512 fresh images (``evaluate_transcoders``: FVU of each MLP output,
L0, and the model with every MLP replaced: accuracy, KL to the clean output, loss recovered against
mean-ablated MLPs), converted to float16 and written to
``sae_vision_ext/checkpoints/saes/<model>/transcoders/<hook>/`` (SAELens's format, ``checksums.json``
beside) and ``.../<model>/clt/`` (circuit-tracer's layout), with ``summary.json`` in each.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from sae_lens import SAE

from sae_vision_ext import HookedViT
from sae_vision_ext.cli import main as cli
from sae_vision_ext.data.shapes import make_shapes
from sae_vision_ext.models.embedded import checkpoint_dir
from sae_vision_ext.saes.clt import load_clt, save_clt
from sae_vision_ext.saes.evaluate_transcoders import evaluate_transcoders
from sae_vision_ext.saes.io import write_weights_checksum

SUMMARY_KEYS = ("fvu", "fvu_pooled", "l0", "loss_recovered", "kl_replaced", "kl_ablated", "top1_agreement_replaced")


def train(model_name: str, architecture: str, tokens: int, out: Path, **extra: object) -> None:
    cfg = {
        "model_name": f"sve:{model_name}", "architecture": architecture, "transcoder_activation": "topk",
        "transcoder_input": "ln2.hook_normalized", "transcoder_decoder_init_norm": 0.1,
        "dataset": "sve:shapes-marker", "n_images": 4000,
        "token_selection": "all", "k": 16, "training_tokens": tokens, "train_batch_size": 1024, "lr": 1e-3,
        "seed": 0, "output_dir": str(out), "checkpoint_every_seconds": None, **extra,
    }  # fmt: skip
    cfg_file = out.parent / f"{architecture}.json"
    cfg_file.write_text(json.dumps(cfg))
    if cli(["train", "--config", str(cfg_file)]) != 0:
        raise SystemExit(f"training {architecture} failed")


def summarise(metrics: dict, **facts: object) -> dict:
    return {**facts, **{k: metrics[k] for k in SUMMARY_KEYS}, "accuracy": metrics["accuracy"],
            "layers": metrics["layers"]}  # fmt: skip


def build(model_name: str, tokens: int, out_root: Path) -> dict:
    model = HookedViT.from_pretrained(f"sve:{model_name}")
    x, y = make_shapes(512, seed=4242, balanced=True).tensors()
    pixels = model.preprocess(x)
    n = model.cfg.n_layers
    summary = {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        train(model_name, "transcoder", tokens, Path(tmp) / "tc", expansion_factor=4.0)
        hooks = [f"blocks.{layer}.ln2.hook_normalized" for layer in range(n)]
        transcoders = [SAE.load_from_disk(Path(tmp) / "tc" / h) for h in hooks]
        m = evaluate_transcoders(model, transcoders, pixels, y)
        summary["transcoders"] = summarise(m, k=16, d_sae=transcoders[0].cfg.d_sae, seconds=time.time() - start)
        folder = out_root / model_name / "transcoders"
        shutil.rmtree(folder, ignore_errors=True)
        for hook, sae in zip(hooks, transcoders, strict=True):
            sae = sae.to(torch.float16)
            sae.cfg.dtype = "float16"
            sae.save_model(folder / hook)
            write_weights_checksum(folder / hook)
        (folder / "summary.json").write_text(json.dumps(summary["transcoders"], indent=2))

        start = time.time()
        train(model_name, "clt", tokens, Path(tmp) / "clt", expansion_factor=2.0)
        clt = load_clt(Path(tmp) / "clt" / "clt")
        m = evaluate_transcoders(model, clt, pixels, y)
        summary["clt"] = summarise(m, k=16, d_sae_per_layer=clt.cfg.d_sae, seconds=time.time() - start)
        folder = out_root / model_name / "clt"
        shutil.rmtree(folder, ignore_errors=True)
        save_clt(load_clt(Path(tmp) / "clt" / "clt", dtype="float16"), folder)
        (folder / "summary.json").write_text(json.dumps(summary["clt"], indent=2))
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="shapes-vit")
    p.add_argument("--tokens", type=int, default=200_000, help="training tokens per transcoder and for the CLT")
    p.add_argument("--out", type=Path, default=checkpoint_dir() / "saes")
    args = p.parse_args()
    for name in args.models.split(","):
        summary = build(name, args.tokens, args.out)
        print(f"\n{name}")
        for kind, m in summary.items():
            print(f"  {kind}: FVU {m['fvu']:.3f} (pooled {m['fvu_pooled']:.3f})  L0 {m['l0']:.1f}  accuracy clean "
                  f"{m['accuracy']['clean']:.3f} replaced {m['accuracy']['replaced']:.3f}  KL {m['kl_replaced']:.3f}"
                  f"  loss recovered {m['loss_recovered']:.3f}  ({m['seconds']:.0f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
