"""``evaluate_sae``: reconstruction, sparsity and downstream faithfulness of one spliced SAE.

Definitions (all over the tokens of the given images that the SAE's hook produces):

- ``fvu`` = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, with one dataset-mean vector (not a
  per-token mean); ``explained_variance`` = 1 - fvu.
- ``l0`` = mean number of active features per token; ``l0_prefix`` and ``l0_patches`` split it by
  position (prefix tokens: CLS, registers; vs patches); ``l0_cls`` is the old name of ``l0_prefix``,
  kept one release.
- ``dead_fraction``: features that never fire; ``dense_fraction``: features firing on more than
  ``dense_threshold`` of tokens.
- Downstream, three runs: clean, SAE spliced (no error term), and mean-ablated (the hook replaced
  by its per-position mean over these images). Classifiers (``output_kind == "logits"``): mean
  KL(clean || run) of the output distributions, top-1 agreement with clean, accuracy with labels,
  and ``loss_recovered`` = (L_ablated - L_spliced) / (L_ablated - L_clean) with L the cross-entropy
  to the labels (to the clean prediction without labels). Embeddings: cosine with clean and
  ``loss_recovered`` = (cos_spliced - cos_ablated) / (1 - cos_ablated).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .._compat import renamed_kwargs

if TYPE_CHECKING:
    from sae_lens import SAE

    from ..models.hooked_vit import HookedViT


@torch.no_grad()
@renamed_kwargs(images="pixels")
def evaluate_sae(
    model: HookedViT,
    sae: SAE,
    pixels: Tensor,
    labels: Tensor | None = None,
    batch_size: int = 64,
    *,
    dense_threshold: float = 0.1,
    out_path: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Metrics of ``sae`` at its hook on ``pixels`` (preprocessed ``[n, chan, h, w]``); JSON to ``out_path``
    (``progress``: a bar over batches)."""
    from tqdm.auto import tqdm

    from ..data.checks import check_images

    hook = model.check_sae(sae)  # a hook name, a hook of this model, d_in = its width
    labels = check_images("evaluate_sae", pixels, labels, batch_size)
    n_prefix, kind = model.cfg.n_prefix_tokens, model.adapter.output_kind()
    chunks = [slice(i, i + batch_size) for i in range(0, len(pixels), batch_size)]

    clean_out, acts = [], []
    for s in tqdm(chunks, desc=f"evaluate {hook}", unit="batch", disable=not progress):
        out, cache = model.run_with_cache(pixels[s], names_filter=hook, return_cache_object=False)
        clean_out.append(out)
        acts.append(cache[hook])
    clean = torch.cat(clean_out)
    x = torch.cat(acts)  # [n, pos, d]
    pos_mean = x.mean(0, keepdim=True)

    # decode each chunk right after encoding it: SAELens keeps per-token normalisation statistics
    # (``layer_norm``, ``constant_norm_rescale``) from the last ``encode`` for the next ``decode``
    pairs = [(f, sae.decode(f)) for f in (sae.encode(x[s]) for s in chunks)]
    feats, recon = torch.cat([f for f, _ in pairs]), torch.cat([r for _, r in pairs])
    flat_x, flat_r = x.flatten(0, -2), recon.flatten(0, -2)
    fvu = float((flat_x - flat_r).pow(2).sum() / (flat_x - flat_x.mean(0)).pow(2).sum())
    active = feats != 0
    firing = active.flatten(0, -2).float().mean(0)
    metrics: dict[str, Any] = {
        "hook_name": hook, "n_images": len(pixels), "n_tokens": int(flat_x.shape[0]), "d_sae": int(sae.cfg.d_sae),
        "fvu": fvu, "explained_variance": 1 - fvu,
        "l0": float(active.sum(-1).float().mean()),
        "dead_fraction": float((firing == 0).float().mean()),
        "dense_fraction": float((firing > dense_threshold).float().mean()),
    }  # fmt: skip
    if x.ndim == 3 and n_prefix > 0:
        metrics["l0_prefix"] = float(active[:, :n_prefix].sum(-1).float().mean())
        metrics["l0_cls"] = metrics["l0_prefix"]  # deprecated name (it always covered every prefix token)
    if x.ndim == 3 and x.shape[1] > n_prefix:
        metrics["l0_patches"] = float(active[:, n_prefix:].sum(-1).float().mean())

    spliced = torch.cat([model.run_with_saes(pixels[s], saes=[sae], use_error_term=False) for s in chunks])
    ablated = torch.cat(
        [model.run_with_hooks(pixels[s], fwd_hooks=[(hook, lambda a, hook: pos_mean.expand_as(a))]) for s in chunks]
    )
    if kind == "logits":
        logp = {k: F.log_softmax(v, -1) for k, v in (("clean", clean), ("spliced", spliced), ("ablated", ablated))}
        target = labels if labels is not None else clean.argmax(-1)
        ce = {k: float(F.nll_loss(v, target)) for k, v in logp.items()}
        for run in ("spliced", "ablated"):
            metrics[f"kl_{run}"] = float(F.kl_div(logp[run], logp["clean"], log_target=True, reduction="batchmean"))
            metrics[f"top1_agreement_{run}"] = float((logp[run].argmax(-1) == clean.argmax(-1)).float().mean())
        metrics["ce_loss"] = ce
        denom = ce["ablated"] - ce["clean"]
        metrics["loss_recovered"] = float((ce["ablated"] - ce["spliced"]) / denom) if abs(denom) > 1e-12 else None
        if labels is not None:
            metrics["accuracy"] = {k: float((v.argmax(-1) == labels).float().mean()) for k, v in logp.items()}
    else:
        cos = {
            run: float(F.cosine_similarity(v.flatten(1), clean.flatten(1)).mean())
            for run, v in (("spliced", spliced), ("ablated", ablated))
        }
        metrics["cosine"] = cos
        metrics["loss_recovered"] = (
            (cos["spliced"] - cos["ablated"]) / (1 - cos["ablated"]) if cos["ablated"] < 1 else None
        )
    if out_path is not None:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(json.dumps(metrics, indent=2))
    return metrics


def format_eval_table(metrics: dict[str, Any]) -> str:
    """One SAE's metrics as a two-column markdown table."""
    rows = []
    for key, value in metrics.items():
        if key == "l0_cls":  # the deprecated alias of l0_prefix: one row is enough
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v:.4f}" for k, v in value.items())
        elif isinstance(value, float):
            value = f"{value:.4f}"
        rows.append(f"| {key} | {value} |")
    return "\n".join(["| metric | value |", "|---|---|", *rows])
