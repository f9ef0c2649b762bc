"""The seed paper's circuit evaluation protocol (Kim et al. 2025; authors' ``model_faithfulness.py`` and
``utils/functions/graph.py``), on the token-aggregated graph (``circuits/engine/aggregated.py``).

Per image and per fraction ``q`` of the paper's list (``FRACTIONS``), nodes are chosen per SAE layer:

- ``relevance`` ("node" rule, ``topn``): the ``int(q · N)`` nodes with the largest normalised relevance
  ``max(R, 0) / Σ max(R, 0)`` (``N`` = the largest ``d_sae + 1`` over layers; the error node counts);
- ``edge``: the last SAE layer as ``relevance``; each lower layer by the *signed* sum of its edges into
  the nodes chosen one layer up (the authors' ``get_simplified_graph_by_edge``: its clamp touches only a
  positive scalar normaliser, which leaves the order unchanged), so a source with a large positive and a
  large negative edge ranks by their sum;
- ``random``: ``int(q · (d_sae + 1))`` nodes drawn uniformly (seeded);
- ``neurons``: the raw-residual baseline, ``d_model`` nodes per layer (neuron ``d`` of the layer's
  ``hook_resid_post``), relevance ``Σ_p G[p, d]·(x[p, d] − m[p, d])`` with ``G`` the frozen gradient of
  the target, ``int(q · d_model)`` per layer.

Ties (equal scores) keep index order: a stable descending sort, so the lower feature index wins and
the error node (last) loses a tie.

Deletion masks the chosen nodes, insertion every other node. A masked feature is set to its
per-position reference (median by default) on every token; a masked error node to the reference
error, computed as the authors' median script computes the error: ``x̃·σ + μ − x̂`` with
``x̃ = (x − μ)/(σ + 1e-5)`` the SAE's normalised input and ``x̂`` its reconstruction
(:func:`seed_errors`; equal to ``x − x̂`` for SAEs without ``layer_norm`` input normalisation, a
few 1e-5 apart with it); the other features are recomputed by each SAE from its (edited) input, and **unmasked error
terms are held at the clean image's values** (``errors="clean"`` in the result; the package's own
protocol recomputes them from the edited residual). Masked neurons are set to their per-position
reference in a model without SAEs. Metrics on the target class (the label if given, else the
prediction): ``logit``, ``demeaned_logit``, ``prob``, ``accuracy``; AUC over the fractions spaced
evenly on ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..._hooks import resid_post, sae_acts
from ..replacement.base import Reference, ReplacementModelBase, reduce_reference
from .curves import FRACTIONS, CircuitEvaluation, auc, output_metrics

if TYPE_CHECKING:
    from ..graph.graph import AggregatedGraph

SEED_RANKINGS = ("relevance", "edge", "random", "neurons")


def _top(score: Tensor, n: int) -> Tensor:
    """Indices of the ``n`` largest scores; ties keep index order (stable sort)."""
    return torch.argsort(score, descending=True, stable=True)[: max(0, min(n, len(score)))]


def _positive_share(r: Tensor) -> Tensor:
    r = r.clamp_min(0)
    return r / r.sum().clamp_min(1e-30)


def select_nodes(graph: AggregatedGraph, rule: str, q: float, generator: torch.Generator) -> list[Tensor]:
    """Per SAE layer, the indices (into ``[d_sae + 1]``, error last) chosen by ``rule`` at fraction ``q``
    (module docstring; ties keep index order)."""
    sizes = [len(r) for r in graph.relevance]
    if q <= 0:
        return [torch.zeros(0, dtype=torch.long) for _ in sizes]
    if q >= 1:
        return [torch.arange(s) for s in sizes]
    n_top = int(q * max(sizes))
    if rule == "random":
        return [torch.randperm(s, generator=generator)[: int(q * s)] for s in sizes]
    if rule == "relevance":
        return [_top(_positive_share(r), n_top) for r in graph.relevance]
    if rule == "edge":
        chosen = [torch.zeros(0, dtype=torch.long)] * len(sizes)
        chosen[-1] = _top(_positive_share(graph.relevance[-1]), n_top)
        for i in range(len(sizes) - 2, -1, -1):
            into = graph.edges[i][chosen[i + 1]].sum(0)  # [d_sae_i + 1]: signed, as the authors sum them
            chosen[i] = _top(into, n_top)
        return chosen
    raise ValueError(f"Unknown seed-protocol rule {rule!r}; valid: relevance, edge, random.")


@torch.no_grad()
def seed_errors(rrm: ReplacementModelBase, pixels: Float[Tensor, "n chan h w"], batch_size: int = 64) -> list[Tensor]:
    """Each SAE layer's error as the authors' median script computes it, ``x̃·σ + μ − x̂`` (the SAE's
    own input normalisation undone on its normalised input, minus the reconstruction), on the clean
    residual stream: ``[n, pos, d_model]`` per layer."""
    names = [s.cfg.metadata.hook_name for s in rrm.saes]
    out: list[list[Tensor]] = [[] for _ in rrm.saes]
    for start in range(0, len(pixels), batch_size):
        _, cache = rrm.model.run_with_cache(
            pixels[start : start + batch_size], names_filter=names, return_cache_object=False
        )
        for i, (sae, name) in enumerate(zip(rrm.saes, names, strict=True)):
            x = cache[name].to(sae.dtype)
            recon = sae.decode(sae.encode(x))
            x_tilde = sae.run_time_activation_norm_fn_in(x)  # (x − μ)/(σ + 1e-5) for layer_norm SAEs
            out[i].append((sae.run_time_activation_norm_fn_out(x_tilde) - recon).to(cache[name].dtype))
    return [torch.cat(chunks) for chunks in out]


@torch.no_grad()
def _masked_outputs(
    rrm: ReplacementModelBase,
    x: Tensor,
    masks: list[list[Tensor]],
    refs: list[Tensor],
    err_refs: list[Tensor],
    *,
    clean_errors: list[Tensor],
) -> Tensor:
    """Row ``b``: features/error nodes ``masks[b][i]`` of SAE layer ``i`` masked (module docstring)."""
    B = len(masks)
    feat_masks, err_vals = [], {}
    for i, sae in enumerate(rrm.saes):
        m = torch.zeros(B, sae.cfg.d_sae + 1, dtype=torch.bool)
        for b, row in enumerate(masks):
            m[b, row[i]] = True
        feat_masks.append(m[:, :-1])
        err_vals[rrm.layers[i]] = torch.where(m[:, -1, None, None], err_refs[i][None], clean_errors[i][None])

    def edit(acts: Tensor, hook: Any, i: int) -> Tensor:
        return torch.where(feat_masks[i][:, None, :], refs[i].to(acts.dtype)[None], acts)

    hooks = [
        (sae_acts(sae.cfg.metadata.hook_name), lambda a, hook, i=i: edit(a, hook, i)) for i, sae in enumerate(rrm.saes)
    ]
    with rrm.spliced(keep_errors=True, error_values=err_vals), rrm.model.hooks(fwd_hooks=hooks):
        return rrm.model(x.expand(B, *x.shape[1:]))


@torch.no_grad()
def _neuron_outputs(rrm: ReplacementModelBase, x: Tensor, masks: list[list[Tensor]], refs: list[Tensor]) -> Tensor:
    B, d = len(masks), rrm.model.cfg.d_model
    dims = []
    for i in range(rrm.n_layers):
        m = torch.zeros(B, d, dtype=torch.bool)
        for b, row in enumerate(masks):
            m[b, row[i]] = True
        dims.append(m)

    def edit(t: Tensor, hook: Any, i: int) -> Tensor:
        return torch.where(dims[i][:, None, :], refs[i].to(t.dtype)[None], t)

    hooks = [(resid_post(layer), lambda t, hook, i=i: edit(t, hook, i)) for i, layer in enumerate(rrm.layers)]
    with rrm.model.hooks(fwd_hooks=hooks):
        return rrm.model(x.expand(B, *x.shape[1:]))


def _neuron_relevance(rrm: ReplacementModelBase, x: Tensor, direction: Tensor, refs: list[Tensor]) -> list[Tensor]:
    from ..replacement.linearise import resid_post_gradients

    resid, grads = resid_post_gradients(rrm.model, x, lambda out: out[0] @ direction.to(out.dtype))
    return [(grads[b][0] * (resid[b][0] - ref)).sum(0) for b, ref in zip(rrm.layers, refs, strict=True)]


def evaluate_seed_protocol(
    rrm: ReplacementModelBase,
    pixels: Float[Tensor, "n chan h w"],
    labels: Int[Tensor, " n"] | None = None,
    fractions: Sequence[float] | None = None,
    reference: Reference = "median",
    *,
    reference_pixels: Float[Tensor, "n_ref chan h w"] | None = None,
    leaf_errors: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> CircuitEvaluation:
    """Insertion/deletion curves and AUC by the seed paper's protocol (module docstring), averaged over
    ``pixels`` (one token-aggregated graph per image, ``leaf_errors`` as in ``attribute_aggregated``: the
    paper's default ``True`` makes error nodes leaves). Returns a ``CircuitEvaluation`` with
    ``protocol="seed"`` and ``errors="clean"``; its circuit-level fields are NaN (the protocol has none)."""
    from tqdm.auto import tqdm

    fractions = list(FRACTIONS if fractions is None else fractions)
    ref_px = pixels if reference_pixels is None else reference_pixels
    refs = rrm.reference_values(ref_px, reference)
    err_refs = [reduce_reference(e, reference) for e in seed_errors(rrm, ref_px)]  # the authors' error
    with torch.no_grad():
        names = [resid_post(layer) for layer in rrm.layers]
        _, cache = rrm.model.run_with_cache(ref_px, names_filter=names, return_cache_object=False)
    stack = [cache[n] for n in names]
    neuron_refs = [reduce_reference(s, reference) for s in stack]
    gen = torch.Generator().manual_seed(seed)
    sums: dict[str, dict[str, dict[str, Tensor]]] = {}
    for i in tqdm(range(len(pixels)), desc="evaluate_circuit (seed protocol)", unit="image", disable=not progress):
        x = pixels[i : i + 1]
        graph = rrm.attribute_aggregated(
            x, refs, err_refs, target=None if labels is None else int(labels[i]), leaf_errors=leaf_errors
        )
        target = graph.target_class
        clean_errors = [e[0] for e in rrm.errors(x)]
        sizes = {False: [sae.cfg.d_sae + 1 for sae in rrm.saes], True: [rrm.model.cfg.d_model] * rrm.n_layers}
        for rule in SEED_RANKINGS:
            if rule == "neurons":
                n_out = rrm.model(x).shape[-1]
                direction = -torch.full((n_out,), 1.0 / n_out, dtype=x.dtype)
                direction[target] += 1.0
                scores = [_positive_share(r) for r in _neuron_relevance(rrm, x, direction, neuron_refs)]
                d = rrm.model.cfg.d_model
                chosen = [[_top(s, d if q >= 1 else int(q * d)) for s in scores] for q in fractions]
            else:
                chosen = [select_nodes(graph, rule, q, gen) for q in fractions]
            rows = []
            for mode in ("insertion", "deletion"):
                for sel in chosen:
                    if mode == "deletion":
                        rows.append(sel)
                    else:
                        rows.append([_complement(c, s) for c, s in zip(sel, sizes[rule == "neurons"], strict=True)])
            if rule == "neurons":
                out = _neuron_outputs(rrm, x, rows, neuron_refs)
            else:
                out = _masked_outputs(rrm, x, rows, refs, err_refs, clean_errors=clean_errors)
            n_f = len(fractions)
            for mode, part in (("insertion", out[:n_f]), ("deletion", out[n_f:])):
                for metric, v in output_metrics(part, target).items():
                    acc = sums.setdefault(rule, {}).setdefault(mode, {})
                    acc[metric] = acc.get(metric, 0) + v
    n = len(pixels)
    curves = {r: {mode: {k: (v / n).tolist() for k, v in d.items()} for mode, d in m.items()} for r, m in sums.items()}
    aucs = {r: {mode: {k: auc(v) for k, v in d.items()} for mode, d in m.items()} for r, m in curves.items()}
    nan = float("nan")
    return CircuitEvaluation(fractions, curves, aucs, nan, nan, nan, n, [], protocol="seed", errors="clean")


def _complement(chosen: Tensor, size: int) -> Tensor:
    keep = torch.ones(size, dtype=torch.bool)
    keep[chosen] = False
    return keep.nonzero().flatten()
