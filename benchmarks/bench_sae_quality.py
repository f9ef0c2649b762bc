"""SAE quality the way ViSAEBench compares vision SAEs: our trainer against the peers' on the same
``sve:shapes-vit`` activations, at the same width, L0 and tokens.

    python benchmarks/bench_sae_quality.py [--tokens 100000] [--seeds 3] [--out runs/bench_sae_quality]
        [--trainers ours,saelens-topk] [--merge]  # a subset; --merge keeps the others' rows of results.json

Trainers (hook ``blocks.3.hook_resid_post``, all 65 tokens per image, width 512 (4x), k 16, batch
1024, the same ``--tokens`` from the same ``sve:shapes`` images, seed 0):

- ``ours``: ``VisionSAETrainingConfig`` defaults (TopK + AuxK 1/32, the learning rate scaled by width,
  ``2e-4 * (2**14 / d_sae) ** 0.5`` = 1.13e-3 here, ``b_dec`` at the data mean, unit-norm decoder rows);
- ``seed-paper``: ``VisionSAETrainingConfig.seed_paper`` (``layer_norm`` input, AuxK ``k_aux`` 256,
  lr 2e-4, ``b_dec`` 0) at this width, k and batch;
- ``saelens-topk`` / ``-batchtopk`` / ``-matryoshka``: SAELens's own training classes with SAELens's
  defaults (``b_dec`` 0, decoder norm 0.1; TopK's aux coefficient 1.0), Adam 4e-4;
- ``overcomplete-topk``: overcomplete 0.3.0's ``TopKSAE`` + ``train_sae`` with its
  ``top_k_auxiliary_loss`` (Adam 5e-4), loaded with ``load_sae(format="overcomplete")``;
- ``dictionary_learning-topk``: dictionary-learning 0.1.0's ``trainSAE`` with ``TopKTrainer``,
  loaded with ``load_sae`` (its ``ae.pt`` folder).

Each trainer runs with ``--seeds`` initialisation seeds (data fixed). ViSAEBench's metrics
(``sve.benchmark_sae``) are measured on every seed's SAE on 256 fresh images (seed 4242) with M5's
evaluator ``sve:shapes-vit-biased``, M6's out-of-domain set ``sve:shapes-marker`` (128 images) and
M7's hierarchy one parent of the six shapes, mean ± spread (standard deviation) over the seeds;
stability is the share of decoder rows matched at cosine >= 0.7 across the seeds
(``saes/stability.py``), mean ± spread over the seed pairs. A cell is bold when it is best or tied:
within the larger of its own and the best's spread of the best mean (:func:`best_or_tied`).

Peers are test-only installs that leave torch alone:
``pip install --no-deps overcomplete==0.3.0 dictionary-learning==0.1.0 nnsight==0.8.1
opencv-python-headless scikit-image lazy_loader`` (overcomplete 0.3.0 imports
``matplotlib.cm.get_cmap``, removed in matplotlib 3.9: this script restores the alias before importing it).
"""

from __future__ import annotations

import argparse
import json
import math
import time
import traceback
from pathlib import Path

import torch

import sae_vision_ext as sve
from sae_vision_ext.saes.benchmark import METRICS, patch_activations
from sae_vision_ext.saes.benchmark_report import SHORT
from sae_vision_ext.saes.stability import stability

MODEL, HOOK, K, D_SAE, BATCH, TOKENS_PER_IMAGE = "sve:shapes-vit", "blocks.3.hook_resid_post", 16, 512, 1024, 65


def _ours_config(name: str, tokens: int, seed: int, out: Path) -> sve.VisionSAETrainingConfig:
    n_images = math.ceil(tokens / TOKENS_PER_IMAGE)
    common = dict(
        model_name=MODEL,
        hook_names=HOOK,
        dataset="sve:shapes",
        n_images=n_images,
        token_selection="all",
        k=K,
        d_sae=D_SAE,
        training_tokens=tokens,
        train_batch_size=BATCH,
        seed=0,
        init_seed=seed,
        output_dir=str(out),
    )
    if name == "ours":
        return sve.VisionSAETrainingConfig(architecture="topk", **common)
    if name == "seed-paper":
        return sve.VisionSAETrainingConfig.seed_paper(
            "vit", layers=None, per_layer={}, dead_feature_window_tokens=60 * BATCH, **common
        )
    saelens = dict(b_dec_init="zeros", decoder_init_norm=0.1, lr=4e-4)
    if name == "saelens-topk":
        return sve.VisionSAETrainingConfig(architecture="topk", aux_coefficient=1.0, **saelens, **common)
    if name == "saelens-batchtopk":
        return sve.VisionSAETrainingConfig(architecture="batchtopk", **saelens, **common)
    if name == "saelens-matryoshka":
        return sve.VisionSAETrainingConfig(architecture="matryoshka_batchtopk", **saelens, **common)
    raise ValueError(name)


