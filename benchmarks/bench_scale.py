"""Scaling out (issue 26), ratios measured in one run:

- harvest throughput (``sve:shapes-vit``, 3 residual hooks) from a webdataset (``wds:``) and from a
  Hugging Face ``save_to_disk`` dataset (``hf-dataset:``) vs a folder of the same PNGs (goal >= 0.95x);
- data-parallel training of one SAE (``data_parallel: true``) on 2 processes vs 1, one thread each
  (gloo on CPU, NCCL with ``--device cuda``), same cache and global batch (goal >= 1.7x steps/s),
  beside its ceiling on this machine (the compute-only step on 2 processes at once, half the batch
  each, vs 1) and the cost of the one all-reduce per step;
- ``stream: true`` (harvest straight into training) vs cache-then-train, wall time of the whole run.

    python -m benchmarks.bench_scale [--images 512] [--steps 40] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._timing import markdown_table

HOOKS = ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post", "blocks.5.hook_resid_post"]


def write_sources(root: Path, n: int) -> dict[str, str]:
    """The same ``n`` shapes images as a folder, webdataset shards and a Hugging Face dataset."""
    import datasets
    import webdataset as wds
    from PIL import Image

    from sae_vision_ext.data.shapes import make_shapes

    data = make_shapes(n, seed=0)
    (root / "folder").mkdir(parents=True)
    (root / "wds").mkdir()
    with wds.ShardWriter(str(root / "wds" / "s-%05d.tar"), maxcount=64, verbose=0) as sink:
        for i, img in enumerate(data.images):
            Image.fromarray(img).save(root / "folder" / f"{i:05d}.png")
            sink.write({"__key__": f"{i:05d}", "png": Image.fromarray(img)})
    n_shards = len(list((root / "wds").glob("*.tar")))
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(im) for im in data.images]})
    ds.cast_column("image", datasets.Image()).save_to_disk(str(root / "hf"))
    return {
        "folder": str(root / "folder"),
        "wds": f"wds:{root}/wds/s-{{00000..{n_shards - 1:05d}}}.tar",
        "hf-dataset": f"hf-dataset:{root}/hf",
    }


def harvest_throughput(sources: dict[str, str], device: str, repeats: int) -> dict[str, float]:
    """Images/s of open + load + preprocess + one forward for all hooks, median over interleaved repeats."""
    from sae_vision_ext.activations.harvest import harvest
    from sae_vision_ext.data.sources import image_batches, open_image_source
    from sae_vision_ext.models import HookedViT

    model = HookedViT.from_pretrained("sve:shapes-vit", device=device).eval()
    times: dict[str, list[float]] = {k: [] for k in sources}
    counts: dict[str, int] = {}
    for _ in range(repeats):
        for name, source in sources.items():
            t0 = time.perf_counter()
            ds = open_image_source(source, model.preprocess, 0, 0)
            with torch.no_grad():
                for _chunk in harvest(model, (b.to(device) for b in image_batches(ds, 64)), HOOKS, "all"):
                    pass
            times[name].append(time.perf_counter() - t0)
            counts[name] = len(ds)
    return {k: counts[k] / sorted(v)[len(v) // 2] for k, v in times.items()}


def _config(root: Path, name: str, device: str, steps: int, **over: object) -> dict:
    return {"model_name": "sve:shapes-vit", "dataset": "sve:shapes", "n_images": 512, "images_per_shard": 128,
            "hook_names": [HOOKS[1]], "cache_dir": str(root / "cache"), "output_dir": str(root / name),
            "architecture": "topk", "k": 32, "d_sae": 4096, "train_batch_size": 4096,
            "training_tokens": 4096 * steps, "shuffle_buffer_tokens": 16384, "token_selection": "all",
            "device": device, "b_dec_init": "zeros", "checkpoint_every_seconds": None, **over}  # fmt: skip


def _timed_rank(rank: int, world: int, port: int, cfg: dict, out: str) -> None:
    """One rank: join the group as torchrun would, train, write the steady-state seconds per step
    (from the 4th batch handed to the trainer to the last: set-up and the norm estimate excluded)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))  # fmt: skip
    torch.set_num_threads(1)
    from sae_vision_ext.distributed import barrier, init_from_env
    from sae_vision_ext.models import HookedViT
    from sae_vision_ext.training import checkpoints
    from sae_vision_ext.training.config import VisionSAETrainingConfig
    from sae_vision_ext.training.train import train_saes

    stamps: list[float] = []
    original = checkpoints.CountingStream.__next__

    def stamped(self: checkpoints.CountingStream) -> dict:
        stamps.append(time.perf_counter())
        return original(self)

    checkpoints.CountingStream.__next__ = stamped  # type: ignore[method-assign]
    init_from_env()
    config = VisionSAETrainingConfig(**cfg)
    model = HookedViT.from_pretrained(config.model_name, device=config.device)
    barrier()
    train_saes(config, model)
    if rank == 0:
        Path(out).write_text(json.dumps((stamps[-1] - stamps[3]) / (len(stamps) - 4)))


