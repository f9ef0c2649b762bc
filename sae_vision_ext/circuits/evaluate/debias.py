"""Finding and removing features that carry a spurious attribute.

``find_spurious_features(rrm, pixels, labels, groups)`` (``groups``: 1 where the spurious attribute
is present, 0 where absent; nothing says *where* in the image it is):

1. Associated class: the class whose prediction rate the attribute raises most,
   ``argmax_c P(pred = c | attr) − P(pred = c | no attr)``.
2. Conflict images: attribute present, label ≠ associated class, predicted as the associated class.
3. Attribution evidence: for every SAE feature of every layer, its total effect on the logit
   difference ``associated − label`` under the frozen linearisation (``replacement/linearise.py``: patterns,
   LayerNorm scales and MLP gates frozen), i.e. ``Σ_pos a · <∂Δlogit/∂resid_post_l, d_f[pos]>``
   with ``d_f`` the effective decoder direction (``saes/affine.py``: ``σ*·W_dec[f]/|W_dec[f]|``),
   averaged over conflict images, minus the same average over control images (attribute absent,
   label ≠ associated class), so features that push every image alike cancel.
4. Specificity: AUROC of the feature's image-level activation (sum over positions) for telling
   attribute-present from attribute-absent images. Candidates: positive attribution and AUROC
   ≥ ``min_auroc``, ranked by attribution.
5. Ablation evidence: each candidate alone, then the top ``n`` together, is replaced by its
   counterfactual reference (its per-position mean over attribute-absent images) with every other
   feature and the error terms left alone; the single effect on the conflict images' logit
   difference and, per ``n``, worst-group and average accuracy over (label, attribute) groups are
   recorded. ``selected`` is the ``n`` with the best worst-group accuracy whose average accuracy
   drops by at most ``max_avg_drop`` (choose it on images you will not report on).

``debias(model, saes, features, reference)`` returns a deep copy of the model with those SAEs
spliced (error terms kept) and the features held at their reference at inference.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..._hooks import resid_post, sae_acts
from ...saes import affine
from ..models import ResidualReplacementModel

if TYPE_CHECKING:
    from sae_lens import SAE

    from ...models.hooked_vit import HookedViT

N_GRID = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class SpuriousFeatures:
    """The ranked candidates and the evidence for them (see the module docstring)."""

    associated_class: int
    candidates: list[tuple[int, int]]
    """``(layer, feature)`` ranked by attribution among specific features."""
    attribution: list[float]
    auroc: list[float]
    ablation_effect: list[float]
    """Drop of the conflict images' mean logit difference when the candidate alone is ablated."""
    sweep: list[dict[str, int | float]] = field(default_factory=list)
    """Per ``n``: ``n``, ``worst_group``, ``average`` accuracy with the top ``n`` ablated (``n = 0``: none)."""
    n_selected: int = 0
    reference: list[Tensor] = field(default_factory=list)
    """Per SAE layer (in ``rrm.layers`` order) ``[pos, d_sae]``: the counterfactual value each feature is
    ablated to."""
    n_conflict: int = 0

    @property
    def selected(self) -> list[tuple[int, int]]:
        return self.candidates[: self.n_selected]

    def table(self, n: int = 10) -> str:
        lines = [
            "| rank | layer | feature | attribution | AUROC (attribute) | ablation effect |",
            "|---|---|---|---|---|---|",
        ]
        for i, (layer, f) in enumerate(self.candidates[:n]):
            lines.append(
                f"| {i + 1} | {layer} | {f} | {self.attribution[i]:.3f} | {self.auroc[i]:.3f} | "
                f"{self.ablation_effect[i]:.3f} |"
            )
        return "\n".join(lines)


def group_accuracy(
    pred: Int[Tensor, " n"], labels: Int[Tensor, " n"], groups: Int[Tensor, " n"]
) -> dict[tuple[int, int], float]:
    """Accuracy per ``(label, attribute)`` group present in the data."""
    out = {}
    for c in labels.unique().tolist():
        for g in groups.unique().tolist():
            sel = (labels == c) & (groups == g)
            if sel.any():
                out[(c, g)] = float((pred[sel] == c).float().mean())
    return out


