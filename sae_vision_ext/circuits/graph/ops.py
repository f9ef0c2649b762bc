"""Influence, pruning and scores of attribution graphs (circuit-tracer's algorithms).

With ``Â = |A| / rowsum|A|`` (rows: targets, columns: sources; zero rows stay zero) and ``w`` the
target weights (the softmax probability of each target's class when targets are logits, else
uniform), node influence is ``I = w (Â + Â² + …)``: the share of the targets' attribution that
flows through each node along all paths. The series is finite because edges only run from a layer
to the next.

- ``prune``: circuit-tracer 0.5.0's ``prune_graph`` (see :func:`prune`): nodes of any kind by
  influence up to the cumulative share ``node_threshold``, edges up to ``edge_threshold``, then
  nodes left without kept edges dropped; inputs and targets are always kept.
- ``scores``: ``replacement`` = Σ_inputs I / (Σ_inputs I + Σ_errors I) (how much of the
  explanation reaches the image rather than stopping at SAE errors); ``completeness`` =
  Σ_n (1 − Σ_err Â[n, err]) (I_n + w_n) / Σ_n (I_n + w_n) (how much of each node's direct input is
  explained by non-error nodes). Pruned feature nodes count as errors.
- With MLP leaves (``Attributor(..., mlp_leaves=True)``), ``mlp_share`` = Σ_mlp I / (Σ_inputs I +
  Σ_errors I + Σ_mlp I): the share of the explanation that ends in MLP outputs. MLP leaves count
  neither as inputs nor as errors in ``replacement``, so it measures the attention-only path.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .graph import AttributionGraph


def edges(adjacency: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(target, source, weight)`` of every stored edge of a sparse adjacency (coalesced order)."""
    a = adjacency.coalesce()
    dst, src = a.indices()
    return dst, src, a.values()


def normalised_values(dst: Tensor, vals: Tensor, n_nodes: int) -> Tensor:
    """``|A| / rowsum|A|`` on the stored edges (rows with no inputs stay zero)."""
    mag = vals.abs()
    rowsum = torch.zeros(n_nodes, dtype=mag.dtype).index_add_(0, dst, mag)
    return mag / rowsum[dst].clamp_min(1e-30)


def normalised_abs(adjacency: Tensor) -> Tensor:
    """``|A| / rowsum|A|`` as a sparse tensor with ``adjacency``'s indices."""
    a = adjacency.coalesce()
    dst, _, vals = edges(a)
    return torch.sparse_coo_tensor(
        a.indices(), normalised_values(dst, vals, a.shape[0]), a.shape, is_coalesced=True, check_invariants=False
    )


def propagate(dst: Tensor, src: Tensor, a_hat: Tensor, weights: Tensor, max_steps: int = 1000) -> Tensor:
    """``w (Â + Â² + …)`` over edge lists sorted by target (coalesced order), by repeated
    propagation from targets to sources until nothing is left (finite on a layered graph). Each
    step reads only the edges whose targets lie in the span of nodes still carrying weight, so on a
    layered graph every edge is read about once."""
    v = weights.to(a_hat.dtype)
    total = torch.zeros_like(v)
    for _ in range(max_steps):
        live = v.nonzero().squeeze(1)
        if not len(live):
            break
        span = torch.searchsorted(dst, torch.stack([live.min(), live.max() + 1]))
        lo, hi = int(span[0]), int(span[1])
        v = torch.zeros_like(v).index_add_(0, src[lo:hi], a_hat[lo:hi] * v[dst[lo:hi]])
        total += v
    return total


def influence(a_hat: Tensor, weights: Tensor, max_steps: int = 1000) -> Tensor:
    """``w (Â + Â² + …)`` for a sparse ``Â`` (see :func:`propagate`)."""
    dst, src, vals = edges(a_hat)
    return propagate(dst, src, vals, weights, max_steps)


def cache_influence(graph: AttributionGraph, influence: Tensor) -> None:
    """Store an already computed ``node_influence(graph)`` (the attribution's row store has it)."""
    graph.__dict__["_influence_cache"] = {id(graph.adjacency): influence}


def node_influence(graph: AttributionGraph) -> Tensor:
    """Influence of every node of ``graph`` on its weighted targets (cached on the graph object)."""
    cache = graph.__dict__.setdefault("_influence_cache", {})
    key = id(graph.adjacency)
    if key not in cache:
        dst, src, vals = edges(graph.adjacency)
        cache.clear()
        cache[key] = propagate(dst, src, normalised_values(dst, vals, graph.n_nodes), graph.weights)
    return cache[key]


