"""Every benchmark in one table, each ratio against a baseline measured in the same run.

    python -m benchmarks [--quick]

Rows: hooked forward vs native timm ViT-B/16 (random weights); one-pass harvest of all 12 layers vs a
plain forward and vs per-layer passes; the same harvest on a NaFlex ViT-B with images of mixed sizes vs a
fixed-size batch; cache write/read MB/s (float16); SAE training steps/s vs
SAELens's SAETrainer on an in-memory tensor; the feature-statistics pass vs a forward with the SAEs
spliced (sve:shapes-vit); attribution rows vs a per-target jacrev baseline; transcoder rows (closed form
vs batched VJPs, ``bench_transcoder.py``); the harvest on 1 vs 2
processes (`sae-vision cache` through ``sae_vision_ext.launch.launch_local``, gloo). The
scripts beside this file print the detailed tables (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._timing import interleaved_medians, markdown_table


def hooked_forward(quick: bool) -> list[list[object]]:
    from benchmarks.bench_hooked_forward import build, time_contenders

    model = build("timm").eval()
    with torch.no_grad():
        t = time_contenders(model, torch.randn(8, 3, 224, 224), repeats=3 if quick else 7)
    base = t["native"]
    native = f"{base * 1e3:.0f} ms native"
    return [["hooked forward, no hooks (ViT-B/16, batch 8)", f"{t['hooked'] * 1e3:.0f} ms", native,
             f"{t['hooked'] / base:.3f}x time"],
            ["run_with_cache, residual stream", f"{t['resid_cache'] * 1e3:.0f} ms", native,
             f"{t['resid_cache'] / base:.3f}x time"]]  # fmt: skip


def harvest(quick: bool) -> list[list[object]]:
    from benchmarks.bench_harvest import cache_rates, harvest_times, training_rates
    from sae_vision_ext import HookedViT

    model = HookedViT.from_pretrained("timm:vit_base_patch16_224", pretrained=False).eval()
    t = harvest_times(model, batch=8, repeats=2 if quick else 3)
    tokens = 8 * model.cfg.n_ctx
    (c,) = cache_rates(model, 16 if quick else 64, dtypes=("float16",))
    a, b = training_rates(model.cfg.d_model, 10 if quick else 40)
    return [
        ["harvest 12 layers, one pass", f"{tokens / t['one_pass']:.0f} tok/s", f"{tokens / t['plain']:.0f} tok/s plain",
         f"{t['plain'] / t['one_pass']:.2f}x throughput"],
        ["harvest 12 layers, one pass vs per-layer passes (stopped early)", f"{t['one_pass'] * 1e3:.0f} ms",
         f"{t['per_layer_stop'] * 1e3:.0f} ms", f"{t['per_layer_stop'] / t['one_pass']:.2f}x faster"],
        ["cache float16 write (incl. forward) / read (incl. checksum)",
         f"{c['write_mb_s']:.0f} / {c['read_mb_s']:.0f} MB/s", f"{c['bytes_per_token']:.0f} B/token/hook", "-"],
        ["SAE training steps/s, our provider (TopK, d_sae 3072)", f"{b:.1f}", f"{a:.1f} SAELens in-memory",
         f"{b / a:.2f}x"],
    ]  # fmt: skip


def naflex_harvest(quick: bool) -> list[list[object]]:
    from benchmarks.bench_harvest import NAFLEX_SIZES, build_naflex_base, naflex_harvest_times

    t = naflex_harvest_times(build_naflex_base(), repeats=2 if quick else 3)
    mixed, fixed = t["tokens_mixed"] / t["mixed"], t["tokens_fixed"] / t["fixed"]
    name = f"harvest 12 layers, NaFlex ViT-B, {len(NAFLEX_SIZES)} images of mixed sizes (padding dropped)"
    return [[name, f"{mixed:.0f} real tok/s", f"{fixed:.0f} tok/s fixed 224 px", f"{mixed / fixed:.2f}x throughput"]]


def stats_pass(quick: bool) -> list[list[object]]:
    import sae_vision_ext as sve
    from sae_vision_ext.vis.stats import collect_feature_stats

    model = sve.HookedViT.from_pretrained("sve:shapes-vit")
    saes = [sve.load_sae(f"sve:shapes-vit/blocks.{layer}.hook_resid_post") for layer in range(6)]
    raw, labels = sve.make_shapes(256, seed=3).tensors()
    pixels = model.preprocess(raw)

    def spliced() -> None:
        with torch.no_grad(), model.saes(saes, use_error_term=True):
            model(pixels)

    t = interleaved_medians({"spliced": spliced, "stats": lambda: collect_feature_stats(
        model, saes, pixels, labels, top_k=16, progress=False)}, repeats=2 if quick else 5, warmup=1)  # fmt: skip
    ratio = f"{t['spliced'] / t['stats']:.2f}x throughput"
    return [["feature statistics pass, 6 SAEs (sve:shapes-vit)", f"{256 / t['stats']:.0f} img/s",
             f"{256 / t['spliced']:.0f} img/s spliced forward", ratio]]  # fmt: skip


def attribution(quick: bool) -> list[list[object]]:
    from benchmarks.bench_attribution import _shapes_rrm, part1

    rrm, pixels = _shapes_rrm()
    row = part1("", rrm, pixels, 12 if quick else 48, None)
    return [["attribution rows (sve:shapes-vit, all rows)", f"{row[2]} ms/row", f"{row[3]} ms/row jacrev",
             f"{row[4]} (max edge diff {row[5]})"]]  # fmt: skip


def transcoder_rows(quick: bool) -> list[list[object]]:
    from benchmarks.bench_transcoder import build, sample_rows

    tm, pixels = build()
    s = sample_rows(tm, pixels, 4 if quick else 16, (6,))[6]
    return [["transcoder rows, layer-skipping (ViT-B/16, TopK CLT, block 6)", f"{s['closed'] * 1e3:.0f} ms/row",
             f"{s['autograd'] * 1e3:.0f} ms/row VJP", f"{s['autograd'] / s['closed']:.2f}x faster"]]  # fmt: skip


def processes(quick: bool) -> list[list[object]]:
    from sae_vision_ext.launch import launch_local

    n = 512 if quick else 2048
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            cfg = {"model_name": "sve:shapes-vit", "dataset": "sve:shapes", "n_images": n, "images_per_shard": 64,
                   "hook_names": "all_resid_post", "cache_dir": str(Path(tmp) / f"cache{world}"),
                   "cache_dtype": "float16"}  # fmt: skip
            path = Path(tmp) / f"cfg{world}.json"
            path.write_text(json.dumps(cfg))
            threads = max(1, (os.cpu_count() or 2) // world)
            t0 = time.perf_counter()
            codes = launch_local(["cache", "--config", str(path)], world, threads_per_process=threads)
            times[world] = time.perf_counter() - t0
            if codes != [0] * world:
                raise RuntimeError(f"harvest on {world} processes failed: exit codes {codes}")
    return [[f"harvest {n} images x 6 layers, 2 processes (gloo) vs 1", f"{times[2]:.1f} s", f"{times[1]:.1f} s",
             f"{times[1] / times[2]:.2f}x faster (incl. start-up)"]]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats and smaller inputs")
    args = p.parse_args()
    rows = []
    for part in (hooked_forward, harvest, naflex_harvest, stats_pass, attribution, transcoder_rows, processes):
        rows += part(args.quick)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"{platform.machine()} {platform.processor() or ''}, Python {platform.python_version()}\n")  # fmt: skip
    print(markdown_table(["benchmark", "ours", "baseline (same run)", "ratio"], rows))


if __name__ == "__main__":
    main()
