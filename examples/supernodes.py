"""Automatic supernodes on ``sve:shapes-vit``'s graphs: how many nodes hold 80% of the feature influence before and
after grouping (by feature across positions, and by connected patch regions). Prints the table in
docs/circuits.md ("Supernodes").

    python examples/supernodes.py [--images 8]
"""

from __future__ import annotations

import argparse
import statistics

import sae_vision_ext as sve
from sae_vision_ext.circuits.graph.supernodes import group_nodes, influence_coverage


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=8, help="shapes images to trace (seed 3)")
    args = p.parse_args()
    model = sve.HookedViT.from_pretrained("sve:shapes-vit")
    saes = [sve.load_sae(f"sve:shapes-vit/blocks.{layer}.hook_resid_post") for layer in range(6)]
    rrm = sve.ResidualReplacementModel(model, saes)
    raw, _ = sve.make_shapes(args.images, seed=3).tensors()
    pixels = model.preprocess(raw)
    rows = {"feature nodes": [], "spatial supernodes": [], "feature supernodes": []}
    for i in range(args.images):
        graph = rrm.attribute(pixels[i : i + 1])
        rows["feature nodes"].append(influence_coverage(graph))
        rows["spatial supernodes"].append(influence_coverage(graph, group_nodes(graph, "spatial")))
        rows["feature supernodes"].append(influence_coverage(graph, group_nodes(graph, "feature")))
    print(f"nodes for 80% of the feature influence, {args.images} images (median, min-max):")
    for name, counts in rows.items():
        print(f"| {name} | {statistics.median(counts):g} | {min(counts)}-{max(counts)} |")


if __name__ == "__main__":
    main()