def target_weights(node_kind: list[str], target_classes: list[int], logits: Tensor | None = None) -> Tensor:
    """``w``: on target nodes, ``logits``' softmax at each target's class if given, else uniform."""
    w = torch.zeros(len(node_kind), dtype=torch.float64)
    targets = [i for i, k in enumerate(node_kind) if k == "target"]
    if logits is not None and len(target_classes) == len(targets):
        probs = torch.softmax(logits.double().flatten(), -1)
        w[targets] = torch.stack([probs[c] for c in target_classes])
        w[targets] /= w[targets].sum()
    else:
        w[targets] = 1.0 / len(targets)
    return w


_TARGET_KINDS = (
    "None (the predicted class), a class id (an int >= 0, e.g. target=2) or output direction(s) "
    "(a float tensor [d_out] or [n_targets, d_out])"
)


def check_target(target: object) -> Tensor | int | None:
    """``target`` of ``attribute`` checked before any work: ``None``, a class id (an int >= 0; a
    one-element integer tensor counts as one) or a float tensor of output directions. Anything else
    (a float such as ``2.0``, a bool, a string, a negative id, a non-finite tensor) raises
    ``TypeError``/``ValueError`` saying what is accepted. The range of a class id is checked by
    :func:`resolve_targets`, which knows the output width."""
    if target is None:
        return None
    if isinstance(target, Tensor) and not target.is_floating_point() and target.numel() == 1:
        target = int(target.item()) if target.dtype != torch.bool else bool(target.item())
    if isinstance(target, bool) or not isinstance(target, (numbers.Integral, Tensor)):
        hint = f" (for class {int(target)} pass target={int(target)})" if _whole_float(target) else ""
        raise TypeError(f"target must be {_TARGET_KINDS}; got {target!r} ({type(target).__name__}){hint}.")
    if isinstance(target, numbers.Integral):
        if target < 0:
            raise ValueError(
                f"target={int(target)} is negative; class ids count from 0 (negative ids are not read from the "
                "end). Pass the class id, or None for the predicted class."
            )
        return int(target)
    if not target.is_floating_point():
        raise TypeError(
            f"target must be {_TARGET_KINDS}; got a {target.dtype} tensor of shape {list(target.shape)} "
            "(for class ids trace one class per call)."
        )
    if target.numel() == 0 or not bool(torch.isfinite(target).all()):
        raise ValueError(
            f"target directions must be non-empty and finite; got shape {list(target.shape)} "
            f"with {int((~torch.isfinite(target)).sum())} non-finite value(s)."
        )
    return target


def _whole_float(value: object) -> bool:
    return isinstance(value, float) and value.is_integer() and value >= 0


def resolve_targets(
    class_names: Sequence[str], clean_out: Tensor, targets: Tensor | int | None, target_names: list[str] | None
) -> tuple[Tensor, list[str], list[int]]:
    """The targets of ``Attributor.attribute``: output directions ``[n_targets, d_out]``, their names
    and (for class targets) classes. ``None`` is the predicted class, an int that class, each as its
    logit demeaned over classes. A class id outside the model's outputs, or directions whose last
    dimension is not the output width, raise ``ValueError`` naming the valid range or shape."""
    targets = check_target(targets)
    d_out = clean_out.shape[-1]
    target_classes: list[int] = []
    if targets is None or isinstance(targets, int):
        c = int(clean_out[0].argmax()) if targets is None else int(targets)
        if c >= d_out:
            names = f" ({', '.join(class_names)})" if 0 < len(class_names) <= 20 else ""
            raise ValueError(
                f"target={c} is not a class of this model: it has {d_out} outputs, so class ids run "
                f"0..{d_out - 1}{names}. Pass one of those, or None for the predicted class."
            )
        # in the output's dtype: 1/d_out rounded to float32 first would put float32's error (1.5e-8 for 5
        # classes) into every target edge of a float64 trace
        targets = -torch.full((1, d_out), 1.0 / d_out, device=clean_out.device, dtype=clean_out.dtype)
        targets[0, c] += 1.0
        target_names = target_names or [class_names[c] if c < len(class_names) else f"class {c}"]
        target_classes = [c]
    if targets.shape[-1] != d_out or targets.dim() > 2:
        raise ValueError(
            f"target directions have shape {list(targets.shape)}; the model has {d_out} outputs, so pass "
            f"[{d_out}] or [n_targets, {d_out}]."
        )
    targets = targets.to(clean_out).reshape(-1, d_out)
    if target_names is not None and len(target_names) != len(targets):
        raise ValueError(f"target_names has {len(target_names)} name(s) for {len(targets)} target(s); give one each.")
    return targets, list(target_names or [f"target {i}" for i in range(len(targets))]), target_classes


def target_probs(target_classes: list[int], n_targets: int, logits: Tensor) -> Tensor:
    """The model's probability of each target's class (NaN where targets are not classes)."""
    out = torch.full((n_targets,), float("nan"), dtype=torch.float64)
    if len(target_classes) == n_targets:
        out[:] = torch.softmax(logits[0].double(), -1)[torch.tensor(target_classes, dtype=torch.long)]
    return out