def _train_activations(tokens: int) -> torch.Tensor:
    """The training tokens the configs above harvest: sve:shapes seed 0, every token, float32 [n, 128]."""
    model = sve.HookedViT.from_pretrained(MODEL)
    x, _ = sve.make_shapes(math.ceil(tokens / TOKENS_PER_IMAGE), seed=0).tensors()
    pixels = model.preprocess(x)
    with torch.no_grad():
        parts = []
        for i in range(0, len(pixels), 128):
            _, cache = model.run_with_cache(
                pixels[i : i + 128], names_filter=HOOK, stop_at_layer=4, return_cache_object=False
            )
            parts.append(cache[HOOK].flatten(0, 1))
    return torch.cat(parts)[:tokens]


def _overcomplete(acts: torch.Tensor, seed: int, out: Path):
    import matplotlib
    import matplotlib.cm

    if not hasattr(matplotlib.cm, "get_cmap"):
        matplotlib.cm.get_cmap = matplotlib.colormaps.get_cmap
    from overcomplete.sae import TopKSAE, train_sae
    from overcomplete.sae.losses import top_k_auxiliary_loss

    torch.manual_seed(seed)
    sae = TopKSAE(acts.shape[1], D_SAE, top_k=K)
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(acts[torch.randperm(len(acts), generator=g)], batch_size=BATCH)
    train_sae(sae, loader, top_k_auxiliary_loss, torch.optim.Adam(sae.parameters(), lr=5e-4), nb_epochs=1, monitoring=0)
    sae.eval()
    out.mkdir(parents=True, exist_ok=True)
    torch.save(sae.state_dict(), out / "sae.pt")
    return sve.load_sae(
        out / "sae.pt", hook_name=HOOK, format="overcomplete", cfg_overrides={"overcomplete_class": "TopKSAE", "k": K}
    )


