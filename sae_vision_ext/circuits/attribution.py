"""Attribution graphs over the residual replacement model, exact under a stated linearisation.

Nodes, in this order (the adjacency's row and column order):

1. input nodes, one per position: the residual entering block 0 (``blocks.0.hook_resid_pre``);
2. per layer ``l = 0..L-1``: its active SAE features ``(l, position, feature)`` sorted by position
   then feature, then one error node per position (``e_l[p] = x_l[p] − reconstruction``);
3. target nodes: output directions (a class logit demeaned over classes by default).

Edges (``A[target, source]``, circuit-tracer's orientation) run between adjacent layers: a feature
of layer ``l`` receives from layer ``l − 1`` (layer 0 from the inputs), a target from layer
``L − 1``. With patterns, LayerNorm scales and MLP gates frozen at their values on this image
(``linearise.py``), the target's pre-activation ``h_t`` is affine in the source layer's residual
``x``, and

    edge(feature s → t) = a_s · <∂h_t/∂x[p_s], W_dec[f_s]>,   edge(error or input → t) = <∂h_t/∂x[p], v[p]>

with ``v`` the error vector or the input residual. ``constant[t]``, the response to the biases
alone (``b_dec``, LayerNorm, attention and MLP biases, ``b_enc``), is computed by a separate
frozen forward in which every source residual is replaced by its bias, so
``Σ_s A[t, s] + constant[t] = h_t`` is a check, not a definition (``tests/test_attribution.py``).
Rows are computed by batched backward passes: the image is repeated along the batch and each row
seeds one target.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .linearise import frozen_hooks, pre_capture_hooks, record
from .replacement import ResidualReplacementModel


@dataclass
class AttributionGraph:
    """Nodes (see the module docstring for their order) and the sparse adjacency ``A[target, source]``."""

    node_kind: list[str]
    """``input``, ``feature``, ``error`` or ``target`` per node."""
    node_layer: Tensor
    """Layer of each node (-1 for inputs, n_layers for targets)."""
    node_pos: Tensor
    """Token position (-1 for targets)."""
    node_feature: Tensor
    """SAE feature id (-1 for inputs, errors and targets)."""
    activation: Tensor
    """Feature activation; error-vector norm for errors; input-residual norm for inputs; value for targets."""
    adjacency: Tensor
    """Sparse COO ``[n_nodes, n_nodes]``: rows targets, columns sources (direct effects)."""
    value: Tensor
    """Pre-activation ``h_t`` of every node that was a target (features and targets), NaN otherwise."""
    constant: Tensor
    """Bias-only response of every node that was a target, NaN otherwise."""
    target_names: list[str] = field(default_factory=list)
    target_classes: list[int] = field(default_factory=list)
    """Class of each target when targets are (demeaned) class logits."""
    weights: Tensor | None = None
    """Target weights ``w`` for influence (softmax probability of each target's class)."""
    n_prefix: int = 1
    has_cls: bool = True
    grid: tuple[int, int] = (1, 1)
    node_mask: Tensor | None = None
    """Kept nodes after ``prune`` (``None``: unpruned)."""
    edge_mask: Tensor | None = None

    @property
    def n_nodes(self) -> int:
        return len(self.node_kind)

    def dense(self) -> Tensor:
        return self.adjacency.to_dense()

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> AttributionGraph:
        """A copy with ``node_mask``/``edge_mask`` set (see ``graph_ops.prune``)."""
        from dataclasses import replace

        from .graph_ops import prune

        nodes, edges = prune(self, node_threshold, edge_threshold)
        return replace(self, node_mask=nodes, edge_mask=edges)

    def scores(self) -> dict[str, float]:
        """Replacement and completeness, unpruned and (if pruned) pruned."""
        from .graph_ops import scores

        out = {f"{k}": v for k, v in scores(self).items()}
        if self.node_mask is not None:
            out |= {f"{k}_pruned": v for k, v in scores(self, self.node_mask).items()}
        return out

    def to_json(self, path: str, slug: str = "vit-graph") -> dict:
        """circuit-tracer's graph JSON (pruned nodes and edges left out when pruned)."""
        from .graph_ops import to_circuit_tracer_json

        return to_circuit_tracer_json(self, path, slug, self.node_mask, self.edge_mask)

    def aggregate_positions(self) -> tuple[list[tuple[str, int, int]], Tensor]:
        """Token-aggregated view (as the seed paper reports): nodes ``(kind, layer, feature)`` with
        edges summed over positions; returns the node keys and a dense matrix."""
        node_keys = [(k, int(layer), int(f)) for k, layer, f in
                     zip(self.node_kind, self.node_layer, self.node_feature, strict=True)]  # fmt: skip
        keys = sorted(set(node_keys))
        index = {k: i for i, k in enumerate(keys)}
        node_to_key = torch.tensor([index[k] for k in node_keys])
        a = self.adjacency.coalesce()
        out = torch.zeros(len(keys), len(keys), dtype=a.values().dtype)
        out.index_put_((node_to_key[a.indices()[0]], node_to_key[a.indices()[1]]), a.values(), accumulate=True)
        return keys, out


class _Leaves:
    """Forward hooks that make the input residual and every layer's spliced residual gradient leaves,
    optionally replacing their values (for bias-only and perturbation runs)."""

    def __init__(self, n_layers: int, replace: dict[int, Tensor] | None = None) -> None:
        self.values: dict[int, Tensor] = {}
        self.replace = replace or {}
        self.n_layers = n_layers

    def hook(self, layer: int):
        def fn(t: Tensor, hook: Any) -> Tensor:
            leaf = (self.replace[layer].expand_as(t) if layer in self.replace else t).detach().clone().requires_grad_()
            self.values[layer] = leaf
            return leaf

        return fn

    def hooks(self) -> list[tuple[str, Any]]:
        out = [("blocks.0.hook_resid_pre", self.hook(-1))]
        out += [(f"blocks.{layer}.hook_resid_post.hook_sae_output", self.hook(layer)) for layer in range(self.n_layers)]
        return out


class Attributor:
    """Computes attribution graphs for one ``ResidualReplacementModel`` (see the module docstring)."""

    def __init__(self, rrm: ResidualReplacementModel, batch_size: int = 32) -> None:
        self.rrm, self.model, self.batch_size = rrm, rrm.model, batch_size
        extra = getattr(self.model.cfg, "extra", {})
        if extra.get("global_pool") == "map" or type(self.model.adapter).__name__ == "HFSiglipAdapter":
            raise ValueError("Attention-pool heads are not linear under this linearisation; not supported yet.")

    def _forward(self, pixels: Tensor, frozen: dict[str, Tensor], leaves: _Leaves) -> tuple[Tensor, list[Tensor]]:
        """Frozen forward with all SAEs spliced (error terms kept); returns output and each layer's pre-acts."""
        pre_acts: dict[int, Tensor] = {}
        hooks = pre_capture_hooks(self.model) + frozen_hooks(self.model, frozen) + leaves.hooks()
        for layer in range(self.rrm.n_layers):
            name = f"blocks.{layer}.hook_resid_post.hook_sae_acts_pre"
            hooks.append((name, lambda t, hook, layer=layer: pre_acts.__setitem__(layer, t)))
        with self.rrm.spliced(keep_errors=True), self.model.hooks(fwd_hooks=hooks):
            out = self.model(pixels)
        return out, [pre_acts[layer] for layer in range(self.rrm.n_layers)]

    def attribute(
        self, pixels: Tensor, targets: Tensor | None = None, target_names: list[str] | None = None
    ) -> AttributionGraph:
        """The graph for one image ``[1, chan, h, w]``. ``targets``: output directions ``[n_targets,
        d_out]`` (default: the predicted class's logit, demeaned over classes)."""
        if pixels.shape[0] != 1:
            raise ValueError(f"attribute() traces one image; got a batch of {pixels.shape[0]}.")
        model, rrm = self.model, self.rrm
        L = rrm.n_layers
        frozen = record_with_saes(rrm, pixels)
        with torch.no_grad():
            _, cache = model.run_with_cache_with_saes(
                pixels, saes=rrm.saes, use_error_term=True, return_cache_object=False,
                names_filter=lambda n: n.endswith(("hook_sae_acts_post", "hook_sae_error", "hook_sae_input"))
                or n == "blocks.0.hook_resid_pre",
            )  # fmt: skip
            clean_out = model(pixels)
        acts = [cache[f"blocks.{i}.hook_resid_post.hook_sae_acts_post"][0] for i in range(L)]
        errors = [cache[f"blocks.{i}.hook_resid_post.hook_sae_error"][0] for i in range(L)]
        x_in = cache["blocks.0.hook_resid_pre"][0]
        n_pos = x_in.shape[0]
        target_classes: list[int] = []
        if targets is None or isinstance(targets, int):
            c = int(clean_out[0].argmax()) if targets is None else int(targets)
            targets = -torch.full((1, clean_out.shape[-1]), 1.0 / clean_out.shape[-1])
            targets[0, c] += 1.0
            target_names = target_names or [f"class {c} (demeaned logit)"]
            target_classes = [c]
        targets = targets.to(clean_out.dtype).reshape(-1, clean_out.shape[-1])

        # ---- nodes
        kinds, layers, poss, feats, vals = (
            ["input"] * n_pos,
            [-1] * n_pos,
            list(range(n_pos)),
            [-1] * n_pos,
            x_in.norm(dim=-1).tolist(),
        )
        feature_index: list[dict[tuple[int, int], int]] = []
        error_start = []
        for layer in range(L):
            nz = acts[layer].nonzero().tolist()
            idx = {}
            for p, f in nz:
                idx[(p, f)] = len(kinds)
                kinds.append("feature")
                layers.append(layer)
                poss.append(p)
                feats.append(f)
                vals.append(float(acts[layer][p, f]))
            feature_index.append(idx)
            error_start.append(len(kinds))
            for p in range(n_pos):
                kinds.append("error")
                layers.append(layer)
                poss.append(p)
                feats.append(-1)
                vals.append(float(errors[layer][p].norm()))
        target_start = len(kinds)
        clean_t = (clean_out[0] @ targets.T).tolist()
        for i in range(len(targets)):
            kinds.append("target")
            layers.append(L)
            poss.append(-1)
            feats.append(-1)
            vals.append(clean_t[i])
        n = len(kinds)

        # ---- constants: bias-only frozen forward (every source residual replaced by its bias)
        bias_only = {-1: torch.zeros_like(x_in)} | {layer: rrm.saes[layer].b_dec.detach() for layer in range(L)}
        with torch.no_grad():
            out_b, pre_b = self._forward(pixels, frozen, _Leaves(L, bias_only))
        value = torch.full((n,), float("nan"), dtype=torch.float64)
        constant = torch.full((n,), float("nan"), dtype=torch.float64)

        # ---- rows: batched backward, one target per batch row
        # per source layer, once: positions and features of its active features, and its node ids
        src_pos, src_feat, src_nodes = {}, {}, {}
        for layer in range(L):
            keys = list(feature_index[layer])
            src_pos[layer] = torch.tensor([k[0] for k in keys], dtype=torch.long)
            src_feat[layer] = torch.tensor([k[1] for k in keys], dtype=torch.long)
            src_nodes[layer] = torch.tensor([feature_index[layer][k] for k in keys] +
                                            list(range(error_start[layer], error_start[layer] + n_pos)))  # fmt: skip
        w_dec = [sae.W_dec.detach() for sae in rrm.saes]
        rows_t: list[Tensor] = []
        rows_src: list[Tensor] = []
        rows_w: list[Tensor] = []
        jobs = [("feature", layer, p, f, node) for layer in range(L) for (p, f), node in feature_index[layer].items()]
        jobs += [("target", L, -1, i, target_start + i) for i in range(len(targets))]
        for start in range(0, len(jobs), self.batch_size):
            batch = jobs[start : start + self.batch_size]
            leaves = _Leaves(L)
            out, pre = self._forward(pixels.expand(len(batch), -1, -1, -1), frozen, leaves)
            seeds = []
            for b, (kind, layer, p, f, node) in enumerate(batch):
                h = pre[layer][b, p, f] if kind == "feature" else out[b] @ targets[f]
                seeds.append(h)
                value[node] = float(h.detach())
                constant[node] = float(pre_b[layer][0, p, f] if kind == "feature" else out_b[0] @ targets[f])
            grads = torch.autograd.grad(torch.stack(seeds).sum(), [leaves.values[i] for i in range(-1, L)],
                                        allow_unused=True)  # fmt: skip
            grads = dict(zip(range(-1, L), grads, strict=True))
            for b, (_kind, layer, _p, _f, node) in enumerate(batch):
                src_layer = layer - 1
                g = grads[src_layer][b].detach()  # [pos, d_model]
                if src_layer == -1:
                    src = torch.arange(n_pos)
                    w = (g * x_in).sum(-1)
                else:
                    sp, sf = src_pos[src_layer], src_feat[src_layer]
                    feature_w = (g[sp] * w_dec[src_layer][sf]).sum(-1) * acts[src_layer][sp, sf]
                    src = src_nodes[src_layer]
                    w = torch.cat([feature_w, (g * errors[src_layer]).sum(-1)])
                rows_t.append(torch.full((len(src),), node))
                rows_src.append(src)
                rows_w.append(w)
        indices = torch.stack([torch.cat(rows_t), torch.cat(rows_src)])
        adjacency = torch.sparse_coo_tensor(indices, torch.cat(rows_w), (n, n), check_invariants=False).coalesce()
        names = list(target_names or [f"target {i}" for i in range(len(targets))])
        graph = AttributionGraph(
            node_kind=kinds, node_layer=torch.tensor(layers), node_pos=torch.tensor(poss),
            node_feature=torch.tensor(feats), activation=torch.tensor(vals, dtype=torch.float64), adjacency=adjacency,
            value=value, constant=constant, target_names=names,
            target_classes=target_classes, n_prefix=model.cfg.n_prefix_tokens, has_cls=model.cfg.has_cls_token,
            grid=model.cfg.grid_size,
        )  # fmt: skip
        from .graph_ops import target_weights

        graph.weights = target_weights(graph, clean_out[0] if target_classes else None)
        return graph


def record_with_saes(rrm: ResidualReplacementModel, pixels: Tensor) -> dict[str, Tensor]:
    """Frozen values from the clean forward with every SAE spliced and its error term kept."""
    with rrm.spliced(keep_errors=True):
        return record(rrm.model, pixels)