class PruneResult(NamedTuple):
    """circuit-tracer's ``PruneResult``: masks over nodes and over the coalesced adjacency values."""

    node_mask: Tensor
    edge_mask: Tensor
    cumulative_scores: Tensor
    """Per node, the cumulative share of influence of the nodes at least as influential as it
    (ascending from the most influential node): what circuit-tracer exports as ``influence``."""


def _threshold(scores: Tensor, share: float) -> Tensor:
    """circuit-tracer's ``find_threshold``: the score of the node at which the cumulative share of
    the descending scores reaches ``share``."""
    ordered = scores.sort(descending=True).values
    cum = ordered.cumsum(0) / ordered.sum()
    index = min(int(torch.searchsorted(cum, torch.tensor(share, dtype=cum.dtype))), len(cum) - 1)
    return ordered[index]


def prune(graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneResult:
    """circuit-tracer 0.5.0's ``prune_graph`` on the sparse adjacency (same masks, tested against it).

    Nodes are kept when their influence reaches the score at which the descending cumulative share
    of all nodes' influence passes ``node_threshold`` (inputs and targets always kept); edges among
    kept nodes are scored ``Â'[t, s] · (I'_t + w_t)`` on the re-normalised pruned graph and kept up
    to ``edge_threshold``; then, until nothing changes, feature, error and MLP nodes without a kept
    outgoing edge and feature nodes without a kept incoming edge are dropped with their edges.
    """
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1]; got {value!r}.")
    kinds = graph.node_kind
    w = graph.weights
    dst, src, vals = edges(graph.adjacency)
    infl = node_influence(graph)
    always = torch.tensor([k in ("input", "target") for k in kinds])
    is_feature = torch.tensor([k == "feature" for k in kinds])
    node_mask = (infl >= _threshold(infl, node_threshold)) | always
    # only edges among kept nodes can be kept: the rest of the work runs on them (order preserved)
    alive = (node_mask[src] & node_mask[dst]).nonzero().squeeze(1)
    a_dst, a_src = dst[alive], src[alive]
    a_hat = normalised_values(a_dst, vals[alive], len(kinds))
    edge_scores = a_hat * (propagate(a_dst, a_src, a_hat, w) + w)[a_dst]
    kept = edge_scores >= _threshold(edge_scores, edge_threshold) if len(edge_scores) else edge_scores > 0
    n = len(kinds)
    while True:
        before = node_mask.clone()
        kept &= node_mask[a_src] & node_mask[a_dst]
        has_out = torch.zeros(n, dtype=torch.bool).index_fill_(0, a_src[kept], True)
        has_in = torch.zeros(n, dtype=torch.bool).index_fill_(0, a_dst[kept], True)
        node_mask &= always | has_out
        node_mask &= ~is_feature | has_in
        if torch.equal(node_mask, before):
            break
    edge_mask = torch.zeros(len(dst), dtype=torch.bool)
    edge_mask[alive[kept]] = True
    ordered, order = infl.sort(descending=True)
    cumulative = torch.zeros_like(infl)
    cumulative[order] = ordered.cumsum(0) / ordered.sum()
    return PruneResult(node_mask, edge_mask, cumulative)


def scores(graph: AttributionGraph, node_mask: Tensor | None = None) -> dict[str, float]:
    """Replacement and completeness scores; features outside ``node_mask`` count as errors."""
    dst, src, vals = edges(graph.adjacency)
    a_hat = normalised_values(dst, vals, graph.n_nodes)
    w = graph.weights
    infl = node_influence(graph)
    kinds = graph.node_kind
    is_error = torch.tensor([k == "error" for k in kinds])
    if node_mask is not None:
        is_error |= torch.tensor([k == "feature" for k in kinds]) & ~node_mask
    is_input = torch.tensor([k == "input" for k in kinds])
    inp, err = float(infl[is_input].sum()), float(infl[is_error].sum())
    err_in = torch.zeros(graph.n_nodes, dtype=a_hat.dtype).index_add_(0, dst, a_hat * is_error[src])
    has_inputs = torch.zeros(graph.n_nodes, dtype=torch.bool)
    has_inputs[dst] = True
    mass = (infl + w) * has_inputs
    if node_mask is not None:
        mass = mass * (node_mask | ~torch.tensor([k == "feature" for k in kinds]))
    completeness = float(((1 - err_in) * mass).sum() / mass.sum().clamp_min(1e-30))
    out = {"replacement": inp / max(inp + err, 1e-30), "completeness": completeness}
    is_mlp = torch.tensor([k == "mlp" for k in kinds])
    if is_mlp.any():
        mlp = float(infl[is_mlp].sum())
        out["mlp_share"] = mlp / max(inp + err + mlp, 1e-30)
    return out