def _dictionary_learning(acts: torch.Tensor, seed: int, out: Path):
    from dictionary_learning.trainers.top_k import AutoEncoderTopK, TopKTrainer
    from dictionary_learning.training import trainSAE

    steps = len(acts) // BATCH
    g = torch.Generator().manual_seed(seed)
    shuffled = acts[torch.randperm(len(acts), generator=g)]
    config = dict(
        trainer=TopKTrainer,
        dict_class=AutoEncoderTopK,
        steps=steps,
        activation_dim=acts.shape[1],
        dict_size=D_SAE,
        k=K,
        layer=3,
        lm_name=MODEL,
        warmup_steps=max(1, steps // 20),
        seed=seed,
        device="cpu",
    )
    data = (shuffled[i * BATCH : (i + 1) * BATCH] for i in range(steps))
    trainSAE(data, [config], steps=steps, save_dir=str(out), device="cpu")
    return sve.load_sae(out / "trainer_0", hook_name=HOOK)


def train(name: str, tokens: int, seed: int, out: Path, acts: torch.Tensor, ours: dict | None = None):
    if name == "overcomplete-topk":
        return _overcomplete(acts, seed, out)
    if name == "dictionary_learning-topk":
        return _dictionary_learning(acts, seed, out)
    cfg = _ours_config(name, tokens, seed, out)
    if name == "ours" and ours:
        cfg = sve.VisionSAETrainingConfig.from_dict(cfg.to_dict() | ours)
    return sve.train_saes(cfg)[HOOK]


TRAINERS = (
    "ours",
    "seed-paper",
    "saelens-topk",
    "saelens-batchtopk",
    "saelens-matryoshka",
    "overcomplete-topk",
    "dictionary_learning-topk",
)


def main() -> None:
    """Train every trainer with every seed, benchmark the seed-0 SAEs, print and save the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=100_000, help="training tokens per SAE")
    p.add_argument("--seeds", type=int, default=3, help="initialisation seeds per trainer")
    p.add_argument("--trainers", default=",".join(TRAINERS), help="comma-separated subset of the trainers")
    p.add_argument("--out", default="runs/bench_sae_quality", help="folder for the SAEs and results.json")
    p.add_argument(
        "--ours-config",
        default="{}",
        help="JSON of VisionSAETrainingConfig fields replacing ours' defaults (recipe variants), e.g. '{\"lr\": 4e-4}'",
    )
    p.add_argument(
        "--merge", action="store_true", help="keep the other trainers' rows of an existing results.json in --out"
    )
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    model = sve.HookedViT.from_pretrained(MODEL)
    evaluator = sve.HookedViT.from_pretrained("sve:shapes-vit-biased")
    x, y = sve.make_shapes(256, seed=4242).tensors()
    pixels = model.preprocess(x)
    ox, oy = sve.make_shapes(128, seed=4243, balanced=True).tensors()  # sve:shapes-marker's images
    ood = {"sve:shapes-marker": (model.preprocess(ox), oy)}
    groups = {"all shapes": range(6)}
    acts = _train_activations(args.tokens)
    previous = out / "results.json"
    results: dict[str, dict] = json.loads(previous.read_text()) if args.merge and previous.exists() else {}
    for name in args.trainers.split(","):
        start = time.perf_counter()
        try:
            ours = json.loads(args.ours_config)
            saes = [train(name, args.tokens, s, out / name / f"seed{s}", acts, ours) for s in range(args.seeds)]
        except Exception as e:  # a peer's trainer that fails is reported, not hidden
            results[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=3)}
            print(f"{name}: FAILED {e}", flush=True)
            continue
        train_s = time.perf_counter() - start
        benches = [
            sve.benchmark_sae(model, sae, pixels, y, evaluator=evaluator, ood=ood, sibling_groups=groups)
            for sae in saes
        ]
        stab = stability(saes, threshold=0.7) if len(saes) > 1 else None
        l0 = float(
            (saes[0].encode(patch_activations(model, HOOK, pixels[:64]).flatten(0, 1)) != 0).float().sum(-1).mean()
        )
        results[name] = {
            "per_seed": [b.values() for b in benches],
            "higher_is_better": {r.key: r.higher_is_better for r in benches[0].rows},
            "skipped": {r.key: r.skipped for r in benches[0].rows if r.skipped},
            "stability": stab.to_dict() if stab else None,
            "l0_patches": l0,
            "train_seconds": train_s,
        }
        print(name, json.dumps(results[name]["per_seed"]), stab.to_dict() if stab else "", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(table({n: results[n] for n in TRAINERS if n in results}))


def _mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False)) if len(values) > 1 else 0.0


def columns(results: dict[str, dict]) -> dict[str, dict[str, tuple[float, float] | None]]:
    """``{trainer: {column: (mean, spread)}}`` for M1-M7 (over the seeds) and ``stability`` (over the pairs)."""
    cols: dict[str, dict[str, tuple[float, float] | None]] = {}
    for name, r in results.items():
        if "per_seed" not in r:
            continue
        row: dict[str, tuple[float, float] | None] = {}
        for m in METRICS:
            vals = [v[m] for v in r["per_seed"] if v[m] is not None]
            row[m] = _mean_std(vals) if vals else None
        s = r["stability"]
        row["stability"] = (s["mean"], s["std"]) if s else None
        cols[name] = row
    return cols


def best_or_tied(results: dict[str, dict]) -> dict[str, set[str]]:
    """``{column: trainers best or tied}``: a trainer ties the best mean when the two differ by at most the
    larger of their spreads, or by less than the table's rounding (5e-5)."""
    cols = columns(results)
    higher = {m: True for m in (*METRICS, "stability")}
    for r in results.values():
        higher.update(r.get("higher_is_better", {}))
    out: dict[str, set[str]] = {}
    for m in (*METRICS, "stability"):
        have = {n: c[m] for n, c in cols.items() if c[m] is not None}
        if not have:
            continue
        best = max(have, key=lambda n: have[n][0] if higher[m] else -have[n][0])
        b_mean, b_std = have[best]
        out[m] = {n for n, (mu, sd) in have.items() if abs(mu - b_mean) <= max(sd, b_std, 5e-5)}
    return out


def table(results: dict[str, dict]) -> str:
    """The markdown table of ``results.json`` (``python -c "import bench_sae_quality as b, json;
    print(b.table(json.load(open('results.json'))))"`` from ``benchmarks/`` reprints it): mean ± spread,
    best or tied in bold, and how many of the eight columns each trainer is best or tied on."""
    cols, best = columns(results), best_or_tied(results)
    head = [SHORT[m] for m in METRICS] + ["matched ≥ 0.7 ↑", "best or tied"]
    lines = ["| trainer | L0 (patches) | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]
    for name, row in cols.items():
        cells = []
        for m in (*METRICS, "stability"):
            if row[m] is None:
                cells.append("skipped" if m != "stability" else "-")
                continue
            mu, sd = row[m]
            cell = f"{mu:.4f} ± {sd:.4f}" if m != "stability" else f"{mu:.3f} ± {sd:.3f}"
            if m == "stability":
                cell += f" (cos {results[name]['stability']['mean_cosine']:.3f})"
            cells.append(f"**{cell}**" if name in best.get(m, ()) else cell)
        wins = sum(name in names for names in best.values())
        lines.append(f"| {name} | {results[name]['l0_patches']:.1f} | " + " | ".join(cells) + f" | {wins}/8 |")
    for name, r in results.items():
        if "error" in r:
            lines.append(f"\n{name}: not run ({r['error']}).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
