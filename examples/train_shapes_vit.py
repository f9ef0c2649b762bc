"""Train the embedded shapes ViTs (``sve:shapes-vit`` and ``sve:shapes-vit-biased``).

    python examples/train_shapes_vit.py --name shapes-vit --balanced-marker
    python examples/train_shapes_vit.py --name shapes-vit-biased --spurious-class 0 --spurious-rate 0.9 \
        --other-marker-rate 0.02

The clean model sees the marker on half of all images, independent of the class (so it learns to
ignore it); the biased one sees it on 90% of class 0 and 2% of the rest (a shortcut it takes, while
class 0's shape stays learnable from the unmarked 10%).

Writes ``sae_vision_ext/checkpoints/<name>.safetensors`` (float16) and ``<name>.json`` with the
architecture, the data config, and held-out accuracies: clean accuracy, and for every model the
per-group accuracy on the balanced split (marker on half of every class, independent of class).
About 30 minutes per model on 2 CPU cores (two in parallel, one thread each).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from sae_vision_ext.data.shapes import SHAPES, make_shapes
from sae_vision_ext.models.embedded import build_shapes_vit, checkpoint_dir

ARCH = dict(
    img_size=64, patch_size=8, in_chans=3, num_classes=len(SHAPES), embed_dim=128, depth=6,
    num_heads=4, mlp_ratio=2.0, qkv_bias=True, global_pool="token", class_token=True,
)  # fmt: skip
DATA_CONFIG = dict(
    input_size=(3, 64, 64), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear", crop_pct=1.0
)


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - 0.5) / 0.5


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    model.eval()
    return torch.cat([model(normalise(x[i : i + batch])).argmax(-1) for i in range(0, len(x), batch)])


def group_report(pred: torch.Tensor, data) -> dict:
    labels = torch.from_numpy(data.labels)
    groups = data.groups()
    accs = {}
    for g in np.unique(groups):
        m = torch.from_numpy(groups == g)
        accs[f"{SHAPES[g // 2]}|marker={g % 2}"] = float((pred[m] == labels[m]).float().mean())
    return {
        "accuracy": float((pred == labels).float().mean()),
        "worst_group_accuracy": min(accs.values()),
        "worst_group": min(accs, key=accs.get),
        "group_accuracy": accs,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="shapes-vit")
    p.add_argument("--spurious-class", type=int, default=None, help="class whose images carry the marker")
    p.add_argument("--spurious-rate", type=float, default=0.95)
    p.add_argument("--other-marker-rate", type=float, default=0.0, help="marker rate on the other classes")
    p.add_argument("--balanced-marker", action="store_true", help="marker on half of all images, any class")
    p.add_argument("--n-train", type=int, default=24000)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=checkpoint_dir())
    args = p.parse_args()

    torch.manual_seed(args.seed)
    t0 = time.time()
    train = make_shapes(args.n_train, seed=1000 + args.seed, spurious_class=args.spurious_class,
                        spurious_rate=args.spurious_rate, other_marker_rate=args.other_marker_rate,
                        balanced=args.balanced_marker)  # fmt: skip
    clean_val = make_shapes(2000, seed=1)
    balanced = make_shapes(3000, seed=2, balanced=True)
    x_train, y_train = train.tensors()
    print(f"data: {time.time() - t0:.0f}s, marker rate in training set {train.factors['marker'].mean():.3f}")

    model = build_shapes_vit(ARCH, DATA_CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps = args.epochs * math.ceil(len(x_train) / args.batch_size)
    warmup = steps // 20
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))
    )
    bar = tqdm(total=steps, desc=args.name)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train))
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i : i + args.batch_size]
            xb = x_train[idx]
            if torch.rand(()) < 0.5:  # horizontal flips keep every shape's class
                xb = xb.flip(-1)
            loss = F.cross_entropy(model(normalise(xb)), y_train[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
        acc = float((predict(model, clean_val.tensors()[0]) == clean_val.tensors()[1]).float().mean())
        print(f"epoch {epoch}: clean val accuracy {acc:.4f}")
    bar.close()

    x_val, y_val = clean_val.tensors()
    report = {
        "clean_val_accuracy": float((predict(model, x_val) == y_val).float().mean()),
        "balanced": group_report(predict(model, balanced.tensors()[0]), balanced),
    }
    meta = {
        "name": args.name,
        "arch": ARCH,
        "data_config": DATA_CONFIG,
        "classes": list(SHAPES),
        "training": {k: v for k, v in vars(args).items() if k != "out_dir"} | {"seconds": round(time.time() - t0)},
        "eval": report,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out_dir / f"{args.name}.safetensors"))
    (args.out_dir / f"{args.name}.json").write_text(json.dumps(meta, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
