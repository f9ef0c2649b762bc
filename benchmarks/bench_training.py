"""SAE training against a 30-line reference TopK SAE, on the same cached activations, in one run.

Setting (issue 11): ``sve:shapes-vit`` ``blocks.3.hook_resid_post``, a cache of 4,096 images
(266k tokens), d_sae 512, k 16, ~1M training tokens, batch 4,096, lr 4e-4, one thread. Held-out:
512 new images. Rows:

- ours with its defaults (``b_dec`` at the data mean, decoder rows at norm 1, AuxK 1/32, dead window a
  tenth of the run), trained from the on-disk cache (``train_saes`` with ``cache_dir``);
- the reference: Adam on an in-memory copy of the same tokens, ``b_dec`` at their mean, unit-norm
  decoder init with ``W_enc = W_dec^T``, top-k then ReLU, MSE, decoder rows renormalised each step;
- the seed paper's recipe (``layer_norm`` + AuxK, ``k_aux`` 256, dead after 60 batches, 1/32), ours.

Reported: held-out FVU, dead features (fire on no held-out token), accuracy with the SAE spliced in
(no error term) against the clean model, and training time relative to the reference.

    python -m benchmarks.bench_training [--steps 244] [--images 4096]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._timing import markdown_table

HOOK = "blocks.3.hook_resid_post"


def reference_sae(mean: torch.Tensor, d_sae: int, k: int, lr: float, g: torch.Generator):
    """The 30-line TopK SAE: its weights ``(W_enc, b_enc, W_dec, b_dec)`` (``b_dec`` at ``mean``, unit-norm
    decoder rows, ``W_enc = W_dec^T``) and ``step(x)``: top-k then ReLU, MSE, Adam, decoder rows
    renormalised."""
    W_dec = torch.nn.functional.normalize(torch.randn(d_sae, mean.shape[0], generator=g), dim=-1).requires_grad_()
    W_enc = W_dec.detach().T.clone().requires_grad_()
    b_enc = torch.zeros(d_sae, requires_grad=True)
    b_dec = mean.clone().requires_grad_()
    opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=lr)

    def step(x: torch.Tensor) -> None:
        pre = (x - b_dec) @ W_enc + b_enc
        vals, idx = pre.topk(k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        loss = (z @ W_dec + b_dec - x).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            W_dec.div_(W_dec.norm(dim=-1, keepdim=True))

    return (W_enc, b_enc, W_dec, b_dec), step


def reference_topk(tokens: torch.Tensor, d_sae: int, k: int, steps: int, batch: int, lr: float, seed: int):
    """The 30-line TopK SAE trained on random batches of ``tokens`` (returns W_enc, b_enc, W_dec, b_dec)."""
    g = torch.Generator().manual_seed(seed)
    weights, step = reference_sae(tokens[:16384].mean(0), d_sae, k, lr, g)
    for _ in range(steps):
        step(tokens[torch.randint(len(tokens), (batch,), generator=g)])
    return tuple(w.detach() for w in weights)


def as_saelens(weights, k: int):
    from sae_lens import SAE

    W_enc, b_enc, W_dec, b_dec = weights
    cfg = {
        "architecture": "topk",
        "d_in": W_enc.shape[0],
        "d_sae": W_enc.shape[1],
        "k": k,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "rescale_acts_by_decoder_norm": False,
        "normalize_activations": "none",
        "metadata": {"hook_name": HOOK},
    }
    sae = SAE.from_dict(cfg)
    sae.load_state_dict({"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec})
    return sae


@torch.no_grad()
def held_out_scores(model, sae, acts: torch.Tensor, pixels: torch.Tensor, labels: torch.Tensor) -> dict:
    feats = sae.encode(acts)
    recon = sae.decode(feats)
    fvu = float((acts - recon).pow(2).sum() / (acts - acts.mean(0)).pow(2).sum())
    dead = float(((feats != 0).sum(0) == 0).float().mean())
    logits = model.run_with_saes(pixels, saes=[sae])
    return {"fvu": fvu, "dead": dead, "acc": float((logits.argmax(-1) == labels).float().mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=244)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4096)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import sae_vision_ext as sve
    from sae_vision_ext.activations.cache import CachedActivations
    from sae_vision_ext.activations.harvest import harvest
    from sae_vision_ext.training.config import VisionSAETrainingConfig
    from sae_vision_ext.training.train import cache_settings, train_saes

    model = sve.HookedViT.from_pretrained("sve:shapes-vit")
    x_val, y_val = sve.make_shapes(512, seed=999).tensors()
    pixels = model.preprocess(x_val)
    (val_acts,) = harvest(model, [pixels], [HOOK])
    val_acts = val_acts[HOOK]
    with torch.no_grad():
        clean = float((model(pixels).argmax(-1) == y_val).float().mean())
    tokens_total = args.steps * args.batch
    rows, times = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        common = dict(
            model_name="sve:shapes-vit",
            hook_names=[HOOK],
            n_images=args.images,
            d_sae=512,
            k=16,
            lr=4e-4,
            train_batch_size=args.batch,
            training_tokens=tokens_total,
            image_batch_size=128,
            shuffle_buffer_tokens=4 * args.batch,
            cache_dir=f"{tmp}/cache",
        )
        cfg = VisionSAETrainingConfig(**common, output_dir=f"{tmp}/ours")
        train_saes(VisionSAETrainingConfig(**{**common, "training_tokens": args.batch}, output_dir=f"{tmp}/warm"))
        folder = Path(cfg.cache_dir) / cache_settings(cfg, [HOOK], args.images).key
        t = time.perf_counter()
        tokens = torch.cat([CachedActivations(folder).load_shard(i)[HOOK] for i in range(-(-args.images // 256))])
        gather = time.perf_counter() - t
        t = time.perf_counter()
        ref = as_saelens(reference_topk(tokens, 512, 16, args.steps, args.batch, 4e-4, seed=0), 16)
        times["reference"] = time.perf_counter() - t
        t = time.perf_counter()
        ours = train_saes(cfg)[HOOK]
        times["ours"] = time.perf_counter() - t
        seed_cfg = VisionSAETrainingConfig(
            **{
                **common,
                "normalize_activations": "layer_norm",
                "k_aux": 256,
                "dead_feature_window_tokens": 60 * args.batch,
                "lr": 4e-4,
            },
            output_dir=f"{tmp}/seed",
        )
        t = time.perf_counter()
        seed = train_saes(seed_cfg)[HOOK]
        times["seed recipe"] = time.perf_counter() - t
        for name, sae in (
            ("ours, defaults", ours),
            ("30-line reference", ref),
            ("seed recipe (layer_norm + AuxK)", seed),
        ):
            s = held_out_scores(model, sae, val_acts, pixels, y_val)
            key = "ours" if name.startswith("ours") else "reference" if name.startswith("30") else "seed recipe"
            rows.append(
                [
                    name,
                    f"{s['fvu']:.3f}",
                    f"{100 * s['dead']:.1f}%",
                    f"{s['acc']:.3f}",
                    f"{times[key]:.1f} s",
                    f"{times[key] / times['reference']:.2f}x",
                ]
            )
        stream_rows = stream_table(CachedActivations(folder), tokens, gather, args.steps, args.batch, cfg)
    print(
        f"{len(tokens)} cached tokens, {tokens_total} training tokens, clean accuracy {clean:.3f}, "
        f"reading the cache into memory {gather:.2f} s"
    )
    print(markdown_table(["trainer", "FVU", "dead", "spliced acc", "time", "vs reference"], rows))
    print()
    print(markdown_table(["batches of the run", "time", "vs in-memory gather"], stream_rows))


def stream_table(reader, tokens: torch.Tensor, load: float, steps: int, batch: int, cfg) -> list[list[str]]:
    """The training stream over the cache (as ``train_saes`` reads it: the cache read into memory
    once, since it is under ``cache_in_memory_gb``; and the streaming path) against batches gathered
    from the tokens in memory, for the run's number of batches: the baseline counts reading the cache
    into memory (``load`` seconds) and the gathers; the gathers alone are shown too."""

    def run(stream) -> float:
        t = time.perf_counter()
        for _, _ in zip(stream, range(steps), strict=False):
            pass
        return time.perf_counter() - t

    g = torch.Generator().manual_seed(0)
    gathers = run(tokens[torch.randint(len(tokens), (batch,), generator=g)] for _ in range(steps))
    base = load + gathers
    budget = int(cfg.cache_in_memory_gb * 2**30)
    out = [
        ["read the cache into memory, then gather (baseline)", f"{base:.2f} s", "1.00x"],
        ["the gathers alone (reading not counted)", f"{gathers:.2f} s", f"{gathers / base:.2f}x"],
    ]
    for name, nbytes in (("cache stream (default: read into memory)", budget), ("cache stream from disk", 0)):
        seconds = run(reader.batches(batch, cfg.shuffle_buffer_tokens, cfg.seed, epochs=None, in_memory_bytes=nbytes))
        out.append([name, f"{seconds:.2f} s", f"{seconds / base:.2f}x"])
    return out


if __name__ == "__main__":
    main()
