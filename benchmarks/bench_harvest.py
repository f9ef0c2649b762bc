"""Harvest, cache and SAE-training throughput, each against a baseline measured in the same run.

    python -m benchmarks.bench_harvest [--model timm:vit_base_patch16_224] [--batch 16] [--repeats 3]

1. Tokens/s harvesting every layer's ``hook_resid_post`` in one pass, vs a plain forward (no hooks),
   vs one pass per layer (a) running the full model each time and (b) stopping after that layer.
   Goals: one pass >= 0.9x plain-forward throughput, >= 8x faster than per-layer passes.
   NaFlex (``--naflex``): a batch of images of mixed sizes and aspect ratios (timm NaFlexVit at ViT-B
   size, each image at most 196 patches, padded to the longest) vs a fixed-size 224 px batch of the
   same model, and vs the native NaFlex forward on the same mixed batch; real (non-padding) tokens/s.
2. Cache write and read MB/s and bytes per token for float32, float16, bfloat16.
3. SAE training steps/s fed by our cache reader vs SAELens's ``SAETrainer`` fed an in-memory tensor.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._timing import interleaved_medians, markdown_table
from sae_vision_ext import HookedViT
from sae_vision_ext.activations.harvest import harvest, resolve_hook_names


@torch.no_grad()
def harvest_times(model: HookedViT, batch: int, repeats: int) -> dict[str, float]:
    """Median seconds per batch: plain forward, one-pass harvest, per-layer passes (full / stopped)."""
    x = torch.randn(batch, 3, *model.cfg.image_size)
    hooks = resolve_hook_names("all_resid_post", model.cfg.n_layers)

    def per_layer(stop: bool) -> None:
        for i, h in enumerate(hooks):
            model.run_with_cache(x, names_filter=h, stop_at_layer=i + 1 if stop else None)

    t = interleaved_medians(
        {
            "plain": lambda: model(x),
            "one_pass": lambda: next(harvest(model, [x], hooks)),
            "per_layer_full": lambda: per_layer(False),
            "per_layer_stop": lambda: per_layer(True),
        },
        repeats=repeats,
        warmup=1,
    )
    return t


NAFLEX_SIZES = [(224, 224), (160, 304), (304, 160), (128, 384), (384, 128), (192, 256), (256, 192), (112, 448)]
"""Eight (height, width) at most 196 patches of 16 px each (NaFlex's budget for a 224 px model)."""


@torch.no_grad()
def naflex_harvest_times(model: HookedViT, repeats: int) -> dict[str, float]:
    """Median seconds per batch of ``len(NAFLEX_SIZES)`` images: the one-pass harvest of every layer's
    ``hook_resid_post`` on the mixed sizes, on a fixed 224 px batch, and the native forward (timm's
    NaFlex inputs) on the mixed sizes. Also the real tokens of each batch (``tokens_mixed``, ``tokens_fixed``)."""
    images = [torch.randn(3, h, w) for h, w in NAFLEX_SIZES]
    fixed = torch.randn(len(images), 3, 224, 224)
    hooks = resolve_hook_names("all_resid_post", model.cfg.n_layers)
    native_inputs = model.adapter.native_inputs(images)
    t = interleaved_medians(
        {
            "mixed": lambda: next(harvest(model, [images], hooks)),
            "fixed": lambda: next(harvest(model, [fixed], hooks)),
            "native_mixed": lambda: model.wrapped(**native_inputs),
        },
        repeats=repeats,
        warmup=1,
    )
    p, n_prefix = model.cfg.patch_size, model.cfg.n_prefix_tokens
    t["tokens_mixed"] = sum(n_prefix + (h // p) * (w // p) for h, w in NAFLEX_SIZES)
    t["tokens_fixed"] = len(images) * (n_prefix + (224 // p) ** 2)
    return t


def build_naflex_base() -> HookedViT:
    """timm ``naflexvit_base_patch16_gap`` (ViT-B/16, CLS + 3 registers, avg pool) with random weights."""
    import timm

    return HookedViT.from_model(timm.create_model("naflexvit_base_patch16_gap", pretrained=False)).eval()


def harvest_table(model: HookedViT, batch: int, repeats: int) -> str:
    t = harvest_times(model, batch, repeats)
    hooks = resolve_hook_names("all_resid_post", model.cfg.n_layers)
    tokens = batch * model.cfg.n_ctx
    rows = [
        [name, f"{t[name] * 1e3:.0f}", f"{tokens / t[name]:.0f}", f"{t['plain'] / t[name]:.2f}x",
         f"{t[name] / t['one_pass']:.2f}x"]
        for name in ("plain", "one_pass", "per_layer_full", "per_layer_stop")
    ]  # fmt: skip
    header = ["method", "ms / batch", "tokens/s", "throughput vs plain", "time vs one pass"]
    return f"{model.cfg.n_layers} layers, {len(hooks)} hooks, batch {batch}\n\n" + markdown_table(header, rows)


def cache_rates(model: HookedViT, n_images: int, dtypes=("float32", "float16", "bfloat16")) -> list[dict]:
    """Per dtype: bytes per token per hook, write MB/s (including the forward) and read MB/s."""
    from torch.utils.data import TensorDataset

    from sae_vision_ext.activations.cache import CachedActivations, CacheSettings, build_cache

    class Images(TensorDataset):
        fingerprint = "bench-random"

    data = Images(torch.randn(n_images, 3, *model.cfg.image_size))
    hooks = tuple(resolve_hook_names("all_resid_post", model.cfg.n_layers, layers=[0, model.cfg.n_layers - 1]))
    out = []
    with tempfile.TemporaryDirectory() as root:
        for dtype in dtypes:
            s = CacheSettings("bench", hooks, "bench-random", n_images, dtype=dtype, images_per_shard=n_images // 4)
            t0 = time.perf_counter()
            folder = build_cache(model, data, s, root, image_batch_size=16, progress=False)
            write = time.perf_counter() - t0
            size = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
            reader = CachedActivations(folder)
            t0 = time.perf_counter()
            for i in range(s.n_shards):
                reader.load_shard(i)
            read = time.perf_counter() - t0
            out.append({"dtype": dtype, "bytes_per_token": size / reader.n_tokens / len(hooks),
                        "write_mb_s": size / 1e6 / write, "read_mb_s": size / 1e6 / read})  # fmt: skip
    return out


def cache_table(model: HookedViT, n_images: int) -> str:
    hooks = resolve_hook_names("all_resid_post", model.cfg.n_layers, layers=[0, model.cfg.n_layers - 1])
    rows = [[r["dtype"], f"{r['bytes_per_token']:.0f}", f"{r['write_mb_s']:.1f}", f"{r['read_mb_s']:.0f}"]
            for r in cache_rates(model, n_images)]  # fmt: skip
    header = ["dtype", "bytes / token / hook", "write MB/s (incl. forward)", "read MB/s (incl. checksum)"]
    return f"{n_images} images, {len(hooks)} hooks\n\n" + markdown_table(header, rows)


def training_rates(d_in: int, steps: int) -> tuple[float, float]:
    """Steps/s of SAELens's SAETrainer fed an in-memory tensor, and fed by our ShuffleBuffer."""
    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    batch = 1024
    data = torch.randn(batch * 64, d_in)

    def run(provider_factory) -> float:
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=4 * d_in, k=32))
        cfg = SAETrainerConfig(total_training_samples=batch * steps, train_batch_size_samples=batch, lr=4e-4,
                               lr_end=4e-5, logger=LoggingConfig(log_to_wandb=False))  # fmt: skip
        t0 = time.perf_counter()
        SAETrainer(cfg=cfg, sae=sae, data_provider=provider_factory()).fit()
        return steps / (time.perf_counter() - t0)

    def in_memory():
        while True:
            for i in range(0, len(data), batch):
                yield data[i : i + batch]

    from sae_vision_ext.activations.harvest import ShuffleBuffer

    def ours():
        chunks = ({"h": data[i : i + 4096]} for _ in iter(int, 1) for i in range(0, len(data), 4096))
        return (b["h"] for b in ShuffleBuffer(16_384, batch)(chunks))

    return run(in_memory), run(ours)


def training_table(d_in: int, steps: int) -> str:
    batch = 1024
    a, b = training_rates(d_in, steps)
    rows = [["SAELens SAETrainer, in-memory tensor", f"{a:.1f}", "1.00x"], ["our ShuffleBuffer provider", f"{b:.1f}",
            f"{b / a:.2f}x"]]  # fmt: skip
    return f"TopK SAE d_in {d_in}, d_sae {4 * d_in}, batch {batch}, {steps} steps\n\n" + markdown_table(
        ["data provider", "steps/s", "vs in-memory"], rows
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="timm:vit_base_patch16_224")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache-images", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=40)
    p.add_argument("--naflex", action="store_true", help="only the NaFlex mixed-size harvest (timm NaFlexVit ViT-B)")
    args = p.parse_args()
    if args.naflex:
        t = naflex_harvest_times(build_naflex_base(), args.repeats)
        mixed, fixed = t["tokens_mixed"] / t["mixed"], t["tokens_fixed"] / t["fixed"]
        rows = [["one pass, mixed sizes", f"{t['mixed'] * 1e3:.0f}", f"{mixed:.0f}", f"{mixed / fixed:.2f}x"],
                ["one pass, fixed 224 px", f"{t['fixed'] * 1e3:.0f}", f"{fixed:.0f}", "1.00x"],
                ["native NaFlex forward, mixed sizes", f"{t['native_mixed'] * 1e3:.0f}",
                 f"{t['tokens_mixed'] / t['native_mixed']:.0f}", "-"]]  # fmt: skip
        header = ["harvest (12 layers, 8 images)", "ms / batch", "real tokens/s", "vs fixed size"]
        print(markdown_table(header, rows))
        return
    model = HookedViT.from_pretrained(args.model, pretrained=False).eval()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, model {args.model} (random weights)\n")
    print("## Harvest\n\n" + harvest_table(model, args.batch, args.repeats) + "\n")
    print("## Cache\n\n" + cache_table(model, args.cache_images) + "\n")
    print("## SAE training\n\n" + training_table(model.cfg.d_model, args.train_steps))


if __name__ == "__main__":
    main()
