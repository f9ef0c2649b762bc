"""Feature-statistics pass: images/s against a plain forward with the same SAEs spliced, and peak
memory as the number of images grows 10x (each size in a fresh process; should stay flat).

    python -m benchmarks.bench_feature_stats [--model sve:shapes-vit] [--images 512]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from benchmarks._timing import interleaved_medians, markdown_table

CHILD = """
import json, resource, sys, torch
import sae_vision_ext as sve
from sae_vision_ext.vis.stats import collect_feature_stats
n, model_id = int(sys.argv[1]), sys.argv[2]
model = sve.HookedViT.from_pretrained(model_id)
saes = [sve.load_sae(f"{model_id}/blocks.{l}.hook_resid_post") for l in range(model.cfg.n_layers)]
def batches():
    for start in range(0, n, 64):
        raw, _ = sve.make_shapes(min(64, n - start), seed=7, start=start).tensors()
        yield model.preprocess(raw)
stats = collect_feature_stats(model, saes, batches(), top_k=16, progress=False)
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "n_images": next(iter(stats.values())).n_images}))
"""


def main() -> None:
    import sae_vision_ext as sve
    from sae_vision_ext.vis.stats import collect_feature_stats

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sve:shapes-vit")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    model = sve.HookedViT.from_pretrained(args.model)
    saes = [sve.load_sae(f"{args.model}/blocks.{layer}.hook_resid_post") for layer in range(model.cfg.n_layers)]
    raw, labels = sve.make_shapes(args.images, seed=3).tensors()
    pixels = model.preprocess(raw)

    def spliced() -> None:
        with torch.no_grad(), model.saes(saes, use_error_term=True):
            for i in range(0, len(pixels), 64):
                model(pixels[i : i + 64])

    t = interleaved_medians(
        {"spliced": spliced,
         "stats": lambda: collect_feature_stats(model, saes, pixels, labels, top_k=16, progress=False)},
        repeats=args.repeats, warmup=1,
    )  # fmt: skip
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.model}, {len(saes)} SAEs\n")
    ratio = f"{t['spliced'] / t['stats']:.2f}x"
    rows = [["forward with all SAEs spliced", f"{args.images / t['spliced']:.0f}", "1.00x"],
            ["collect_feature_stats (all SAEs)", f"{args.images / t['stats']:.0f}", ratio]]  # fmt: skip
    print(markdown_table(["pass", "images/s", "vs spliced forward"], rows) + "\n")
    mem = []
    for n in (args.images // 4, args.images * 10 // 4):
        out = subprocess.run([sys.executable, "-c", CHILD, str(n), args.model], capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
        mem.append(json.loads(out.strip().splitlines()[-1]))
    rows = [[m["n_images"], f"{m['peak_mb']:.0f}"] for m in mem]
    rows.append(["ratio (10x images)", f"{mem[1]['peak_mb'] / mem[0]['peak_mb']:.2f}x"])
    print(markdown_table(["images", "peak RSS MB (whole process)"], rows))


if __name__ == "__main__":
    main()
