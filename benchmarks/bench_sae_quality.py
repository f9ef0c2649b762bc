"""SAE quality the way ViSAEBench compares vision SAEs: our trainer against the peers' on the same
``sve:shapes-vit`` activations, at the same width, L0 and tokens.

    python benchmarks/bench_sae_quality.py [--tokens 100000] [--seeds 3] [--out runs/bench_sae_quality]

Trainers (hook ``blocks.3.hook_resid_post``, all 65 tokens per image, width 512 (4x), k 16, batch
1024, the same ``--tokens`` from the same ``sve:shapes`` images, seed 0):

- ``ours``: ``VisionSAETrainingConfig`` defaults (TopK + AuxK 1/32, ``b_dec`` at the data mean,
  unit-norm decoder rows);
- ``seed-paper``: ``VisionSAETrainingConfig.seed_paper`` (``layer_norm`` input, AuxK ``k_aux`` 256,
  lr 2e-4, ``b_dec`` 0) at this width, k and batch;
- ``saelens-topk`` / ``-batchtopk`` / ``-matryoshka``: SAELens's own training classes with SAELens's
  defaults (``b_dec`` 0, decoder norm 0.1; TopK's aux coefficient 1.0);
- ``overcomplete-topk``: overcomplete 0.3.0's ``TopKSAE`` + ``train_sae`` with its
  ``top_k_auxiliary_loss`` (Adam 5e-4), loaded with ``load_sae(format="overcomplete")``;
- ``dictionary_learning-topk``: dictionary-learning 0.1.0's ``trainSAE`` with ``TopKTrainer``,
  loaded with ``load_sae`` (its ``ae.pt`` folder).

Each trainer runs with ``--seeds`` initialisation seeds (data fixed). ViSAEBench's metrics
(``sve.benchmark_sae``) are measured on the seed-0 SAE on 256 fresh images (seed 4242) with M5's
evaluator ``sve:shapes-vit-biased``, M6's out-of-domain set ``sve:shapes-marker`` (128 images) and
M7's hierarchy one parent of the six shapes; stability is the share of decoder rows matched at
cosine >= 0.7 across the seeds (``saes/stability.py``), mean ± spread over the seed pairs.

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
    saelens = dict(b_dec_init="zeros", decoder_init_norm=0.1)
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


def train(name: str, tokens: int, seed: int, out: Path, acts: torch.Tensor):
    if name == "overcomplete-topk":
        return _overcomplete(acts, seed, out)
    if name == "dictionary_learning-topk":
        return _dictionary_learning(acts, seed, out)
    return sve.train_saes(_ours_config(name, tokens, seed, out))[HOOK]


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
    results: dict[str, dict] = {}
    for name in args.trainers.split(","):
        start = time.perf_counter()
        try:
            saes = [train(name, args.tokens, s, out / name / f"seed{s}", acts) for s in range(args.seeds)]
        except Exception as e:  # a peer's trainer that fails is reported, not hidden
            results[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=3)}
            print(f"{name}: FAILED {e}", flush=True)
            continue
        train_s = time.perf_counter() - start
        bench = sve.benchmark_sae(model, saes[0], pixels, y, evaluator=evaluator, ood=ood, sibling_groups=groups)
        stab = stability(saes, threshold=0.7) if len(saes) > 1 else None
        l0 = float(
            (saes[0].encode(patch_activations(model, HOOK, pixels[:64]).flatten(0, 1)) != 0).float().sum(-1).mean()
        )
        results[name] = {
            "values": bench.values(),
            "skipped": {r.key: r.skipped for r in bench.rows if r.skipped},
            "stability": stab.to_dict() if stab else None,
            "l0_patches": l0,
            "train_seconds": train_s,
        }
        print(name, json.dumps(results[name]["values"]), stab.to_dict() if stab else "", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(table(results))


def table(results: dict[str, dict]) -> str:
    """The markdown table of ``results.json`` (``python -c "import bench_sae_quality as b, json;
    print(b.table(json.load(open('results.json'))))"`` from ``benchmarks/`` reprints it)."""
    ok = {k: v for k, v in results.items() if "values" in v}
    lines = ["| trainer | L0 (patches) | " + " | ".join(SHORT[m] for m in METRICS) + " | matched ≥ 0.7 ↑ |"]
    lines.append("|---|---|" + "---|" * (len(METRICS) + 1))
    for name, r in ok.items():
        cells = ["skipped" if r["values"][m] is None else f"{r['values'][m]:.4f}" for m in METRICS]
        s = r["stability"]
        stab = f"{s['mean']:.3f} ± {s['std']:.3f} (cos {s['mean_cosine']:.3f})" if s else "-"
        lines.append(f"| {name} | {r['l0_patches']:.1f} | " + " | ".join(cells) + f" | {stab} |")
    for name, r in results.items():
        if "error" in r:
            lines.append(f"\n{name}: not run ({r['error']}).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
