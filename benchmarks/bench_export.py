"""Export against the science it exports: on ``sve:shapes-vit`` with its shipped SAEs, one image,
the full graph (every active feature's row): ``attribute`` vs ``prune`` (circuit-tracer's pruning),
``to_json`` (circuit-tracer's files, feature files included) and ``render_graph_html`` (the viewer),
each a median over interleaved repeats. Target (issue 12): export ≤ attribute. Also timed, as ``sae-vision
trace`` runs them by default: the by-feature supernodes and the attention report (head loadings of the 50
strongest edges, QK attributions of 20 entries), which ``to_json`` and the viewer then carry.

    python -m benchmarks.bench_export [--repeats 3] [--image 0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._timing import markdown_table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--image", type=int, default=0)
    args = p.parse_args()
    import sae_vision_ext as sve
    from sae_vision_ext.circuits.engine.attention_report import attention_report
    from sae_vision_ext.circuits.graph.supernodes import exported_supernodes
    from sae_vision_ext.circuits.graph.viewer import render_graph_html

    model = sve.HookedViT.from_pretrained("sve:shapes-vit")
    rrm = sve.ResidualReplacementModel(
        model, [sve.load_sae(f"sve:shapes-vit/blocks.{i}.hook_resid_post") for i in range(model.cfg.n_layers)]
    )
    raw, _ = sve.make_shapes(args.image + 1, seed=0).tensors()
    x = model.preprocess(raw)[args.image : args.image + 1]
    times: dict[str, list[float]] = {
        k: [] for k in ("attribute", "prune", "to_json", "render_graph_html", "supernodes", "attention_report")
    }
    out = Path(tempfile.mkdtemp())
    rrm.attribute(x)  # warm-up
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        graph = rrm.attribute(x)
        t1 = time.perf_counter()
        pruned = graph.prune()
        t2 = time.perf_counter()
        groups = exported_supernodes(pruned)
        t3 = time.perf_counter()
        attention = attention_report(rrm, x, pruned)
        t4 = time.perf_counter()
        exported = pruned.to_json(out / "g.json", rrm=rrm, supernodes=groups, attention=attention)
        t5 = time.perf_counter()
        render_graph_html(pruned, out / "g.html", rrm, x, supernodes=groups, attention=attention)
        t6 = time.perf_counter()
        steps = {"attribute": t1 - t0, "prune": t2 - t1, "supernodes": t3 - t2, "attention_report": t4 - t3}
        steps |= {"to_json": t5 - t4, "render_graph_html": t6 - t5}
        for k, v in steps.items():
            times[k].append(v)
    med = {k: float(torch.tensor(v).median()) for k, v in times.items()}
    export = med["prune"] + med["to_json"] + med["render_graph_html"]
    n_files = len(list((out / "features").glob("*.json")))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    rows = [
        ["attribute (baseline)", f"{med['attribute']:.2f} s", f"{graph.n_nodes} nodes, {graph.adjacency._nnz()} edges"],
        ["prune", f"{med['prune']:.2f} s", f"{int(pruned.node_mask.sum())} nodes kept"],
        [
            "to_json (graph + graph-metadata + feature files)",
            f"{med['to_json']:.2f} s",
            f"{len(exported['nodes'])} nodes, {len(exported['links'])} links, {n_files} feature files",
        ],
        ["render_graph_html", f"{med['render_graph_html']:.2f} s", f"{(out / 'g.html').stat().st_size / 1e6:.2f} MB"],
        ["export total / attribute", f"{export / med['attribute']:.2f}x", f"{size:.1f} MB written in all"],
        ["supernodes (by feature, exported nodes)", f"{med['supernodes']:.2f} s", f"{len(groups)} groups"],
        [
            "attention_report (heads of 50 edges, 20 QK entries)",
            f"{med['attention_report']:.2f} s",
            f"{len(attention['edges'])} edges, {len(attention['entries'])} entries, "
            f"{(out / 'g.attention.json').stat().st_size / 1e3:.0f} kB",
        ],
    ]
    print(markdown_table(["step", "median time", "size"], rows))


if __name__ == "__main__":
    main()
