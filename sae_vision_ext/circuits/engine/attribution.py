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
and MLP gates frozen at their values on this image (``replacement/linearise.py``) and every SAE's input
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
definition (``tests/unit/test_attribution.py``, ``tests/unit/test_attribution_saes.py``).
Rows come from one frozen forward of the image. For ``batch_size`` feature targets of one layer at
a time whose block reads the previous SAE layer directly, rows are computed in closed form on each
target's token (``engine/rows.py``: the rank-one encoder cotangent, the MLP half on the targets' tokens,
the value path of the attention half). Logit targets, the MLP-leaf mode and blocks between SAE
layers use a plain batched VJP from the target. Source edges project the gradient onto the active
features' decoder rows only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from ..._compat import renamed_kwargs
from ..._hooks import resid_post, sae_acts, sae_error
from ...saes import affine
from ..graph.graph import AttributionGraph
from ..graph.nodes import NodeTable
from ..graph.ops import cache_influence, check_target, resolve_targets, target_probs, target_weights
from ..replacement.base import ReplacementModelBase
from ..replacement.linearise import frozen_hooks, pre_capture_hooks
from .row_engine import RowEngine, estimate
from .row_store import RowStore

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

    ``engine``: ``"staged"`` computes rows in closed form where a block reads the previous SAE layer
    directly (``engine/rows.py``) and by batched VJPs elsewhere; ``"autograd"`` uses VJPs everywhere (the
    reference the closed form is tested against). ``update_interval``: with a node budget, influence is
    recomputed every this many batches of rows (circuit-tracer's ``update_interval``).
    """

    def __init__(
        self,
        rrm: ReplacementModelBase,
        batch_size: int = 32,
        mlp_leaves: bool = False,
        engine: Literal["staged", "autograd"] = "staged",
        update_interval: int = 4,
    ) -> None:
        if update_interval < 1:
            raise ValueError(f"update_interval must be >= 1; got {update_interval}.")
        self.update_interval = update_interval
        if engine not in ("staged", "autograd"):
            raise ValueError(f"engine must be 'staged' or 'autograd'; got {engine!r}.")
        self.rrm, self.model, self.batch_size, self.mlp, self.engine = rrm, rrm.model, batch_size, mlp_leaves, engine
        readout = self.model.adapter.nonlinear_readout()
        if readout is not None:
            raise ValueError(
                f"Attribution needs a readout that is affine once norms are frozen; {readout} is not "
                "(attention-pool heads and tanh poolers are not linearised yet). Trace a model whose "
                "head reads the CLS token or the mean of patches, or targets on the last residual."
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

    def _forward(
        self,
        pixels: Tensor,
        frozen: dict[str, Tensor],
        leaves: _Leaves,
        norms: list[affine.FrozenNorm],
        resid_mid: dict[int, Tensor] | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
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

    @renamed_kwargs(targets="target")
    def attribute(
        self,
        pixels: Float[Tensor, "batch chan h w"],
        target: Tensor | int | None = None,
        target_names: list[str] | None = None,
        max_feature_nodes: int | None = None,
        progress: bool = False,
    ) -> AttributionGraph:
        """The graph for one image ``[1, chan, h, w]``.

        ``target`` (``targets=`` is the old spelling, deprecated): output directions
        ``[n_targets, d_out]``, a class id, or ``None`` for the predicted class (its logit demeaned
        over classes). ``max_feature_nodes``: budget of feature rows; ``None``
        computes every active feature's row. With a budget, target rows come first, then features in
        order of their influence on the targets through the rows computed so far (recomputed every
        ``update_interval`` batches of ``batch_size``: circuit-tracer's exploration); unexplored features
        stay as source-only nodes. Before the rows start, a line states their arithmetic, estimated time
        and memory (printed with ``progress``, else logged at ``INFO``).
        ``progress``: a tqdm bar over the rows.
        Half-precision models (float16, bfloat16) are traced in float32 (model and SAEs cast for the
        call, then cast back, which is lossless): the linearisation's sum rules need float32 sums.
        """
        targets = check_target(target)  # before any work: a float 2.0 or -1 is refused here
        low = {torch.float16, torch.bfloat16}
        if next(self.model.parameters()).dtype not in low:
            return self._attribute(pixels, targets, target_names, max_feature_nodes, progress)
        logger.info("attribute(): the model is %s; tracing in float32.", next(self.model.parameters()).dtype)
        dtypes = [next(m.parameters()).dtype for m in (self.model, *self.rrm.saes)]
        try:
            for m in (self.model, *self.rrm.saes):
                m.to(torch.float32)
            pixels = pixels.float()
            targets = targets.float() if isinstance(targets, Tensor) else targets
            return self._attribute(pixels, targets, target_names, max_feature_nodes, progress)
        finally:
            for m, dtype in zip((self.model, *self.rrm.saes), dtypes, strict=True):
                m.to(dtype)

    def _attribute(
        self,
        pixels: Tensor,
        targets: Tensor | int | None,
        target_names: list[str] | None,
        max_feature_nodes: int | None,
        progress: bool,
    ) -> AttributionGraph:
        if pixels.shape[0] != 1:
            raise ValueError(f"attribute() traces one image; got a batch of {pixels.shape[0]}.")
        if max_feature_nodes is not None and max_feature_nodes < 0:
            raise ValueError(f"max_feature_nodes must be >= 0 or None; got {max_feature_nodes}.")
        rec = self._record(pixels)
        grid = tuple(self.model.grid_sizes[0])  # the traced image's own (rows, cols): any size, NaFlex
        targets, target_names, target_classes = resolve_targets(
            self.model.cfg.class_names, rec.clean_out, targets, target_names
        )
        nodes, src = self._nodes(rec, targets)
        seeds, seeds_b, leaves, mids = self._seeds(pixels, rec, targets, src)
        engine = RowEngine(self, rec.frozen, rec.norms, mids, leaves, seeds=seeds)
        engine.set_sources(
            rec.x_in,
            src.pos,
            src.feat,
            rec.acts,
            rec.errors,
            src_nodes=src.nodes,
            mlp_nodes=src.mlp,
            mlp_out=rec.mlp_out,
        )
        dev, n = rec.x_in.device, len(nodes)
        weights = target_weights(nodes.kinds, target_classes, rec.clean_out[0] if target_classes else None)
        store = RowStore(n, weights.to(dev))
        value = torch.full((n,), float("nan"), dtype=torch.float64, device=dev)
        constant = torch.full((n,), float("nan"), dtype=torch.float64, device=dev)
        node_ids = [src.features[layer].to(dev) for layer in range(len(src.features))] + [src.targets.to(dev)]
        n_feature_rows = sum(len(s) for s in seeds[:-1])
        budget = n_feature_rows if max_feature_nodes is None else min(n_feature_rows, max_feature_nodes)
        n_rows = len(targets) + budget
        message = estimate(self.model, n_rows, n_nodes=n, n_src=max(len(s) for s in src.nodes.values()), device=dev)
        (tqdm.write if progress else logger.info)(message)
        bar = tqdm(total=n_rows, desc="attribute", unit="row", disable=not progress)

        def run(layer: int, idx: Tensor) -> None:
            """Rows of ``seeds[layer][idx]`` (one SAE layer, or the targets), ``batch_size`` per batch."""
            for start in range(0, len(idx), self.batch_size):
                part = idx[start : start + self.batch_size]
                w, sources = engine.rows(layer, part)
                ids = node_ids[layer][part]
                value[ids] = seeds[layer][part].detach().double()
                constant[ids] = seeds_b[layer][part].double()
                store.add(layer, ids, sources, w)
                bar.update(len(part))

        run(len(seeds) - 1, torch.arange(len(targets), device=dev))
        if budget == n_feature_rows:  # every row: layer by layer, no ranking needed
            for layer in range(len(seeds) - 2, -1, -1):
                run(layer, torch.arange(len(seeds[layer]), device=dev))
        else:
            self._explore(run, store, node_ids[:-1], n, budget)
        bar.close()
        graph = AttributionGraph(
            node_kind=nodes.kinds,
            node_layer=torch.tensor(nodes.layers),
            node_pos=torch.tensor(nodes.positions),
            node_feature=torch.tensor(nodes.features),
            activation=torch.tensor(nodes.values, dtype=torch.float64),
            adjacency=store.adjacency().cpu(),
            value=value.cpu(),
            constant=constant.cpu(),
            target_names=target_names,
            target_classes=target_classes,
            n_prefix=self.model.cfg.n_prefix_tokens,
            has_cls=self.model.cfg.has_cls_token,
            grid=grid,
            weights=weights,
            target_probs=target_probs(target_classes, len(targets), rec.clean_out),
        )
        cache_influence(graph, store.influence().cpu())  # the same w(Â + Â² + …), from the row blocks
        return graph

    def _record(self, pixels: Tensor) -> _Recorded:
        """One clean forward with every SAE spliced and its error term kept (so the output is the
        original model's): the frozen state, the SAE input statistics and the node values."""
        model, hooks = self.model, [sae.cfg.metadata.hook_name for sae in self.rrm.saes]
        mlp_names = [f"blocks.{b}.hook_mlp_out" for b in range(model.cfg.n_layers)] if self.mlp else []
        names = [sae_acts(h) for h in hooks] + [sae_error(h) for h in hooks] + ["blocks.0.hook_resid_pre", *mlp_names]
        frozen, norms, clean_out, cache = self.rrm.recorded_forward(pixels, names)
        return _Recorded(
            frozen=frozen,
            norms=norms,
            clean_out=clean_out,
            acts=[cache[sae_acts(h)][0] for h in hooks],
            errors=[cache[sae_error(h)][0] for h in hooks],
            mlp_out=[cache[name][0] for name in mlp_names],
            x_in=cache["blocks.0.hook_resid_pre"][0],
        )

    def _nodes(self, rec: _Recorded, targets: Tensor) -> tuple[NodeTable, _SourceNodes]:
        """The node table in the module docstring's order, and each SAE layer's source nodes."""
        n_pos = rec.x_in.shape[0]
        every = list(range(n_pos))
        nodes, src = NodeTable(), _SourceNodes({}, {}, {}, {}, {}, torch.zeros(0, dtype=torch.long))
        nodes.add("input", -1, every, [-1] * n_pos, rec.x_in.norm(dim=-1).tolist())
        for layer, block in enumerate(self.rrm.layers):  # ``layer`` counts SAE layers; nodes carry the block
            if self.mlp:
                src.mlp[layer] = nodes.add("mlp", block, every, [-1] * n_pos, rec.mlp_out[block].norm(dim=-1).tolist())
            nz = rec.acts[layer].nonzero()  # sorted by position, then feature
            src.pos[layer], src.feat[layer] = nz[:, 0], nz[:, 1]
            values = rec.acts[layer][nz[:, 0], nz[:, 1]].tolist()
            src.features[layer] = nodes.add("feature", block, nz[:, 0].tolist(), nz[:, 1].tolist(), values)
            err = nodes.add("error", block, every, [-1] * n_pos, rec.errors[layer].norm(dim=-1).tolist())
            src.nodes[layer] = torch.cat([src.features[layer], err])
        clean_t = (rec.clean_out[0] @ targets.T).tolist()
        src.targets = nodes.add("target", self.model.cfg.n_layers, [-1] * len(targets), [-1] * len(targets), clean_t)
        return nodes, src

    def _seeds(
        self, pixels: Tensor, rec: _Recorded, targets: Tensor, src: _SourceNodes
    ) -> tuple[list[Tensor], list[Tensor], _Leaves, dict[int, Tensor]]:
        """Per SAE layer (then the targets) the row seeds: the target pre-activations on the frozen
        forward the rows differentiate, and on the bias-only forward (every source residual replaced
        by its bias: the ``constant`` of each row). Also that forward's leaves and ``resid_mid``."""
        L, x_in = self.rrm.n_layers, rec.x_in
        bias_only: dict[Any, Tensor] = {-1: torch.zeros_like(x_in)}
        bias_only |= {layer: affine.decoder_bias(self.rrm.saes[layer], rec.norms[layer]).detach() for layer in range(L)}
        bias_only |= {("mlp", layer): torch.zeros_like(x_in) for layer in range(L)} if self.mlp else {}
        with torch.no_grad():
            out_b, pre_b = self._forward(pixels, rec.frozen, _Leaves(L, bias_only, mlp=self.mlp), rec.norms)
        leaves, mids = _Leaves(L, mlp=self.mlp), {}
        out, pre = self._forward(pixels, rec.frozen, leaves, rec.norms, mids)
        seeds = [pre[layer][0, src.pos[layer], src.feat[layer]] for layer in range(L)] + [out[0] @ targets.T]
        seeds_b = [pre_b[layer][0, src.pos[layer], src.feat[layer]] for layer in range(L)] + [out_b[0] @ targets.T]
        gaps = [b for a, b in zip([-1, *self.rrm.layers], self.rrm.layers, strict=False) if b != a + 1]
        if gaps and not self.mlp:
            logger.info(
                "attribute(): SAE layers %s follow blocks without an SAE; their rows use plain VJPs (slower).", gaps
            )
        return seeds, seeds_b, leaves, mids

    def _explore(
        self, run: Callable[[int, Tensor], None], store: RowStore, node_ids: list[Tensor], n: int, budget: int
    ) -> None:
        explore(run, store, node_ids, n, budget, chunk=self.batch_size * self.update_interval)


def explore(
    run: Callable[[int, Tensor], None], store: RowStore, node_ids: list[Tensor], n: int, budget: int, *, chunk: int
) -> None:
    """circuit-tracer's exploration: rows of the ``budget`` features of most influence on the targets
    through the rows computed so far, ``chunk`` at a time (``node_ids[level]``: the feature nodes of a
    row level; ``run(level, index into node_ids[level])`` computes rows)."""
    dev = node_ids[0].device
    layer_of = torch.full((n,), -1, dtype=torch.long, device=dev)
    index_of = torch.full((n,), -1, dtype=torch.long, device=dev)
    for layer, ids in enumerate(node_ids):
        layer_of[ids] = layer
        index_of[ids] = torch.arange(len(ids), device=dev)
    open_ = layer_of >= 0  # feature nodes without a row yet
    n_done = 0
    while n_done < budget:
        infl = store.influence()
        score = infl.masked_fill(~open_ | ~(infl > 0), float("-inf"))
        k = min(chunk, budget - n_done, int(torch.isfinite(score).sum()))
        if k == 0:
            break
        order = score.topk(k).indices
        open_[order] = False
        n_done += k
        for layer in layer_of[order].unique().flip(0).tolist():
            run(layer, index_of[order[layer_of[order] == layer]])


class _Recorded(NamedTuple):
    """What the clean forward gives the attributor (``Attributor._record``)."""

    frozen: dict[str, Tensor]
    norms: list[affine.FrozenNorm]
    clean_out: Tensor
    acts: list[Tensor]
    errors: list[Tensor]
    mlp_out: list[Tensor]
    x_in: Tensor


@dataclass
class _SourceNodes:
    """Per SAE layer: active features' positions and ids, their node indices, the layer's source nodes
    (features then errors) and MLP-leaf nodes; and the target nodes."""

    pos: dict[int, Tensor]
    feat: dict[int, Tensor]
    features: dict[int, Tensor]
    nodes: dict[int, Tensor]
    mlp: dict[int, Tensor]
    targets: Tensor
