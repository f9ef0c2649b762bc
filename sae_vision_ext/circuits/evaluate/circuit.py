"""Circuit evaluation: insertion and deletion curves, circuit faithfulness, and whether graph
influence predicts the measured effect of ablating a node.

Semantics (every forward has all SAEs spliced with error terms kept, so with no edit the output is
the original model's):

- A *site* is ``(layer, position, feature)``; the sites ranked are the image's active features (the
  graph's nodes) and the inactive features whose reference is not zero (ranked after the graph's
  nodes, in random order), so that editing every site gives the all-reference model and editing
  none gives the original. Ablating a site sets its activation to its reference value
  (per-position ``median`` / ``mean`` over a reference image set, or ``zero``); unedited features
  are recomputed from the (edited) layers below.
- Deletion at fraction ``q``: the top ``q`` of sites (by a ranking) are ablated.
- Insertion at fraction ``q``: *every* feature except the top ``q`` of sites is set to its
  reference value; the kept sites are recomputed from below.
- Rankings: ``influence`` (the attribution graph's node influence), ``random`` (a seeded
  permutation of the same nodes) and ``neurons`` (the raw-residual baseline: residual dimensions
  ``(layer, position, dim)`` of ``blocks.{l}.hook_resid_post`` in a model without SAEs, ranked by
  |gradient × (activation − reference)| under the frozen linearisation, ablated to their
  per-position reference).
- Metrics on the target class (the label if given, else the prediction): ``logit``,
  ``demeaned_logit``, ``prob``, ``accuracy`` (target still top-1). AUC is the trapezoid area with
  the listed fractions spaced evenly on ``[0, 1]`` (as the curves are plotted).
- Circuit faithfulness ``(m(C) − m(∅)) / (m(M) − m(∅))`` with ``m`` the demeaned logit, ``C`` the
  pruned graph's features kept (insertion semantics), ``∅`` insertion at 0 and ``M`` the model;
  completeness ``1 − (m(M∖C) − m(∅)) / (m(M) − m(∅))`` with ``M∖C`` the deletion of ``C``.
- ``influence_ablation_spearman``: rank correlation between each node's graph influence and the
  measured |change of the demeaned logit| when ablating that node alone (the top nodes by
  influence plus as many random ones).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..._hooks import resid_post
from ..graph.ops import node_influence
from ..replacement.base import Reference, ReplacementModelBase, reduce_reference
from .curves import FRACTIONS, CircuitEvaluation, auc, output_metrics


class _Patcher:
    """Batched forwards in which row ``b`` edits its own set of sites (see the module docstring)."""

    def __init__(self, rrm: ReplacementModelBase, refs: list[Tensor], neuron_refs: list[Tensor]) -> None:
        self.rrm, self.refs, self.neuron_refs = rrm, refs, neuron_refs

    @torch.no_grad()
    def run(self, pixels: Tensor, sites: list[Tensor], invert: list[bool], neurons: bool) -> Tensor:
        """``sites[b]``: ``[n, 3]`` (SAE-layer slot, position, index) edited in row ``b``; ``invert[b]``: edit
        every site *except* those. Returns the outputs ``[len(sites), d_out]``."""
        rrm, B = self.rrm, len(sites)
        x = pixels.expand(B, -1, -1, -1)
        refs = self.neuron_refs if neurons else self.refs
        inv = torch.tensor(invert)

        def edit(acts: Tensor, hook: Any, slot: int) -> Tensor:
            mask = torch.zeros(acts.shape, dtype=torch.bool)
            for b, s in enumerate(sites):
                s = s[s[:, 0] == slot]
                mask[b, s[:, 1], s[:, 2]] = True
            mask ^= inv[:, None, None]
            return torch.where(mask, refs[slot].to(acts.dtype).expand_as(acts), acts)

        if not neurons:  # features: each replacement kind splices and edits its own
            with rrm.editing(lambda slot, acts: edit(acts, None, slot)):
                return rrm.model(x)
        hooks = [(resid_post(layer), lambda a, hook, i=i: edit(a, hook, i)) for i, layer in enumerate(rrm.layers)]
        with rrm.model.hooks(fwd_hooks=hooks):
            return rrm.model(x)


def _neuron_ranking(rrm: ReplacementModelBase, pixels: Tensor, target_dir: Tensor, refs: list[Tensor]) -> Tensor:
    """Residual neurons ``[n, 3]`` (SAE-layer slot, position, dim) of the SAE layers' residuals by
    |gradient × (activation − reference)|, gradients under the frozen linearisation of the model
    without SAEs."""
    from ..replacement.linearise import resid_post_gradients

    resid, grads = resid_post_gradients(rrm.model, pixels, lambda out: out[0] @ target_dir.to(out.dtype))
    resid, grads = [resid[b] for b in rrm.layers], [grads[b] for b in rrm.layers]
    flat = torch.stack([(g[0] * (r[0] - ref)).abs() for r, g, ref in zip(resid, grads, refs, strict=True)])
    order = flat.flatten().argsort(descending=True)  # [layer, pos, d_model] flattened
    return torch.stack(torch.unravel_index(order, flat.shape), dim=1)


def _spearman(a: Tensor, b: Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else float("nan")


def _orders(sites_all: Tensor, infl: Tensor, refs: list[Tensor], gen: torch.Generator) -> dict[str, Tensor]:
    """The ``influence`` and ``random`` orders of the sites ``(slot, position, feature)`` to patch:
    the graph's feature nodes ``sites_all`` (by ``infl``, most first), then the sites whose clean value
    differs from the reference but that are not nodes (inactive features with a non-zero reference),
    in random order."""
    differs = [r != 0 for r in refs]  # the graph's feature nodes are exactly the active sites
    for slot, d in enumerate(differs):
        here = sites_all[sites_all[:, 0] == slot]
        d[here[:, 1], here[:, 2]] = False
    extra = torch.cat(
        [torch.cat([torch.full((len(nz), 1), slot), nz], 1) for slot, nz in enumerate(d.nonzero() for d in differs)]
    )
    extra = extra[torch.randperm(len(extra), generator=gen)]
    every = torch.cat([sites_all, extra])
    return {
        "influence": torch.cat([sites_all[infl.argsort(descending=True)], extra]),
        "random": every[torch.randperm(len(every), generator=gen)],
    }


def _check_images(pixels: Tensor, labels: Tensor | None, reference_pixels: Tensor | None) -> Tensor | None:
    """``labels`` checked against ``pixels`` (one class id per image); ``ValueError`` for empty inputs."""
    from ...data.checks import check_images

    if reference_pixels is not None and len(reference_pixels) == 0:
        raise ValueError("reference_pixels has 0 images; pass at least one, or None to use pixels.")
    return check_images("evaluate_circuit", pixels, labels)


def evaluate_circuit(  # noqa: PLR0913 (keyword-only options of two protocols, each documented)
    rrm: ReplacementModelBase,
    pixels: Float[Tensor, "n chan h w"],
    labels: Int[Tensor, " n"] | None = None,
    fractions: Sequence[float] = FRACTIONS,
    reference: Reference = "median",
    *,
    reference_pixels: Float[Tensor, "n_ref chan h w"] | None = None,
    node_threshold: float = 0.8,
    max_feature_nodes: int | None = None,
    n_ablations: int = 32,
    seed: int = 0,
    progress: bool = True,
    protocol: Literal["ours", "seed"] = "ours",
    leaf_errors: bool | None = None,
) -> CircuitEvaluation:
    """Insertion/deletion curves, AUC, circuit faithfulness and influence-vs-ablation correlation,
    averaged over ``pixels`` (one attribution graph per image). ``reference_pixels`` (default:
    ``pixels``) give the reference values. ``protocol="seed"``: the seed paper's protocol on its
    token-aggregated graph instead (``circuits/evaluate/seed_protocol.py``: rankings ``relevance``, ``edge``,
    ``random``, ``neurons``; error terms held at the clean image's values; ``leaf_errors``, default
    ``True`` as in the paper, makes the graph's error nodes leaves); ``node_threshold``,
    ``max_feature_nodes`` and ``n_ablations`` do not apply there, ``leaf_errors`` only there."""
    from tqdm.auto import tqdm

    if protocol not in ("ours", "seed"):
        raise ValueError(f"protocol must be 'ours' or 'seed'; got {protocol!r}.")
    labels = _check_images(pixels, labels, reference_pixels)
    if protocol == "seed" and not hasattr(rrm, "attribute_aggregated"):
        raise ValueError(
            f"protocol='seed' runs on the residual model's token-aggregated graph (attribute_aggregated); "
            f"{type(rrm).__name__} has none. Use protocol='ours'."
        )
    if protocol == "seed":
        from .seed_protocol import evaluate_seed_protocol

        return evaluate_seed_protocol(
            rrm,
            pixels,
            labels,
            fractions,
            reference,
            reference_pixels=reference_pixels,
            leaf_errors=True if leaf_errors is None else leaf_errors,
            seed=seed,
            progress=progress,
        )
    if leaf_errors is not None:
        raise ValueError(
            f"leaf_errors={leaf_errors!r} applies to protocol='seed' (the paper's token-aggregated graph) only; "
            "protocol='ours' (circuit-tracer's position-resolved graph) has no such option; drop it or pass "
            "protocol='seed'."
        )

    if not all(0.0 <= q <= 1.0 for q in fractions) or list(fractions) != sorted(fractions):
        raise ValueError(f"fractions must be increasing values in [0, 1]; got {list(fractions)}.")
    ref_px = pixels if reference_pixels is None else reference_pixels
    refs = rrm.reference_values(ref_px, reference)
    with torch.no_grad():
        names = [resid_post(layer) for layer in rrm.layers]
        _, cache = rrm.model.run_with_cache(ref_px, names_filter=names, return_cache_object=False)
    stack = torch.stack([cache[n] for n in names])  # [layer, batch, pos, d_model]
    neuron_refs = list(reduce_reference(stack, reference, dim=1))
    patcher = _Patcher(rrm, refs, neuron_refs)
    slot_of = torch.full((rrm.model.cfg.n_layers + 1,), -1, dtype=torch.long)
    slot_of[torch.tensor(rrm.layers)] = torch.arange(rrm.n_layers)
    gen = torch.Generator().manual_seed(seed)
    sums: dict[str, dict[str, dict[str, Tensor]]] = {}
    faiths, comps, rhos, sizes = [], [], [], []
    for i in tqdm(range(len(pixels)), desc="evaluate_circuit", unit="image", disable=not progress):
        x = pixels[i : i + 1]
        graph = rrm.attribute(x, target=None if labels is None else int(labels[i]), max_feature_nodes=max_feature_nodes)
        target = graph.target_classes[0]
        feat_idx = torch.tensor([j for j, k in enumerate(graph.node_kind) if k == "feature"], dtype=torch.long)
        slots = slot_of[graph.node_layer[feat_idx]]  # sites name SAE layers by slot (widths may differ)
        sites_all = torch.stack([slots, graph.node_pos[feat_idx], graph.node_feature[feat_idx]], 1)
        infl = node_influence(graph)[feat_idx]
        with torch.no_grad():
            full = rrm.model(x)
        direction = -torch.full((full.shape[-1],), 1.0 / full.shape[-1], dtype=x.dtype)
        direction[target] += 1.0
        orders = _orders(sites_all, infl, refs, gen)
        orders["neurons"] = _neuron_ranking(rrm, x, direction, neuron_refs)
        for name, order in orders.items():
            counts = [math.ceil(q * len(order)) for q in fractions]
            sites = [order[:c] for c in counts]
            rows = patcher.run(x, sites + sites, [True] * len(sites) + [False] * len(sites), name == "neurons")
            for mode, part in (("insertion", rows[: len(sites)]), ("deletion", rows[len(sites) :])):
                for metric, v in output_metrics(part, target).items():
                    acc = sums.setdefault(name, {}).setdefault(mode, {})
                    acc[metric] = acc.get(metric, 0) + v
        # circuit faithfulness / completeness of the pruned feature set
        keep = graph.prune(node_threshold=node_threshold).node_mask[feat_idx]
        circuit = sites_all[keep]
        sizes.append(int(keep.sum()))
        outs = patcher.run(x, [circuit, sites_all[:0], circuit], [True, True, False], False)
        m_c, m_empty, m_minus, m_full = output_metrics(torch.cat([outs, full]), target)["demeaned_logit"].tolist()
        span = m_full - m_empty
        faiths.append((m_c - m_empty) / span if span else float("nan"))
        comps.append(1 - (m_minus - m_empty) / span if span else float("nan"))
        # influence vs single-node ablation
        pick = torch.unique(
            torch.cat(
                [infl.argsort(descending=True)[:n_ablations], torch.randperm(len(infl), generator=gen)[:n_ablations]]
            )
        )
        outs = patcher.run(x, [sites_all[j : j + 1] for j in pick.tolist()], [False] * len(pick), False)
        rhos.append(_spearman(infl[pick], (output_metrics(outs, target)["demeaned_logit"] - m_full).abs()))
    n = len(pixels)
    curves = {r: {mode: {k: (v / n).tolist() for k, v in d.items()} for mode, d in m.items()} for r, m in sums.items()}
    aucs = {r: {mode: {k: auc(v) for k, v in d.items()} for mode, d in m.items()} for r, m in curves.items()}
    mean = lambda xs: float(torch.tensor(xs, dtype=torch.float64).nanmean())
    return CircuitEvaluation(list(fractions), curves, aucs, mean(faiths), mean(comps), mean(rhos), n, sizes)
