"""Insertion/deletion curves and circuit scores of ``sve:shapes-vit`` with its shipped SAEs, on
correctly classified shapes images (as the seed paper evaluates). Prints the tables in docs/circuits.md.

    python examples/evaluate_circuits.py [--images 16] [--json out.json]
    python examples/evaluate_circuits.py --protocol seed   # the paper's graph, protocol and layers 0..L-2
"""

from __future__ import annotations

import argparse
import json

import torch

import sae_vision_ext as sve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sve:shapes-vit")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--json", default=None)
    p.add_argument("--protocol", choices=["ours", "seed"], default="ours")
    args = p.parse_args()
    model = sve.HookedViT.from_pretrained(args.model)
    n_sae = model.cfg.n_layers - (args.protocol == "seed")  # the paper: no SAE after the last block
    saes = [sve.load_sae(f"{args.model}/blocks.{layer}.hook_resid_post") for layer in range(n_sae)]
    rrm = sve.ResidualReplacementModel(model, saes)
    raw, labels = sve.make_shapes(256, seed=5).tensors()
    pixels = model.preprocess(raw)
    with torch.no_grad():
        correct = (model(pixels).argmax(-1) == labels).nonzero().squeeze(1)
    pick = correct[: args.images]
    ev = sve.evaluate_circuit(rrm, pixels[pick], labels[pick], reference_pixels=pixels, protocol=args.protocol)
    for metric in ("demeaned_logit", "prob", "accuracy"):
        print(ev.table(metric) + "\n")
    if args.protocol == "ours":
        print(f"circuit faithfulness {ev.faithfulness:.3f}, completeness {ev.completeness:.3f}, "
          f"circuit sizes {min(ev.circuit_sizes)}-{max(ev.circuit_sizes)} features, "
              f"Spearman(influence, single-node ablation effect) {ev.influence_ablation_spearman:.3f}")  # fmt: skip
    print("\nfraction | " + " | ".join(f"{q:g}" for q in ev.fractions))
    for r in ev.curves:
        for mode in ("insertion", "deletion"):
            ys = ev.curves[r][mode]["demeaned_logit"]
            print(f"{r} {mode} | " + " | ".join(f"{v:.2f}" for v in ys))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(ev.to_dict(), f)


if __name__ == "__main__":
    main()