def _ablation_hooks(features: Sequence[tuple[int, int]], reference: dict[int, Tensor]) -> list[tuple[str, Any]]:
    """Hooks holding each ``(layer, feature)`` at ``reference[layer][pos, feature]`` (``layer``: block)."""
    by_layer: dict[int, list[int]] = {}
    for layer, f in features:
        by_layer.setdefault(int(layer), []).append(int(f))
    hooks = []
    for layer, feats in by_layer.items():
        idx = torch.tensor(sorted(set(feats)))
        ref = reference[layer][:, idx]

        def hook(acts: Tensor, hook: Any, idx: Tensor = idx, ref: Tensor = ref) -> Tensor:
            acts = acts.clone()
            acts[..., idx] = ref.to(acts.dtype).expand(acts.shape[0], -1, -1)
            return acts

        hooks.append((sae_acts(resid_post(layer)), hook))
    return hooks


@torch.no_grad()
def _ablated_logits(
    rrm: ResidualReplacementModel,
    pixels: Tensor,
    features: Sequence[tuple[int, int]],
    reference: list[Tensor],
    batch_size: int,
) -> Tensor:
    layers = sorted({int(layer) for layer, _ in features})
    by_layer = dict(zip(rrm.layers, reference, strict=True))
    out = []
    with rrm.spliced(layers, keep_errors=True), rrm.model.hooks(fwd_hooks=_ablation_hooks(features, by_layer)):
        for i in range(0, len(pixels), batch_size):
            out.append(rrm.model(pixels[i : i + batch_size]))
    return torch.cat(out)


def _attribution(rrm: ResidualReplacementModel, pixels: Tensor, labels: Tensor, assoc: int) -> Tensor:
    """``[n_sae_layers, max d_sae]`` (zero-padded where an SAE is narrower): mean total effect of each
    feature on ``logit[assoc] − logit[label]``."""
    from ..replacement.linearise import resid_post_gradients

    total = torch.zeros(rrm.n_layers, max(sae.cfg.d_sae for sae in rrm.saes), dtype=torch.float64)
    for start in range(0, len(pixels), 64):
        x, y = pixels[start : start + 64], labels[start : start + 64]
        resid, grads = resid_post_gradients(
            rrm.model, x, lambda out, y=y: (out[:, assoc] - out.gather(1, y[:, None]).squeeze(1)).sum()
        )
        with torch.no_grad():
            for slot, (sae, block) in enumerate(zip(rrm.saes, rrm.layers, strict=True)):
                r, g = resid[block], grads[block]
                acts = sae.encode(r.to(sae.W_dec.dtype))
                proj = affine.decoder_projection(sae, g, affine.frozen_norm(sae, r))
                total[slot, : sae.cfg.d_sae] += (acts * proj).sum((0, 1)).double()
    return total / max(len(pixels), 1)


