"""Circuits through transcoders on the embedded ``sve:shapes-vit``: one graph per replacement model
(residual SAEs, per-layer transcoders and, when shipped, the cross-layer transcoder), their replacement
and completeness scores side by side, the strongest layer-skipping edges of the transcoder graph, and
its circuit-tracer files and our viewer page.

    python examples/transcoder_circuits.py [--out out/transcoder_circuits] [--budget 800]

With a budget, a residual graph's unexplored early layers leave its inputs without influence (replacement
score near 0), while every transcoder row reaches the embeddings directly: compare the kinds with
``--budget 0`` (every row).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import sae_vision_ext as sve


def load_replacements(model: sve.HookedViT) -> dict[str, object]:
    """The replacement models the embedded checkpoints give (a missing CLT is skipped)."""
    saes = [sve.load_sae(f"sve:shapes-vit/blocks.{layer}.hook_resid_post") for layer in range(model.cfg.n_layers)]
    out: dict[str, object] = {"residual SAEs": sve.ResidualReplacementModel(model, saes)}
    out["transcoders"] = sve.TranscoderReplacementModel(model, sve.load_sae("sve:shapes-vit/transcoders"))
    try:
        out["CLT"] = sve.TranscoderReplacementModel(model, sve.load_sae("sve:shapes-vit/clt"))
    except ValueError as e:  # not shipped in this build
        print(f"(no CLT: {e})")
    return out


def skipping_edges(graph: sve.AttributionGraph, n: int = 5) -> list[tuple[str, str, float]]:
    """The ``n`` strongest feature -> feature edges that skip at least one block."""
    a = graph.adjacency.coalesce()
    (tgt, src), w = a.indices(), a.values()
    kinds = torch.tensor([k == "feature" for k in graph.node_kind])
    keep = kinds[tgt] & kinds[src] & (graph.node_layer[tgt] > graph.node_layer[src] + 1)
    order = w[keep].abs().argsort(descending=True)[:n]

    def name(i: int) -> str:
        return f"L{int(graph.node_layer[i])} #{int(graph.node_feature[i])} @{int(graph.node_pos[i])}"

    t, s, v = tgt[keep][order], src[keep][order], w[keep][order]
    return [(name(int(s_)), name(int(t_)), float(v_)) for s_, t_, v_ in zip(s, t, v, strict=True)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/transcoder_circuits")
    p.add_argument("--budget", type=int, default=800, help="max_feature_nodes of each graph (0: every row)")
    args = p.parse_args()
    out = Path(args.out)
    model = sve.HookedViT.from_pretrained("sve:shapes-vit")
    pixels = model.preprocess(sve.make_shapes(1, seed=11).tensors()[0])
    print("| replacement model | feature nodes | replacement | completeness | pruned repl. | pruned compl. |")
    print("|---|---|---|---|---|---|")
    graphs = {}
    for name, rrm in load_replacements(model).items():
        graph = rrm.attribute(pixels, max_feature_nodes=args.budget or None)
        graphs[name] = (rrm, graph)
        s = graph.prune(0.8, 0.98).scores()
        print(f"| {name} | {graph.node_kind.count('feature')} | {s['replacement']:.3f} | {s['completeness']:.3f} | "
              f"{s['replacement_pruned']:.3f} | {s['completeness_pruned']:.3f} |")  # fmt: skip
    rrm, graph = graphs["transcoders"]
    print("\nStrongest layer-skipping edges of the transcoder graph:")
    for source, target, weight in skipping_edges(graph):
        print(f"  {source} -> {target}: {weight:+.3f}")
    pruned = graph.prune()
    pruned.to_json(out / "transcoders.json", rrm=rrm, pixels=pixels)
    sve.render_graph_html(pruned, out / "transcoders.html", rrm, pixels)
    print(f"\ncircuit-tracer files and viewer page in {out}/")


if __name__ == "__main__":
    main()
