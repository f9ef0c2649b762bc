"""Transcoder attribution rows (``TranscoderReplacementModel``) on a ViT-B/16-sized model: closed form
against batched VJPs, with the FLOP floor and the projected time of a 7,500-feature-node graph.

Model: timm ``vit_base_patch16_224`` with random weights (197 tokens, 12 blocks, d 768, 12 heads) and a
random TopK cross-layer transcoder (d_sae 1024 per block, k 3: 12 × 197 × 3 = 7,092 active features,
about the issue's 7,500 nodes), float32, reading ``ln2.hook_normalized``. A layer-skipping row of a
feature at block ``l`` goes back through ``l`` attention halves, dense on every token after the first
(``engine/transcoder_rows.py``): ``transcoder_row_macs`` gives its multiply-adds, so the graph's FLOP
floor is their sum over its rows, at this machine's float32 matmul rate (measured in the same run).

Sampled rows per block (``--rows`` at blocks 1, 6 and 11) are timed with both engines, interleaved;
the whole graph's time is projected from them (every block's rows at the rate of the nearest sampled
block). ``--full`` also runs the full 7,092-row graph end to end (``attribute`` + ``prune`` +
``to_json``; long on a CPU).

    python -m benchmarks.bench_transcoder [--rows 16] [--full]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._timing import markdown_table
from benchmarks.bench_attribution import matmul_gflops


def build(d_sae: int = 1024, k: int = 3):
    """The random ViT-B/16 with a random TopK CLT, and one image."""
    from sae_vision_ext import HookedViT
    from sae_vision_ext.circuits.models import TranscoderReplacementModel
    from sae_vision_ext.saes.clt import CLTConfig, CrossLayerTranscoder

    torch.manual_seed(0)
    model = HookedViT.from_pretrained("timm:vit_base_patch16_224", pretrained=False).eval()
    cfg = model.cfg
    clt = CrossLayerTranscoder(CLTConfig(d_in=cfg.d_model, d_sae=d_sae, n_layers=cfg.n_layers, activation="topk", k=k))
    with torch.no_grad():
        for p in clt.parameters():
            p.normal_(0, 0.02)
    return TranscoderReplacementModel(model, clt), torch.randn(1, 3, 224, 224)


def sample_rows(tm, pixels, n_rows: int, blocks: tuple[int, ...]) -> dict[int, dict[str, float]]:
    """Seconds per row at ``blocks`` for both engines, and the largest edge difference between them."""
    from sae_vision_ext.circuits.engine.transcoder_attribution import TranscoderAttributor
    from sae_vision_ext.circuits.engine.transcoder_rows import TranscoderRows

    att = TranscoderAttributor(tm, batch_size=n_rows)
    rec = tm.record(pixels)
    targets = torch.zeros(1, rec.clean_out.shape[-1])
    nodes = att._nodes(rec, targets)
    rows = TranscoderRows(tm.model, tm.transcoders, rec.frozen, att._sources(rec, nodes))
    out, pre, leaves = att.forward(pixels, rec)
    result = {}
    for block in blocks:
        part = torch.arange(n_rows)
        pos, feat, n_src = nodes.pos[block][part], nodes.feat[block][part], nodes.start[block]
        seeds = pre[block][nodes.pos[block], nodes.feat[block]]
        t0 = time.perf_counter()
        closed = rows.feature_rows(block, pos, feat, n_src)
        t1 = time.perf_counter()
        vjp = att._vjp_rows(rows, seeds, part, leaves, n_src)
        t2 = time.perf_counter()
        result[block] = {
            "closed": (t1 - t0) / n_rows,
            "autograd": (t2 - t1) / n_rows,
            "diff": float((closed - vjp).abs().max() / vjp.abs().max()),
            "k": max(int(torch.bincount(nodes.pos[i]).max()) for i in range(block + 1)) * (block + 1) + 1,
        }
    del out
    return result


def full_graph(tm, pixels) -> list[list[object]]:
    t0 = time.perf_counter()
    graph = tm.attribute(pixels, batch_size=64, max_feature_nodes=None)
    t1 = time.perf_counter()
    pruned = graph.prune()
    t2 = time.perf_counter()
    pruned.to_json(Path(tempfile.mkdtemp()) / "graph.json", features=False)
    t3 = time.perf_counter()
    n_feat = graph.node_kind.count("feature")
    return [[f"attribute ({n_feat} feature rows)", f"{t1 - t0:.1f}"], ["prune", f"{t2 - t1:.1f}"],
            ["to_json", f"{t3 - t2:.1f}"], ["total", f"{t3 - t0:.1f}"]]  # fmt: skip


def main() -> None:
    from sae_vision_ext.circuits.engine.transcoder_rows import transcoder_row_macs

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=16, help="rows timed per sampled block")
    p.add_argument("--full", action="store_true", help="also run the whole graph end to end")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    tm, pixels = build()
    blocks = (1, 6, 11)
    sampled = sample_rows(tm, pixels, args.rows, blocks)
    peak = matmul_gflops()
    cfg = tm.model.cfg
    table, flops = [], {}
    for block, s in sampled.items():
        flops[block] = 2 * transcoder_row_macs(cfg.n_ctx, cfg.d_model, block + 1, s["k"])
        table.append([f"block {block} ({block} blocks back)", f"{s['closed'] * 1e3:.0f}", f"{s['autograd'] * 1e3:.0f}",
                      f"{s['autograd'] / s['closed']:.2f}x", f"{flops[block] / 1e9:.2f} GFLOP",
                      f"{flops[block] / s['closed'] / 1e9 / peak:.0%}", f"{s['diff']:.1e}"])  # fmt: skip
    header = ["rows of", "closed ms/row", "autograd ms/row", "speed-up", "FLOP floor/row", "of matmul rate", "rel diff"]
    print(f"float32 matmul rate: {peak:.0f} GFLOP/s\n")
    print(markdown_table(header, table) + "\n")
    # projection over the whole graph (every block's active features: 197 x k rows)
    rec = tm.record(pixels)
    per_block = {b: int((rec.acts[b] != 0).sum()) for b in range(cfg.n_layers)}
    nearest = {b: min(blocks, key=lambda s, b=b: abs(s - b)) for b in per_block}
    floor = sum(n * 2 * transcoder_row_macs(cfg.n_ctx, cfg.d_model, b + 1, sampled[nearest[b]]["k"])
                for b, n in per_block.items())  # fmt: skip

    def macs(block: int, k: int) -> int:
        return 2 * transcoder_row_macs(cfg.n_ctx, cfg.d_model, block + 1, k)

    projected = sum(
        n
        * sampled[nearest[b]]["closed"]
        * macs(b, sampled[nearest[b]]["k"])
        / macs(nearest[b], sampled[nearest[b]]["k"])
        for b, n in per_block.items()
    )
    n_rows = sum(per_block.values())
    print(f"graph of {n_rows} feature rows: FLOP floor {floor / 1e12:.1f} TFLOP = {floor / peak / 1e9:.0f} s at "
          f"{peak:.0f} GFLOP/s; projected closed-form rows {projected:.0f} s (issue: 15 s end to end)\n")  # fmt: skip
    if args.full:
        print(markdown_table(["step", "s"], full_graph(tm, pixels)))


if __name__ == "__main__":
    main()
