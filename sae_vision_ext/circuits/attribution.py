"""Attribution graphs over the residual replacement model, exact under a stated linearisation.

Nodes, in this order (the adjacency's row and column order):

1. input nodes, one per position: the residual entering block 0 (``blocks.0.hook_resid_pre``);
2. per SAE layer ``l`` (the blocks ``rrm.layers``, ascending; ``node_layer`` is the block number): in
   MLP-leaf mode first one ``mlp`` node per position (block ``l``'s ``hook_mlp_out``), then its active
   SAE features ``(l, position, feature)`` sorted by position then feature, then one error node per
   position (``e_l[p] = x_l[p] − reconstruction``);
3. target nodes (``node_layer = model.cfg.n_layers``): output directions (a class logit demeaned over
   classes by default).

Edges (``A[target, source]``, circuit-tracer's orientation) run between consecutive SAE layers: a
feature of SAE layer ``l`` receives from the previous SAE layer (the first from the inputs), a target
from the last SAE layer; blocks without an SAE in between (for example the last block, in the seed
paper's setting) are part of the frozen map an edge goes through. With patterns, LayerNorm scales
and MLP gates frozen at their values on this image (``linearise.py``) and every SAE's input
normalisation frozen at its clean statistics (``saes/affine.py``: the ``layer_norm`` std, the
``constant_norm_rescale`` factor), the target's pre-activation ``h_t`` (the value an active
feature's activation equals: decoder-norm rescaling and the gated magnitude path included) is
affine in the source layer's residual ``x``, and

    edge(feature s → t) = a_s · <∂h_t/∂x[p_s], d_s[p_s]>,   edge(error or input → t) = <∂h_t/∂x[p], v[p]>

with ``d_s[p] = σ*[p]·W_dec[f_s]/|W_dec[f_s]|`` the effective decoder direction (``σ*`` and the norm
only where the SAE's settings use them) and ``v`` the error vector or the input residual.
``constant[t]``, the response to the biases alone (the decoder bias ``σ*·b_dec + μ*``, LayerNorm,
attention and MLP biases, ``b_enc``), is computed by a separate frozen forward in which every source
residual is replaced by its bias, so ``Σ_s A[t, s] + constant[t] = h_t`` is a check, not a
definition (``tests/test_attribution.py``, ``tests/test_attribution_saes.py``).
Rows come from one frozen forward of the image. For ``batch_size`` feature targets of one layer at
a time whose block reads the previous SAE layer directly, rows are computed in closed form on each
target's token (``rows.py``: the rank-one encoder cotangent, the MLP half on the targets' tokens,
the value path of the attention half). Logit targets, the MLP-leaf mode and blocks between SAE
layers use a plain batched VJP from the target. Source edges project the gradient onto the active
features' decoder rows only.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from .._hooks import resid_post, sae_acts, sae_error
from ..saes import affine
from .graph import AttributionGraph
from .linearise import frozen_hooks, pre_capture_hooks
from .replacement_base import ReplacementModelBase
from .rows import target_rows

logger = logging.getLogger(__name__)


class _Leaves:
    """Forward hooks that make the input residual, every layer's spliced residual (int keys ``-1..L-1``)
    and, in MLP-leaf mode, every block's MLP output (keys ``("mlp", l)``) gradient leaves, optionally
    replacing their values (for bias-only and perturbation runs)."""

    def __init__(self, n_layers: int, replace: dict[Any, Tensor] | None = None, mlp: bool = False) -> None:
        self.values: dict[Any, Tensor] = {}
        self.replace = replace or {}
        self.n_layers, self.mlp = n_layers, mlp

    def hook(self, key: Any):
        def fn(t: Tensor, hook: Any) -> Tensor:
            leaf = (self.replace[key].expand_as(t) if key in self.replace else t).detach().clone().requires_grad_()
            self.values[key] = leaf
            return leaf

        return fn

    def hooks(self) -> list[tuple[str, Any]]:
        """The input leaf and, in MLP-leaf mode, the MLP leaves (SAE-site leaves are set by the
        attributor's site hooks, which read the target pre-activations first)."""
        out = [("blocks.0.hook_resid_pre", self.hook(-1))]
        if self.mlp:
            out += [(f"blocks.{layer}.hook_mlp_out", self.hook(("mlp", layer))) for layer in range(self.n_layers)]
        return out


class Attributor:
    """Computes attribution graphs for one ``ReplacementModelBase`` (see the module docstring).

    ``mlp_leaves=True`` is the second mode: each block's MLP output is an input-less leaf node per
    position (kind ``mlp``), so nothing inside the MLP is linearised (its gate is not frozen) and the
    graph shows how much of a circuit runs through MLPs rather than through attention.
    """

    def __init__(self, rrm: ReplacementModelBase, batch_size: int = 32, mlp_leaves: bool = False) -> None:
        self.rrm, self.model, self.batch_size, self.mlp = rrm, rrm.model, batch_size, mlp_leaves
        readout = self.model.adapter.nonlinear_readout()
        if readout is not None:
            raise ValueError(
                f"Attribution needs a readout that is affine once norms are frozen; {readout} is not "
                "(attention-pool heads and tanh poolers are not linearised yet). Trace a model whose "
                "head reads the CLS token or the mean of patches, or targets on the last residual."
            )
        for part, flag in (("mlp_norm", "scale_mlp_norm"), ("attn_out_norm", "scale_attn_norm")):
            if any(getattr(block.parts, part) is not None for block in self.model.blocks):
                raise ValueError(
                    f"A norm inside the block ({part}: timm {flag}) is not frozen by this linearisation, so edges "
                    "would not be exact; attribution does not support it yet."
                )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
        for sae in rrm.saes:
            affine.check_linearisable(sae, "attribute()")
        if mlp_leaves and rrm.layers != list(range(self.model.cfg.n_layers)):
            raise ValueError(
                f"mlp_leaves=True needs an SAE on every block (0..{self.model.cfg.n_layers - 1}); the SAE layers "
                f"are {rrm.layers}. Use mlp_leaves=False for a subset of layers."
            )

    def _forward(self, pixels: Tensor, frozen: dict[str, Tensor], leaves: _Leaves, norms: list[affine.FrozenNorm],
                 resid_mid: dict[int, Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:  # fmt: skip
        """Frozen forward of the linearised replacement model: at each SAE site the target
        pre-activations ``h`` are read from the incoming residual (normalisation frozen at ``norms``,
        ``saes/affine.py``), then the residual becomes a leaf (its clean value, which with the error
        term kept is what the spliced SAE outputs). Returns the output and each layer's ``h`` (and
        stores each block's ``resid_mid`` in ``resid_mid`` if given)."""
        pre_acts: dict[int, Tensor] = {}
        hooks = pre_capture_hooks(self.model) + frozen_hooks(self.model, frozen) + leaves.hooks()
        blocks = self.rrm.layers
        if resid_mid is not None:
            hooks += [
                (f"blocks.{b}.hook_resid_mid", lambda t, hook, i=i: resid_mid.__setitem__(i, t))
                for i, b in enumerate(blocks)
            ]

        def site(t: Tensor, hook: Any, i: int) -> Tensor:
            pre_acts[i] = affine.pre_acts(self.rrm.saes[i], t, norms[i])
            return leaves.hook(i)(t, hook)

        hooks += [(resid_post(b), lambda t, hook, i=i: site(t, hook, i)) for i, b in enumerate(blocks)]
        with self.model.hooks(fwd_hooks=hooks):
            out = self.model(pixels)
        return out, [pre_acts[i] for i in range(len(blocks))]

    def attribute(
        self,
        pixels: Float[Tensor, "batch chan h w"],
        targets: Tensor | int | None = None,
        target_names: list[str] | None = None,
        max_feature_nodes: int | None = None,
        progress: bool = False,
    ) -> AttributionGraph:
        """The graph for one image ``[1, chan, h, w]``.

        ``targets``: output directions ``[n_targets, d_out]``, a class id, or ``None`` for the predicted
        class (its logit demeaned over classes). ``max_feature_nodes``: budget of feature rows; ``None``
        computes every active feature's row. With a budget, target rows come first, then features in
        order of their influence on the targets through the rows computed so far, ``batch_size`` at a
        time (circuit-tracer's exploration); unexplored features stay as source-only nodes.
        ``progress``: a tqdm bar over the rows.
        """
        if pixels.shape[0] != 1:
            raise ValueError(f"attribute() traces one image; got a batch of {pixels.shape[0]}.")
        if max_feature_nodes is not None and max_feature_nodes < 0:
            raise ValueError(f"max_feature_nodes must be >= 0 or None; got {max_feature_nodes}.")
        model, rrm = self.model, self.rrm
        L = rrm.n_layers
        frozen, norms = rrm.frozen_state(pixels)
        with torch.no_grad():  # with every error term kept the output is the original model's
            clean_out, cache = model.run_with_cache_with_saes(
                pixels, saes=rrm.saes, use_error_term=True, return_cache_object=False,
                names_filter=lambda n: n.endswith(("hook_sae_acts_post", "hook_sae_error", "hook_mlp_out"))
                or n == "blocks.0.hook_resid_pre",
            )  # fmt: skip
        hooks = [sae.cfg.metadata.hook_name for sae in rrm.saes]
        acts = [cache[sae_acts(h)][0] for h in hooks]
        errors = [cache[sae_error(h)][0] for h in hooks]
        mlp_out = [cache[f"blocks.{b}.hook_mlp_out"][0] for b in range(model.cfg.n_layers)] if self.mlp else []
        x_in = cache["blocks.0.hook_resid_pre"][0]
        n_pos = x_in.shape[0]
        target_classes: list[int] = []
        if targets is None or isinstance(targets, int):
            c = int(clean_out[0].argmax()) if targets is None else int(targets)
            targets = -torch.full((1, clean_out.shape[-1]), 1.0 / clean_out.shape[-1])
            targets[0, c] += 1.0
            names = model.cfg.class_names
            target_names = target_names or [names[c] if c < len(names) else f"class {c}"]
            target_classes = [c]
        targets = targets.to(clean_out.dtype).reshape(-1, clean_out.shape[-1])

        # ---- nodes: inputs; per layer [mlp leaves], features, errors; targets
        kinds, layers, poss, feats = ["input"] * n_pos, [-1] * n_pos, list(range(n_pos)), [-1] * n_pos
        vals = x_in.norm(dim=-1).tolist()

        def add(kind: str, layer: int, pos: list[int], feat: list[int], value: list[float]) -> Tensor:
            first = len(kinds)
            kinds.extend([kind] * len(pos)), layers.extend([layer] * len(pos))
            poss.extend(pos), feats.extend(feat), vals.extend(value)
            return torch.arange(first, len(kinds))

        src_pos, src_feat, src_nodes, mlp_nodes, feat_nodes = {}, {}, {}, {}, {}
        for layer in range(L):
            block = rrm.layers[layer]  # ``layer`` counts SAE layers; nodes carry the block number
            if self.mlp:
                mlp_nodes[layer] = add(
                    "mlp", block, list(range(n_pos)), [-1] * n_pos, mlp_out[block].norm(dim=-1).tolist()
                )
            nz = acts[layer].nonzero()  # sorted by position, then feature
            src_pos[layer], src_feat[layer] = nz[:, 0], nz[:, 1]
            feat_nodes[layer] = add("feature", block, nz[:, 0].tolist(), nz[:, 1].tolist(),
                                    acts[layer][nz[:, 0], nz[:, 1]].tolist())  # fmt: skip
            err = add("error", block, list(range(n_pos)), [-1] * n_pos, errors[layer].norm(dim=-1).tolist())
            src_nodes[layer] = torch.cat([feat_nodes[layer], err])
        clean_t = (clean_out[0] @ targets.T).tolist()
        target_nodes = add("target", model.cfg.n_layers, [-1] * len(targets), [-1] * len(targets), clean_t)
        n = len(kinds)

        # ---- constants: bias-only frozen forward (every source residual replaced by its bias)
        bias_only: dict[Any, Tensor] = {-1: torch.zeros_like(x_in)}
        bias_only |= {layer: affine.decoder_bias(rrm.saes[layer], norms[layer]).detach() for layer in range(L)}
        bias_only |= {("mlp", layer): torch.zeros_like(x_in) for layer in range(L)} if self.mlp else {}
        with torch.no_grad():
            out_b, pre_b = self._forward(pixels, frozen, _Leaves(L, bias_only, mlp=self.mlp), norms)
        value = torch.full((n,), float("nan"), dtype=torch.float64)
        constant = torch.full((n,), float("nan"), dtype=torch.float64)

        # ---- one frozen forward; rows are batched vector-Jacobian products against it
        leaves = _Leaves(L, mlp=self.mlp)
        mids: dict[int, Tensor] = {}
        out, pre = self._forward(pixels, frozen, leaves, norms, mids)
        seeds = [pre[layer][0, src_pos[layer], src_feat[layer]] for layer in range(L)] + [out[0] @ targets.T]
        seeds_b = [pre_b[layer][0, src_pos[layer], src_feat[layer]] for layer in range(L)] + [out_b[0] @ targets.T]
        node_ids = [feat_nodes[layer] for layer in range(L)] + [target_nodes]
        gaps = [b for a, b in zip([-1, *rrm.layers], rrm.layers, strict=False) if b != a + 1]
        if gaps and not self.mlp:
            logger.info(
                "attribute(): SAE layers %s follow blocks without an SAE; their rows use plain VJPs (slower).", gaps
            )
        padded_decoders = [
            _padded_decoder(
                affine.decoder_directions(sae, src_feat[layer], norms[layer].select(src_pos[layer])).detach(),
                src_pos[layer],
                n_pos,
            )
            for layer, sae in enumerate(rrm.saes)
        ]
        rows_t: list[Tensor] = []
        rows_src: list[Tensor] = []
        rows_w: list[Tensor] = []

        def compute_rows(layer: int, idx: Tensor) -> None:
            """Rows of the targets ``idx`` (indices into ``seeds[layer]``) of one layer, one VJP batch."""
            inputs = [leaves.values[layer - 1]] + ([leaves.values[("mlp", layer)]] if self.mlp and layer < L else [])
            if layer < L and not self.mlp and rrm.layers[layer] == (rrm.layers[layer - 1] + 1 if layer else 0):
                # the block reads the previous leaf directly: closed-form rows on the target's token (rows.py)
                pos, feat = src_pos[layer][idx], src_feat[layer][idx]
                weight = torch.zeros(len(idx), n_pos, dtype=mids[layer].dtype)
                weight[torch.arange(len(idx)), pos] = 1.0
                rows = target_rows(
                    model, rrm.layers[layer], frozen, mids[layer], rrm.saes[layer], norms[layer], feat, weight
                )
                grads = (rows[:, None],)
            else:
                onehot = torch.zeros(len(idx), len(seeds[layer]), dtype=seeds[layer].dtype)
                onehot[torch.arange(len(idx)), idx] = 1.0
                grads = torch.autograd.grad(seeds[layer], inputs, grad_outputs=onehot, is_grads_batched=True,
                                            retain_graph=True, allow_unused=True)  # fmt: skip
            g = grads[0][:, 0].detach()  # [rows, pos, d_model]
            if layer == 0:
                src, w = torch.arange(n_pos), (g * x_in).sum(-1)
            else:
                sp, sf = src_pos[layer - 1], src_feat[layer - 1]
                dec, slot = padded_decoders[layer - 1]  # [pos, k_max, d_model], slot of each source
                proj = torch.einsum("rpd,pkd->rpk", g, dec)  # only the active features' directions
                feature_w = proj[:, sp, slot] * acts[layer - 1][sp, sf]
                src = src_nodes[layer - 1]
                w = torch.cat([feature_w, (g * errors[layer - 1]).sum(-1)], dim=1)
            if len(inputs) == 2:
                gm = torch.zeros_like(g) if grads[1] is None else grads[1][:, 0].detach()
                src, w = torch.cat([src, mlp_nodes[layer]]), torch.cat([w, (gm * mlp_out[layer]).sum(-1)], dim=1)
            nodes = node_ids[layer][idx]
            value[nodes] = seeds[layer][idx].detach().double()
            constant[nodes] = seeds_b[layer][idx].double()
            rows_t.append(nodes.repeat_interleave(len(src)))
            rows_src.append(src.repeat(len(idx)))
            rows_w.append(w.reshape(-1))

        def run(jobs: list[tuple[int, int]]) -> None:
            """Compute rows for ``(layer, index)`` jobs, grouped by layer, ``batch_size`` per VJP."""
            for layer in sorted({j[0] for j in jobs}, reverse=True):
                idx = torch.tensor([j[1] for j in jobs if j[0] == layer], dtype=torch.long)
                for start in range(0, len(idx), self.batch_size):
                    compute_rows(layer, idx[start : start + self.batch_size])
                    bar.update(len(idx[start : start + self.batch_size]))

        def adjacency() -> Tensor:
            indices = torch.stack([torch.cat(rows_t), torch.cat(rows_src)])
            return torch.sparse_coo_tensor(indices, torch.cat(rows_w), (n, n), check_invariants=False).coalesce()

        from .graph_ops import influence, normalised_abs, target_weights

        weights = target_weights(kinds, target_classes, clean_out[0] if target_classes else None)
        from tqdm.auto import tqdm

        n_rows = len(targets) + sum(len(seeds[layer]) for layer in range(L))
        if max_feature_nodes is not None:
            n_rows = min(n_rows, len(targets) + max_feature_nodes)
        bar = tqdm(total=n_rows, desc="attribute", unit="row", disable=not progress)
        run([(L, i) for i in range(len(targets))])
        feature_jobs = [(layer, i) for layer in range(L) for i in range(len(seeds[layer]))]
        if max_feature_nodes is None:
            run(feature_jobs)
        else:
            node_of = {int(node_ids[layer][i]): (layer, i) for layer, i in feature_jobs}
            open_ = torch.zeros(n, dtype=torch.bool)  # feature nodes without a row yet
            open_[torch.cat(node_ids[:L])] = True
            n_done = 0
            while n_done < min(max_feature_nodes, len(feature_jobs)):
                infl = influence(normalised_abs(adjacency()), weights)
                score = infl.masked_fill(~open_ | ~(infl > 0), float("-inf"))
                k = min(self.batch_size, max_feature_nodes - n_done, int(torch.isfinite(score).sum()))
                if k == 0:
                    break
                order = score.topk(k).indices.tolist()
                open_[order] = False
                n_done += len(order)
                run([node_of[i] for i in order])
        bar.close()
        graph = AttributionGraph(
            node_kind=kinds,
            node_layer=torch.tensor(layers),
            node_pos=torch.tensor(poss),
            node_feature=torch.tensor(feats),
            activation=torch.tensor(vals, dtype=torch.float64),
            adjacency=adjacency(),
            value=value,
            constant=constant,
            target_names=list(target_names or [f"target {i}" for i in range(len(targets))]),
            target_classes=target_classes,
            n_prefix=model.cfg.n_prefix_tokens,
            has_cls=model.cfg.has_cls_token,
            grid=model.cfg.grid_size,
            weights=weights,
            target_probs=target_probs(target_classes, len(targets), clean_out),
        )
        return graph


def target_probs(target_classes: list[int], n_targets: int, logits: Tensor) -> Tensor:
    """The model's probability of each target's class (NaN where targets are not classes)."""
    out = torch.full((n_targets,), float("nan"), dtype=torch.float64)
    if len(target_classes) == n_targets:
        out[:] = torch.softmax(logits[0].double(), -1)[torch.tensor(target_classes, dtype=torch.long)]
    return out


def _padded_decoder(rows: Tensor, pos: Tensor, n_pos: int) -> tuple[Tensor, Tensor]:
    """Effective decoder rows of the active features (``rows [n_active, d_model]``) grouped by
    position, ``[n_pos, k_max, d_model]`` (zero padded), and each active feature's slot in its
    position's group (``pos`` is sorted)."""
    counts = torch.bincount(pos, minlength=n_pos)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(pos)) - starts[pos]
    k_max = int(counts.max()) if len(pos) else 0
    dec = torch.zeros(n_pos, max(k_max, 1), rows.shape[1], dtype=rows.dtype)
    dec[pos, slot] = rows
    return dec, slot


def record_with_saes(rrm: ReplacementModelBase, pixels: Tensor) -> dict[str, Tensor]:
    """Frozen model values (patterns, scales, gates) from the clean forward with every SAE spliced and
    its error term kept (so equal to the clean model's)."""
    return rrm.frozen_state(pixels)[0]


def frozen_state(rrm: ReplacementModelBase, pixels: Tensor) -> tuple[dict[str, Tensor], list[affine.FrozenNorm]]:
    """``rrm.frozen_state(pixels)``: what the linearisation holds fixed for one image."""
    return rrm.frozen_state(pixels)
