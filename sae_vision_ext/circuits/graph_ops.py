"""Influence, pruning, scores and export of attribution graphs (circuit-tracer's algorithm).

With ``Â = |A| / rowsum|A|`` (rows: targets, columns: sources; zero rows stay zero) and ``w`` the
target weights (the softmax probability of each target's class when targets are logits, else
uniform), node influence is ``I = w (Â + Â² + …)``: the share of the targets' attribution that
flows through each node along all paths. The series is finite because edges only run from a layer
to the next.

- ``prune``: keep feature nodes by decreasing influence up to a cumulative share
  ``node_threshold`` of all feature influence, then edges by decreasing ``Â[t, s] · (I_t + w_t)``
  up to ``edge_threshold``; input, error and target nodes are never pruned.
- ``scores``: ``replacement`` = Σ_inputs I / (Σ_inputs I + Σ_errors I) (how much of the
  explanation reaches the image rather than stopping at SAE errors); ``completeness`` =
  Σ_n (1 − Σ_err Â[n, err]) (I_n + w_n) / Σ_n (I_n + w_n) (how much of each node's direct input is
  explained by non-error nodes). Pruned feature nodes count as errors.
- With MLP leaves (``Attributor(..., mlp_leaves=True)``), ``mlp_share`` = Σ_mlp I / (Σ_inputs I +
  Σ_errors I + Σ_mlp I): the share of the explanation that ends in MLP outputs. MLP leaves count
  neither as inputs nor as errors in ``replacement``, so it measures the attention-only path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def normalised_abs(adjacency: Tensor) -> Tensor:
    """``|A| / rowsum|A|`` as a sparse tensor (rows with no inputs stay zero)."""
    a = adjacency.coalesce()
    idx, vals = a.indices(), a.values().abs()
    rowsum = torch.zeros(a.shape[0], dtype=vals.dtype).index_add_(0, idx[0], vals)
    return torch.sparse_coo_tensor(
        idx, vals / rowsum[idx[0]].clamp_min(1e-30), a.shape, check_invariants=False
    ).coalesce()


def influence(a_hat: Tensor, weights: Tensor, max_steps: int = 1000) -> Tensor:
    """``w (Â + Â² + …)`` by repeated propagation (stops when nothing is left to propagate)."""
    t = a_hat.t().coalesce()
    v, total = weights.to(a_hat.dtype), torch.zeros_like(weights, dtype=a_hat.dtype)
    for _ in range(max_steps):
        v = torch.sparse.mm(t, v[:, None]).squeeze(1)
        if not v.abs().max() > 0:
            break
        total += v
    return total


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


def prune(graph: Any, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> tuple[Tensor, Tensor]:
    """``(node_mask, edge_mask)`` per the module docstring (edge mask over the coalesced adjacency values)."""
    a_hat = normalised_abs(graph.adjacency)
    w = graph.weights
    infl = influence(a_hat, w)
    kinds = graph.node_kind
    is_feature = torch.tensor([k == "feature" for k in kinds])
    keep = ~is_feature
    feat_idx = is_feature.nonzero().squeeze(1)
    if len(feat_idx):
        order = feat_idx[infl[feat_idx].argsort(descending=True)]
        share = infl[order].cumsum(0) / infl[order].sum().clamp_min(1e-30)
        n_keep = int((share < node_threshold).sum()) + 1
        keep[order[:n_keep]] = True
    a = graph.adjacency.coalesce()
    src, dst = a.indices()[1], a.indices()[0]
    alive = keep[src] & keep[dst]
    score = a_hat.values() * (infl + w)[dst]
    score = torch.where(alive, score, torch.zeros_like(score))
    order = score.argsort(descending=True)
    cum = score[order].cumsum(0) / score.sum().clamp_min(1e-30)
    n_edges = int((cum < edge_threshold).sum()) + 1
    edge_mask = torch.zeros_like(alive)
    edge_mask[order[:n_edges]] = True
    return keep, edge_mask & alive


def scores(graph: Any, node_mask: Tensor | None = None) -> dict[str, float]:
    """Replacement and completeness scores; features outside ``node_mask`` count as errors."""
    a_hat = normalised_abs(graph.adjacency)
    w = graph.weights
    infl = influence(a_hat, w)
    kinds = graph.node_kind
    is_error = torch.tensor([k == "error" for k in kinds])
    if node_mask is not None:
        is_error |= torch.tensor([k == "feature" for k in kinds]) & ~node_mask
    is_input = torch.tensor([k == "input" for k in kinds])
    inp, err = float(infl[is_input].sum()), float(infl[is_error].sum())
    idx, vals = a_hat.indices(), a_hat.values()
    err_in = torch.zeros(graph.n_nodes, dtype=vals.dtype).index_add_(0, idx[0], vals * is_error[idx[1]])
    has_inputs = torch.zeros(graph.n_nodes, dtype=torch.bool)
    has_inputs[idx[0]] = True
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


def position_label(pos: int, n_prefix: int, has_cls: bool, grid_w: int) -> str:
    """``CLS``, ``reg{i}`` / ``dist``, or ``p(row,col)`` for patches."""
    if pos < n_prefix:
        if has_cls and pos == 0:
            return "CLS"
        return f"reg{pos - int(has_cls)}"
    r, c = divmod(pos - n_prefix, grid_w)
    return f"p({r},{c})"


def to_circuit_tracer_json(graph: Any, path: str | Path, slug: str = "vit-graph", node_mask: Tensor | None = None,
                           edge_mask: Tensor | None = None, labels: list[str] | None = None) -> dict:  # fmt: skip
    """Write circuit-tracer's graph JSON (metadata, qParams, nodes, links); returns the dict.

    Node ids: features ``{layer}_{feature}_{pos}``, errors ``{layer}_-1_{pos}``, inputs
    ``E_{pos}_{pos}``, MLP leaves ``{layer}_mlp_{pos}``, targets ``{n_layers + 1}_{target}_{0}``.
    Positions are prompt tokens labelled ``CLS``, ``reg{i}``, ``p(row,col)``. Note: circuit-tracer's
    frontend hides features active on more than 2/3 of positions, which dense vision features often are.
    """
    n_pos = int((torch.tensor([k == "input" for k in graph.node_kind])).sum())
    tokens = labels or [position_label(p, graph.n_prefix, graph.has_cls, graph.grid[1]) for p in range(n_pos)]
    infl = influence(normalised_abs(graph.adjacency), graph.weights)
    L = int(graph.node_layer.max())
    ids, nodes = [], []
    for i, kind in enumerate(graph.node_kind):
        layer, pos, feat = int(graph.node_layer[i]), int(graph.node_pos[i]), int(graph.node_feature[i])
        if kind == "feature":
            nid, ftype, lay = f"{layer}_{feat}_{pos}", "cross layer transcoder", str(layer)
        elif kind == "error":
            nid, ftype, lay = f"{layer}_-1_{pos}", "mlp reconstruction error", str(layer)
        elif kind == "mlp":
            nid, ftype, lay = f"{layer}_mlp_{pos}", "mlp output", str(layer)
        elif kind == "input":
            nid, ftype, lay = f"E_{pos}_{pos}", "embedding", "E"
        else:
            t = i - graph.node_kind.index("target")
            nid, ftype, lay, pos = f"{L + 1}_{t}_0", "logit", str(L + 1), 0
        ids.append(nid)
        if node_mask is not None and not bool(node_mask[i]):
            continue
        nodes.append({
            "node_id": nid, "feature": feat, "layer": lay, "ctx_idx": pos, "feature_type": ftype,
            "token_prob": float(graph.weights[i]) if kind == "target" else 0.0, "is_target_logit": kind == "target",
            "run_idx": 0, "reverse_ctx_idx": n_pos - 1 - pos, "jsNodeId": nid,
            "clerp": graph.target_names[i - graph.node_kind.index("target")] if kind == "target" else "",
            "influence": float(infl[i]), "activation": float(graph.activation[i]),
        })  # fmt: skip
    a = graph.adjacency.coalesce()
    links = []
    for j, ((t, s), wgt) in enumerate(zip(a.indices().T.tolist(), a.values().tolist(), strict=True)):
        if edge_mask is not None and not bool(edge_mask[j]):
            continue
        links.append({"source": ids[s], "target": ids[t], "weight": wgt})
    out = {
        "metadata": {"slug": slug, "scan": "sae_vision_ext", "prompt_tokens": tokens, "prompt": " ".join(tokens),
                     "node_threshold": None, "schema_version": 1},
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": nodes,
        "links": links,
    }  # fmt: skip
    Path(path).write_text(json.dumps(out))
    return out