def _auroc(scores: Tensor, positive: Tensor) -> Tensor:
    """AUROC per column of ``scores [n, m]`` for the 0/1 labels ``positive [n]`` (Mann-Whitney, ties
    counted half)."""
    cols = scores.T.contiguous()  # [m, n]
    ordered = cols.sort(-1).values
    lo = torch.searchsorted(ordered, cols, right=False).double()
    hi = torch.searchsorted(ordered, cols, right=True).double()
    ranks = (lo + hi + 1) / 2  # average 1-based ranks
    pos = positive.bool()
    n1, n0 = float(pos.sum()), float((~pos).sum())
    return (ranks[:, pos].sum(-1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def find_spurious_features(
    rrm: ResidualReplacementModel,
    pixels: Float[Tensor, "n chan h w"],
    labels: Int[Tensor, " n"],
    groups: Int[Tensor, " n"],
    min_auroc: float = 0.7,
    *,
    max_candidates: int = 64,
    max_avg_drop: float = 0.02,
    batch_size: int = 256,
    progress: bool = False,
) -> SpuriousFeatures:
    """Rank SAE features that carry the spurious attribute marked by ``groups`` (see module docstring);
    ``progress``: a bar over the candidates' ablations and the sweep."""
    from tqdm.auto import tqdm

    groups = torch.as_tensor(groups).long()
    if set(groups.unique().tolist()) != {0, 1}:
        raise ValueError(
            f"groups must be 0/1 (spurious attribute absent/present) with both present; "
            f"got values {groups.unique().tolist()}."
        )
    if not len(pixels) == len(labels) == len(groups):
        raise ValueError(f"pixels, labels and groups differ in length: {len(pixels)}, {len(labels)}, {len(groups)}.")
    if not 0.5 <= min_auroc <= 1.0:
        raise ValueError(f"min_auroc must be in [0.5, 1]; got {min_auroc}.")
    with torch.no_grad():
        pred = torch.cat([rrm.model(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)]).argmax(-1)
    n_cls = int(max(pred.max(), labels.max())) + 1
    rate = [torch.bincount(pred[groups == g], minlength=n_cls).double() / (groups == g).sum() for g in (0, 1)]
    assoc = int((rate[1] - rate[0]).argmax())
    conflict = (groups == 1) & (labels != assoc) & (pred == assoc)
    control = (groups == 0) & (labels != assoc)
    if not conflict.any():
        raise ValueError(
            "No conflict images (attribute present, label != associated class, predicted as it): "
            "the model does not take this shortcut on these images, or there are too few."
        )
    score = _attribution(rrm, pixels[conflict], labels[conflict], assoc)
    score -= _attribution(rrm, pixels[control], labels[control], assoc)

    feature_acts = [
        torch.cat(parts)
        for parts in zip(
            *[
                [a.sum(1) for a in rrm.feature_acts(pixels[i : i + batch_size])]
                for i in range(0, len(pixels), batch_size)
            ],
            strict=True,
        )
    ]
    auroc = torch.zeros_like(score)  # [n_sae_layers, max d_sae]; padding (AUROC 0) is never a candidate
    for slot, a in enumerate(feature_acts):
        auroc[slot, : a.shape[-1]] = _auroc(a.double(), groups)
    ok = (auroc >= min_auroc) & (score > 0)
    flat = ok.flatten().nonzero().squeeze(1)
    flat = flat[score.flatten()[flat].argsort(descending=True)][:max_candidates]
    at = [divmod(int(i), score.shape[1]) for i in flat]  # (slot, feature)
    candidates = [(rrm.layers[slot], f) for slot, f in at]

    absent = pixels[groups == 0]
    chunks = [rrm.feature_acts(absent[i : i + batch_size]) for i in range(0, len(absent), batch_size)]
    reference = [torch.cat(parts).mean(0) for parts in zip(*chunks, strict=True)]

    def logit_diff(out: Tensor) -> float:
        y = labels[conflict]
        return float((out[:, assoc] - out.gather(1, y[:, None]).squeeze(1)).mean())

    base = logit_diff(_ablated_logits(rrm, pixels[conflict], [], reference, batch_size))
    grid = [0, *[n for n in N_GRID if n < len(candidates)], len(candidates)]
    bar = tqdm(total=len(candidates) + len(grid), desc="spurious-feature search", unit="run", disable=not progress)
    effects = []
    for c in candidates:
        effects.append(base - logit_diff(_ablated_logits(rrm, pixels[conflict], [c], reference, batch_size)))
        bar.update(1)

    sweep = []
    for n in grid:
        bar.update(1)
        p = _ablated_logits(rrm, pixels, candidates[:n], reference, batch_size).argmax(-1)
        acc = group_accuracy(p, labels, groups)
        sweep.append({"n": n, "worst_group": min(acc.values()), "average": float((p == labels).float().mean())})
    bar.close()
    allowed = [s for s in sweep if s["average"] >= sweep[0]["average"] - max_avg_drop]
    best = max(allowed, key=lambda s: (s["worst_group"], -s["n"]))
    return SpuriousFeatures(
        associated_class=assoc,
        candidates=candidates,
        attribution=[float(score[c]) for c in at],
        auroc=[float(auroc[c]) for c in at],
        ablation_effect=effects,
        sweep=sweep,
        n_selected=int(best["n"]),
        reference=reference,
        n_conflict=int(conflict.sum()),
    )


def debias(
    model: HookedViT, saes: Sequence[SAE], features: Sequence[tuple[int, int]], reference: list[Tensor] | None = None
) -> HookedViT:
    """A deep copy of ``model`` that ablates ``features`` (``(layer, feature)``, ``layer`` a block) at inference.

    The SAEs of the layers involved (``saes``: on ``blocks.{l}.hook_resid_post``, or a
    ``ResidualReplacementModel``'s) are spliced with error terms kept, and each listed feature is held
    at ``reference[i][pos, feature]`` (``i`` the layer's place among the SAE layers, as in
    ``SpuriousFeatures.reference``; default zero) at every position, by permanent hooks:
    ``model.reset_hooks()`` keeps them; the original model is untouched.
    """
    rrm = ResidualReplacementModel(model, saes)
    out = copy.deepcopy(model)
    if reference is None:
        reference = [torch.zeros(model.cfg.n_ctx, sae.cfg.d_sae) for sae in rrm.saes]
    for layer in sorted({int(layer) for layer, _ in features}):
        out.add_sae(rrm.sae_at(layer), use_error_term=True, check_model_name=False)
    for name, hook in _ablation_hooks(features, dict(zip(rrm.layers, reference, strict=True))):
        out.add_hook(name, hook, is_permanent=True)
    return out