def ddp_steps_per_s(root: Path, device: str, steps: int) -> tuple[float, float]:
    """Steps/s of one SAE trained from the same cache on 1 and on 2 data-parallel processes."""
    from sae_vision_ext.launch import spawn_ranks

    rates = []
    for world in (1, 2):
        cfg = _config(root, f"ddp{world}", device, steps, data_parallel=True)
        out = root / f"t{world}.json"
        assert spawn_ranks(_timed_rank, world, (cfg, str(out)), 1800) == [0] * world
        rates.append(1 / json.loads(out.read_text()))
    return rates[0], rates[1]


def _compute_rank(rank: int, world: int, port: int, cfg: dict, steps: int, out: str, share: int) -> None:
    """One rank of the compute-only ceiling: the SAE step of ``ddp_steps_per_s`` (forward with a tenth of
    the features dead so AuxK runs, backward, clipping, Adam) on ``train_batch_size / share`` random rows
    with no collective in the timed steps, all ranks at once; then one all-reduce of the SAE's
    gradient-and-bookkeeping bucket, and the 7 collectives it replaced, timed alone."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))  # fmt: skip
    torch.set_num_threads(1)
    import torch.distributed as dist
    from sae_lens.saes.sae import TrainStepInput

    from sae_vision_ext.distributed import barrier, init_from_env
    from sae_vision_ext.training.config import VisionSAETrainingConfig
    from sae_vision_ext.training.train import build_training_sae

    init_from_env()
    config = VisionSAETrainingConfig(**cfg)
    sae = build_training_sae(config, HOOKS[1], 128, {}).to(config.device)
    opt = torch.optim.Adam(sae.parameters(), lr=config.lr_for(sae.cfg.d_sae))
    x = torch.randn(config.train_batch_size // share, 128, generator=torch.Generator().manual_seed(rank))
    x, dead = x.to(config.device), torch.arange(sae.cfg.d_sae, device=config.device) < sae.cfg.d_sae // 10
    times = []
    barrier()
    for i in range(steps + 2):
        t0 = time.perf_counter()
        step = TrainStepInput(sae_in=x, dead_neuron_mask=dead, coefficients={}, n_training_steps=i,
                              is_logging_step=False)  # fmt: skip
        sae.training_forward_pass(step_input=step).loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if config.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    barrier()
    reduce, before = [], []  # one bucket per step; before it: one per parameter, 2 bookkeeping, the stop flag
    if world > 1:
        bucket = torch.zeros(sum(p.numel() for p in sae.parameters()) + sae.cfg.d_sae + 1, device=config.device)
        separate = [torch.zeros_like(p) for p in sae.parameters()] + [torch.zeros(sae.cfg.d_sae)] * 2
        for _ in range(10):
            t0 = time.perf_counter()
            dist.all_reduce(bucket)
            reduce.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for t in separate:
                dist.all_reduce(t)
            flag = torch.zeros(1)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            flag.item()
            before.append(time.perf_counter() - t0)
    if rank == 0:
        median = sorted(times[2:])[len(times[2:]) // 2]
        mb = sum(p.numel() for p in sae.parameters()) * 4 / 2**20
        med = {"all_reduce": sorted(reduce)[5] if reduce else 0.0, "before": sorted(before)[5] if before else 0.0}
        Path(out).write_text(json.dumps({"step": median, "mb": mb, **med}))


def compute_ceiling(root: Path, device: str, steps: int) -> dict[str, float]:
    """Seconds per compute-only step on 1 process (full batch: ``one``; half: ``half``) and on each of 2
    at once (half batch: ``two``), the seconds of one bucket all-reduce on 2 processes (``all_reduce``),
    the bucket's size in MB (``mb``), and the seconds of the per-step collectives before the bucket
    (``before``, 7: one per parameter, two of bookkeeping, the stop flag)."""
    from sae_vision_ext.launch import spawn_ranks

    out = {}
    for name, world, share in (("one", 1, 1), ("half", 1, 2), ("two", 2, 2)):
        path = root / f"c{name}.json"
        args = (_config(root, "c", device, steps), steps, str(path), share)
        assert spawn_ranks(_compute_rank, world, args, 1800) == [0] * world
        out[name] = json.loads(path.read_text())
    two = out["two"]
    return {"one": out["one"]["step"], "half": out["half"]["step"], "two": two["step"], "all_reduce":
            two["all_reduce"], "mb": two["mb"], "before": two["before"]}  # fmt: skip


def stream_vs_cache(root: Path, device: str, steps: int) -> tuple[float, float]:
    """Wall time of harvest+train with ``stream: true`` vs building the cache and then training (1 thread)."""
    from sae_vision_ext.training.config import VisionSAETrainingConfig
    from sae_vision_ext.training.train import train_saes

    over = {"hook_names": HOOKS, "d_sae": 1024, "train_batch_size": 1024, "training_tokens": 1024 * steps,
            "shuffle_buffer_tokens": 8192, "n_images": 1024 * steps // 65 + 64}  # fmt: skip
    walls = []
    for name, extra in (("stream", {"cache_dir": None, "stream": True}), ("cached", {"cache_dir": str(root / "c2")})):
        t0 = time.perf_counter()
        train_saes(VisionSAETrainingConfig(**{**_config(root, name, device, steps), **over, **extra}))
        walls.append(time.perf_counter() - t0)
    return walls[0], walls[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", choices=["harvest", "ddp", "stream"], help="run one part")
    args = p.parse_args()
    torch.set_num_threads(1)
    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = []
        if args.only in (None, "harvest"):
            rates = harvest_throughput(write_sources(root / "src", args.images), args.device, args.repeats)
            folder = rates["folder"]
            rows += [[f"harvest from {k} ({args.images} images, 3 hooks)", f"{v:.0f} img/s",
                      f"{folder:.0f} img/s folder", f"{v / folder:.2f}x throughput"]
                     for k, v in rates.items() if k != "folder"]  # fmt: skip
        if args.only in (None, "ddp"):
            one, two = ddp_steps_per_s(root, args.device, args.steps)
            rows.append(["data-parallel SAE training, 2 processes vs 1 (1 thread each, d_sae 4096, batch 4096)",
                         f"{two:.2f} steps/s", f"{one:.2f} steps/s", f"{two / one:.2f}x"])  # fmt: skip
            c = compute_ceiling(root, args.device, max(8, args.steps // 2))
            t1, t2, reduce, mb, before = c["one"], c["two"], c["all_reduce"], c["mb"], c["before"]
            rows.append(["compute-only SAE step (no communication), 1 process on half the batch vs the whole",
                         f"{1 / c['half']:.2f} steps/s", f"{1 / t1:.2f} steps/s",
                         f"{t1 / c['half']:.2f}x (work per step)"])  # fmt: skip
            rows.append(["compute-only SAE step (no communication), 2 processes at once on half the batch vs 1",
                         f"{1 / t2:.2f} steps/s", f"{1 / t1:.2f} steps/s", f"{t1 / t2:.2f}x (ceiling)"])  # fmt: skip
            rows.append([f"one all-reduce of the step's bucket ({mb:.1f} MB, gloo, 2 processes)",
                         f"{reduce * 1e3:.1f} ms", f"{t2 * 1e3:.0f} ms compute step",
                         f"{reduce / (reduce + t2):.1%} of a step"])  # fmt: skip
            rows.append(["the step's collectives before (7: per parameter, 2 bookkeeping, stop + .item())",
                         f"{reduce * 1e3:.1f} ms (1 bucket)", f"{before * 1e3:.1f} ms",
                         f"{before / reduce:.1f}x"])  # fmt: skip
        if args.only in (None, "stream"):
            streamed, cached = stream_vs_cache(root, args.device, max(4, args.steps // 4))
            rows.append(["stream: true vs cache then train (3 hooks, 1 process)", f"{streamed:.1f} s",
                         f"{cached:.1f} s", f"{cached / streamed:.2f}x faster"])  # fmt: skip
    load = os.getloadavg()
    print(f"device {args.device}, torch {torch.__version__}, {os.cpu_count()} CPUs, load average at start "
          f"{load_at_start[0]:.1f}, at end {load[0]:.1f} (1 min), {load[2]:.1f} (15 min)")  # fmt: skip
    print(markdown_table(["benchmark", "ours", "baseline (same run)", "ratio"], rows))


if __name__ == "__main__":
    main()
