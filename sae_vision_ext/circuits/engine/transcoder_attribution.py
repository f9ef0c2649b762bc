"""Attribution graphs over the transcoder replacement model (circuit-tracer's graphs, on ViTs), exact
under a stated linearisation.

What is frozen on the traced image (from its clean forward, every error kept): attention patterns and
every norm scale (``ln_pre``, ``ln1``, ``ln2``, ``ln_final``, norms inside attention), as circuit-tracer
does; each block's MLP is *replaced*: by its transcoder output (features held as sources, the skip
connection live and linear) plus its error vector, or, in a block without a transcoder output, by its
whole MLP output, held as that block's error nodes (nothing inside an MLP is linearised, no MLP gate is
frozen). The target pre-activation ``h`` is then affine in the sources.

Nodes, in this order (the adjacency's row and column order; ``node_layer`` is the block):

1. embeddings, one per position: the residual entering block 0 (``blocks.0.hook_resid_pre``);
2. per block ``j = 0..n_layers-1``: the active features of its transcoder (a CLT: the features encoded at
   block ``j``) sorted by position then feature, then one MLP error node per position
   (``e_j[p] = mlp_out_j[p] − transcoder output``);
3. targets (``node_layer = n_layers``): output directions (a class logit demeaned over classes by default).

Edges ``A[target, source]`` run from every earlier node: a feature of block ``l`` receives from every
feature and error of blocks ``< l`` and the embeddings (layer-skipping edges through the residual stream
and frozen attention), a target from every node. With the decoder rows ``W_dec[s→j]`` (a per-layer
transcoder: ``j = s``'s block only; a CLT: every ``j`` from its block on)

    edge(feature s → t) = a_s Σ_j <∂h_t/∂mlp_out_j[p_s], W_dec[s→j]>,   edge(error, embedding → t) = <∂h_t/∂v, v>,

and ``constant[t]`` is ``h_t`` of a separate frozen forward in which the embeddings are zero and every
replaced MLP output is its decoder bias ``b_dec`` (other MLP outputs zero), so
``Σ_s A[t, s] + constant[t] = h_t`` is a check (``tests/unit/test_transcoder_replacement.py``). Feature rows
are computed in closed form (``engine/transcoder_rows.py``), targets' (and every row with
``engine="autograd"``) by batched VJPs of the frozen forward; both project on the same sources.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from ..graph.graph import AttributionGraph
from ..graph.nodes import NodeTable
from ..graph.ops import cache_influence, check_target, resolve_targets, target_probs, target_weights
from ..replacement.linearise import frozen_hooks
from .attribution import explore
from .row_store import RowStore
from .transcoder_rows import TranscoderRows, TranscoderSources, transcoder_row_macs

if TYPE_CHECKING:
    from ..replacement.transcoder import TranscoderRecord, TranscoderReplacementBase

logger = logging.getLogger(__name__)


@dataclass
class _Nodes:
    table: NodeTable
    start: dict[int, int]
    """First node id of each block (and ``n_layers``: the first target)."""
    pos: dict[int, Tensor]
    feat: dict[int, Tensor]
    features: dict[int, Tensor]
    errors: dict[int, Tensor]
    targets: Tensor


class TranscoderAttributor:
    """Computes attribution graphs of a ``TranscoderReplacementBase`` (module docstring). ``engine``:
    ``"closed"`` (closed-form feature rows) or ``"autograd"`` (batched VJPs everywhere, the reference).
    ``update_interval``: with a node budget, influence is recomputed every this many batches."""

    def __init__(
        self,
        rrm: TranscoderReplacementBase,
        batch_size: int = 32,
        engine: Literal["closed", "autograd"] = "closed",
        update_interval: int = 4,
    ) -> None:
        if engine not in ("closed", "autograd"):
            raise ValueError(f"engine must be 'closed' or 'autograd'; got {engine!r}.")
        if batch_size < 1 or update_interval < 1:
            raise ValueError(f"batch_size and update_interval must be >= 1; got {batch_size}, {update_interval}.")
        readout = rrm.model.adapter.nonlinear_readout()
        if readout is not None:
            raise ValueError(
                f"Attribution needs a readout that is affine once norms are frozen; {readout} is not. Trace a model "
                "whose head reads the CLS token or the mean of patches."
            )
        self.rrm, self.model, self.tcs = rrm, rrm.model, rrm.transcoders
        self.batch_size, self.engine, self.update_interval = batch_size, engine, update_interval

    def forward(
        self, pixels: Tensor, rec: TranscoderRecord, replace: dict[int, Tensor] | None = None
    ) -> tuple[Tensor, dict[int, Tensor], dict[int, Tensor]]:
        """The frozen forward (module docstring) with the embeddings (key ``-1``) and each block's MLP
        output minus its live skip term (keys ``j``) as gradient leaves, valued as on the traced image
        or as ``replace``. Returns the output, each encoder block's pre-activations ``h`` and the leaves."""
        tcs, model = self.tcs, self.model
        leaves: dict[int, Tensor] = {}
        pre: dict[int, Tensor] = {}
        inputs: dict[int, Tensor] = {}

        def leaf(t: Tensor, key: int, value: Tensor) -> Tensor:
            v = replace[key] if replace is not None and key in replace else value
            leaves[key] = v.expand_as(t).detach().clone().requires_grad_()
            return leaves[key]

        def read(t: Tensor, hook: Any, layer: int) -> Tensor:
            inputs[layer], pre[layer] = t, tcs.pre_acts(layer, t)
            return t

        def mlp(t: Tensor, hook: Any, j: int) -> Tensor:
            skip = tcs.skip_matrix(j) if j in tcs.out_layers else None
            clean = rec.mlp_out[j] if skip is None else rec.mlp_out[j] - rec.inputs[j] @ skip.detach()
            out = leaf(t, j, clean.detach())
            return out if skip is None else out + (inputs[j] @ skip).to(t.dtype)

        frozen = {k: v for k, v in rec.frozen.items() if not k.endswith("mlp.gate")}  # MLPs are replaced
        hooks = frozen_hooks(model, frozen)
        hooks.append(("blocks.0.hook_resid_pre", lambda t, hook: leaf(t, -1, rec.x_in.detach())))
        hooks += [(tcs.hook_in(layer), lambda t, hook, layer=layer: read(t, hook, layer)) for layer in tcs.layers]
        hooks += [(f"blocks.{j}.hook_mlp_out", lambda t, hook, j=j: mlp(t, hook, j)) for j in range(model.cfg.n_layers)]
        with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
            out = model(pixels)
        return out, {layer: p[0] for layer, p in pre.items()}, leaves

    def attribute(
        self,
        pixels: Float[Tensor, "batch chan h w"],
        target: Tensor | int | None = None,
        target_names: list[str] | None = None,
        max_feature_nodes: int | None = None,
        progress: bool = False,
    ) -> AttributionGraph:
        """The graph of one image ``[1, chan, h, w]``; ``target`` and ``max_feature_nodes`` as in
        ``Attributor.attribute`` (a budget explores features in order of influence, circuit-tracer's way)."""
        targets = check_target(target)
        if pixels.shape[0] != 1:
            raise ValueError(f"attribute() traces one image; got a batch of {pixels.shape[0]}.")
        if max_feature_nodes is not None and max_feature_nodes < 0:
            raise ValueError(f"max_feature_nodes must be >= 0 or None; got {max_feature_nodes}.")
        rec = self.rrm.record(pixels)
        grid = tuple(self.model.grid_sizes[0])  # the traced image's own (rows, cols): any size, NaFlex
        self._check_active(rec)
        targets, target_names, target_classes = resolve_targets(
            self.model.cfg.class_names, rec.clean_out, targets, target_names
        )
        nodes = self._nodes(rec, targets)
        sources = self._sources(rec, nodes)
        rows = TranscoderRows(self.model, self.tcs, rec.frozen, sources)
        bias = {-1: torch.zeros_like(rec.x_in)}
        bias |= {j: self.tcs.b_dec(j).detach().expand_as(rec.x_in) for j in self.tcs.out_layers}
        bias |= {j: torch.zeros_like(rec.x_in) for j in range(self.model.cfg.n_layers) if j not in bias}
        with torch.no_grad():
            out_b, pre_b, _ = self.forward(pixels, rec, bias)
        out, pre, leaves = self.forward(pixels, rec)
        layers = [layer for layer in self.tcs.layers if len(nodes.pos[layer])]
        seeds = [pre[layer][nodes.pos[layer], nodes.feat[layer]] for layer in layers] + [out[0] @ targets.T]
        seeds_b = [pre_b[layer][nodes.pos[layer], nodes.feat[layer]] for layer in layers] + [out_b[0] @ targets.T]
        node_ids = [nodes.features[layer] for layer in layers] + [nodes.targets]
        n_blocks, table = self.model.cfg.n_layers, nodes.table
        n = len(table.kinds)
        weights = target_weights(table.kinds, target_classes, rec.clean_out[0] if target_classes else None)
        store = RowStore(n, weights)
        value = torch.full((n,), float("nan"), dtype=torch.float64)
        constant = torch.full((n,), float("nan"), dtype=torch.float64)
        n_feature_rows = sum(len(s) for s in seeds[:-1])
        budget = n_feature_rows if max_feature_nodes is None else min(n_feature_rows, max_feature_nodes)
        self._log_estimate(layers, nodes, len(targets) + budget, progress)
        bar = tqdm(total=len(targets) + budget, desc="attribute", unit="row", disable=not progress)

        def run(level: int, idx: Tensor) -> None:
            block = layers[level] if level < len(layers) else n_blocks
            n_src = nodes.start[block]
            for start in range(0, len(idx), self.batch_size):
                part = idx[start : start + self.batch_size]
                if block < n_blocks and self.engine == "closed":
                    w = rows.feature_rows(block, nodes.pos[block][part], nodes.feat[block][part], n_src)
                else:
                    w = self._vjp_rows(rows, seeds[level], part, leaves, n_src)
                ids = node_ids[level][part]
                value[ids] = seeds[level][part].detach().double().cpu()
                constant[ids] = seeds_b[level][part].double().cpu()
                store.add(block, ids, torch.arange(n_src), w.detach())
                bar.update(len(part))

        run(len(layers), torch.arange(len(targets)))
        if budget == n_feature_rows:
            for level in range(len(layers) - 1, -1, -1):
                run(level, torch.arange(len(seeds[level])))
        else:
            explore(run, store, node_ids[:-1], n, budget, chunk=self.batch_size * self.update_interval)
        bar.close()
        graph = AttributionGraph(
            node_kind=table.kinds,
            node_layer=torch.tensor(table.layers),
            node_pos=torch.tensor(table.positions),
            node_feature=torch.tensor(table.features),
            activation=torch.tensor(table.values, dtype=torch.float64),
            adjacency=store.adjacency().cpu(),
            value=value,
            constant=constant,
            target_names=target_names,
            target_classes=target_classes,
            n_prefix=self.model.cfg.n_prefix_tokens,
            has_cls=self.model.cfg.has_cls_token,
            grid=grid,
            weights=weights,
            target_probs=target_probs(target_classes, len(targets), rec.clean_out),
            transcoder_list=self.tcs.hook_names(),
        )
        cache_influence(graph, store.influence().cpu())
        return graph

    def _vjp_rows(
        self, rows: TranscoderRows, seeds: Tensor, part: Tensor, leaves: dict[int, Tensor], n_src: int
    ) -> Tensor:
        keys = sorted(leaves)
        onehot = torch.zeros(len(part), len(seeds), dtype=seeds.dtype, device=seeds.device)
        onehot[torch.arange(len(part)), part] = 1.0
        grads = torch.autograd.grad(
            seeds,
            [leaves[k] for k in keys],
            grad_outputs=onehot,
            is_grads_batched=True,
            retain_graph=True,
            allow_unused=True,
        )
        by_key = {k: None if g is None else g[:, 0].detach() for k, g in zip(keys, grads, strict=True)}
        g_in = by_key.pop(-1)
        return rows.project_grads(by_key, g_in, n_src)

    def _check_active(self, rec: TranscoderRecord) -> None:
        """Active features must equal their pre-activation (ReLU, JumpReLU, TopK); else ``ValueError``."""
        for layer in self.tcs.layers:
            a, h = rec.acts[layer], rec.pre[layer]
            on = a != 0
            if on.any() and not torch.allclose(a[on], h[on].to(a.dtype), rtol=1e-5, atol=1e-6):
                raise ValueError(
                    f"The transcoder of block {layer}: active features differ from their pre-activation x @ W_enc + "
                    "b_enc (an activation other than ReLU, JumpReLU or TopK?); such features are not linearised."
                )

    def _nodes(self, rec: TranscoderRecord, targets: Tensor) -> _Nodes:
        n_pos = rec.x_in.shape[0]
        every = list(range(n_pos))
        table = NodeTable()
        table.add("input", -1, every, [-1] * n_pos, rec.x_in.norm(dim=-1).tolist())
        nodes = _Nodes(table, {}, {}, {}, {}, {}, torch.zeros(0, dtype=torch.long))
        for j in range(self.model.cfg.n_layers):
            nodes.start[j] = len(table.kinds)
            if j in self.tcs.layers:
                nz = rec.acts[j].nonzero()  # sorted by position, then feature
                nodes.pos[j], nodes.feat[j] = nz[:, 0], nz[:, 1]
                vals = rec.acts[j][nz[:, 0], nz[:, 1]].tolist()
                nodes.features[j] = table.add("feature", j, nz[:, 0].tolist(), nz[:, 1].tolist(), vals)
            nodes.errors[j] = table.add("error", j, every, [-1] * n_pos, rec.errors[j].norm(dim=-1).tolist())
        nodes.start[self.model.cfg.n_layers] = len(table.kinds)
        clean_t = (rec.clean_out[0] @ targets.T).tolist()
        nodes.targets = table.add("target", self.model.cfg.n_layers, [-1] * len(targets), [-1] * len(targets), clean_t)
        return nodes

    def _sources(self, rec: TranscoderRecord, nodes: _Nodes) -> TranscoderSources:
        tcs, dev = self.tcs, rec.x_in.device
        sources = TranscoderSources()
        sources.set_inputs(rec.x_in.detach(), torch.arange(rec.x_in.shape[0], device=dev))
        for j in range(self.model.cfg.n_layers):
            feats = []
            for i in tcs.sources_of(j) if j in tcs.out_layers else []:
                pos, feat = nodes.pos[i], nodes.feat[i]
                rows = tcs.decoder_rows(i, j, feat).detach()
                feats.append((pos, rows, rec.acts[i][pos, feat].detach(), nodes.features[i].to(dev)))
            sources.add_block(j, feats, rec.errors[j].detach(), nodes.errors[j].to(dev))
        return sources

    def _log_estimate(self, layers: list[int], nodes: _Nodes, n_rows: int, progress: bool) -> None:
        """Say what the rows cost before they start (an upper bound: every row through the deepest block)."""
        cfg = self.model.cfg
        k = 1 + max((len(nodes.pos[layer]) // max(cfg.n_ctx, 1) for layer in layers), default=0)
        macs = n_rows * transcoder_row_macs(cfg.n_ctx, cfg.d_model, max(layers, default=0) + 1, k)
        msg = f"attribute(): {n_rows} rows, at most {2 * macs / 1e9:.1f} GFLOP of row arithmetic."
        (tqdm.write if progress else logger.info)(msg)
