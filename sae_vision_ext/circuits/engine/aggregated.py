"""The seed paper's token-aggregated attribution graph (Kim et al. 2025; authors' code rubato-yeong/RRM,
``utils/modules/modelgrad.py``), computed exactly under the frozen linearisation.

Nodes per SAE layer ``l`` (the blocks ``rrm.layers``): its ``d_sae`` features ``(l, f)`` summed over
tokens, then one error node (entry ``d_sae``). With ``d_f[p]`` the effective decoder direction at
token ``p`` (``saes/affine.py``), ``m`` the per-position feature reference (median, mean or zero over a
reference set) and ``m_e`` the error reference:

- ``G_l[p]`` is the gradient of the target (a demeaned logit by default) at the residual after SAE
  layer ``l``, and ``g_l[p, f] = <G_l[p], d_f[p]>`` the gradient at each feature activation.
- Node relevance: ``R_l[f] = Σ_p g_l[p, f]·(z_l[p, f] − m_l[p, f])``; error node
  ``R_l[err] = Σ_p <G_l[p], e_l[p] − m_e,l[p]>``.
- Edges between consecutive SAE layers ``l → l'`` use the gradient trick: with
  ``c[p', f'] = g_{l'}[p', f']·1[z_{l'}[p', f'] ≠ 0]`` (the SAE activation's derivative: its active
  set is frozen), ``J_{f'}[p] = Σ_{p'} c[p', f'] ∂h_{l'}[p', f']/∂x_l[p]`` is the gradient-weighted,
  token-summed Jacobian row of target ``f'``, and
  ``edges[l][f', f] = Σ_p <J_{f'}[p], d_f[p]>·(z_l[p, f] − m_l[p, f])``,
  ``edges[l][f', err] = Σ_p <J_{f'}[p], e_l[p] − m_e,l[p]>``. The last SAE layer's edges to the output
  are its relevances.
- ``leaf_errors=True`` (the paper's default): errors are leaves. ``G`` at the last SAE layer is the
  frozen gradient of the target; below, ``G_l = Σ_{f'} J_{f'}`` (only through the next layer's
  features), so relevance is conserved: ``R_l[s] = Σ_{f'} edges[l][f', s]``; the next layer's error
  node receives nothing (its row is zero).
- ``leaf_errors=False``: gradients pass through errors (``G_l`` is the frozen model's total gradient);
  the row of the next layer's error node holds what flows through it, ``R_l − Σ_{f'} edges[l][f', :]``.

Exact under the linearisation (patterns, LayerNorm scales, MLP gates and each SAE's std frozen; the
centring live), in the sense tested: summed over sources, a target's edges equal
``Σ_{p'} c[p', f']·(h_{l'}[p', f'] − h^ref_{l'}[p', f'])`` where ``h^ref`` is the frozen response to
layer ``l``'s residual with every feature and the error at their references; the last layer's
relevances sum to the frozen change of the target. Rows are batched vector-Jacobian products, one row
per feature active somewhere in the next layer (not one per feature of the dictionary, as a
``jacrev`` over all of them does); the position-resolved graph is never built.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from ..._hooks import sae_acts, sae_error
from ...saes import affine
from ..graph.graph import AggregatedGraph
from ..replacement.base import ReplacementModelBase
from .rows import Sources, Workspace, active_tokens, block_rows

if TYPE_CHECKING:
    from .attribution import _Leaves

logger = logging.getLogger(__name__)


def attribute_aggregated(
    rrm: ReplacementModelBase,
    pixels: Float[Tensor, "batch chan h w"],
    reference: list[Tensor] | None = None,
    error_reference: list[Tensor] | None = None,
    target: int | None = None,
    *,
    leaf_errors: bool = True,
    batch_size: int = 64,
    engine: Literal["staged", "autograd"] = "staged",
) -> AggregatedGraph:
    """The paper's graph of one image (module docstring). ``reference``: per SAE layer ``[pos, d_sae]``
    (``rrm.reference_values(ref_pixels, kind="median")``; default zero); ``error_reference``: per layer
    ``[pos, d_model]`` (``rrm.reference_values(..., of="errors")``; default zero). ``target``: class id
    (default: the predicted class), its logit demeaned over classes. ``engine``: ``staged`` rows
    (``circuits/engine/rows.py``) where a block reads the previous SAE layer directly, else plain batched
    VJPs; ``autograd`` uses plain VJPs everywhere (the reference the staged rows are tested against)."""
    from ..graph.ops import check_target
    from ..replacement.linearise import resid_post_gradients
    from .attribution import Attributor, _Leaves

    target = check_target(target)  # TypeError/ValueError for 2.0, "3", True, -1 before any work
    if isinstance(target, Tensor):
        raise TypeError(
            "attribute_aggregated traces one class (its demeaned logit): pass target=<class id> or None; "
            f"got a direction tensor of shape {list(target.shape)} (directions: rrm.attribute)."
        )
    if pixels.shape[0] != 1:
        raise ValueError(f"attribute_aggregated() traces one image; got a batch of {pixels.shape[0]}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    if engine not in ("staged", "autograd"):
        raise ValueError(f"engine must be 'staged' or 'autograd'; got {engine!r}.")
    att = Attributor(rrm, batch_size=batch_size)  # validates the SAEs and the readout
    n = rrm.n_layers
    frozen, norms = rrm.frozen_state(pixels)
    clean, acts, errors = _clean_acts(rrm, pixels)
    reference = _references(reference, acts, "reference")
    error_reference = _references(error_reference, errors, "error_reference")
    d_acts = [a - r.to(a.dtype) for a, r in zip(acts, reference, strict=True)]
    d_errs = [e - r.to(e.dtype) for e, r in zip(errors, error_reference, strict=True)]
    c = int(clean[0].argmax()) if target is None else target
    if c >= clean.shape[-1]:
        raise ValueError(
            f"target={c} is out of range: the model has {clean.shape[-1]} classes (0..{clean.shape[-1] - 1})."
        )
    direction = -torch.full((clean.shape[-1],), 1.0 / clean.shape[-1], dtype=clean.dtype)
    direction[c] += 1.0

    leaves, mids = _Leaves(n), {}
    out, pre = att._forward(pixels, frozen, leaves, norms, mids)
    (grad_last,) = torch.autograd.grad(out[0] @ direction, leaves.values[n - 1], retain_graph=True)
    if leaf_errors:
        grads: list[Tensor | None] = [None] * (n - 1) + [grad_last[0]]
    else:
        total = resid_post_gradients(rrm.model, pixels, lambda o: o[0] @ direction.to(o.dtype))[1]
        grads = [total[b][0] for b in rrm.layers]
    pairs = _PairRows(rrm, frozen, norms, pre=pre, leaves=leaves, mids=mids, engine=engine, batch_size=batch_size)

    relevance: list[Tensor] = [torch.empty(0)] * n
    edges: list[Tensor] = [torch.empty(0)] * n
    for i in range(n - 1, -1, -1):
        g_feat = affine.decoder_projection(rrm.saes[i], grads[i], norms[i])  # [pos, d_sae]
        relevance[i] = torch.cat([(g_feat * d_acts[i]).sum(0), (grads[i] * d_errs[i]).sum()[None]])
        if i == n - 1:
            edges[i] = relevance[i][None].clone()
        if i == 0:
            break
        e, grad_prev = pairs.edges(i, g_feat * (acts[i] != 0), d_acts[i - 1], d_errs[i - 1])
        if leaf_errors:
            grads[i - 1] = grad_prev
        else:
            g_prev = affine.decoder_projection(rrm.saes[i - 1], grads[i - 1], norms[i - 1])
            r_prev = torch.cat([(g_prev * d_acts[i - 1]).sum(0), (grads[i - 1] * d_errs[i - 1]).sum()[None]])
            e[-1] = r_prev.double() - e[:-1].sum(0)
        edges[i - 1] = e
    return AggregatedGraph(
        layers=list(rrm.layers),
        relevance=[r.double() for r in relevance],
        edges=edges,
        target_class=c,
        target_value=float(clean[0] @ direction),
        leaf_errors=leaf_errors,
        activation=[a.sum(0).double() for a in acts],
    )


def _clean_acts(rrm: ReplacementModelBase, pixels: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The output, and each SAE layer's activations and error terms, of the clean forward with every
    SAE spliced and its error term kept (so the output is the original model's)."""
    hooks = [sae.cfg.metadata.hook_name for sae in rrm.saes]
    with torch.no_grad():
        clean, cache = rrm.model.run_with_cache_with_saes(
            pixels,
            saes=rrm.saes,
            use_error_term=True,
            return_cache_object=False,
            names_filter=[name for h in hooks for name in (sae_acts(h), sae_error(h))],
        )
    return clean, [cache[sae_acts(h)][0] for h in hooks], [cache[sae_error(h)][0] for h in hooks]


class _PairRows:
    """The edges between consecutive SAE layers of one image's frozen forward (``pre``: each layer's
    target pre-activations; ``leaves``: the spliced residuals; ``mids``: each block's
    ``resid_mid``): one row per target feature active somewhere, gradient-weighted and summed over
    tokens, in closed form (``engine/rows.py``) where the block reads the previous SAE layer directly and
    ``engine`` is ``staged``, else by batched VJPs."""

    def __init__(
        self,
        rrm: ReplacementModelBase,
        frozen: dict[str, Tensor],
        norms: list[affine.FrozenNorm],
        *,
        pre: list[Tensor],
        leaves: _Leaves,
        mids: dict[int, Tensor],
        engine: str,
        batch_size: int,
    ) -> None:
        self.rrm, self.frozen, self.norms, self.pre, self.leaves, self.mids = rrm, frozen, norms, pre, leaves, mids
        self.engine, self.batch_size, self.workspace = engine, batch_size, Workspace()

    def edges(self, i: int, weight: Tensor, d_acts: Tensor, d_errs: Tensor) -> tuple[Tensor, Tensor]:
        """``[d_sae_i + 1, d_sae_{i-1} + 1]`` edges into SAE layer ``i`` (error row and column last;
        the error row left zero) from the sources ``d_acts``/``d_errs`` of layer ``i - 1``, and the sum
        of the rows' gradients at layer ``i - 1``. ``weight``: ``[pos, d_sae_i]``, each target
        feature's gradient weight per token (zero where it is not active)."""
        rrm, layers = self.rrm, self.rrm.layers
        sae, prev = rrm.saes[i], rrm.saes[i - 1]
        rows = weight.abs().sum(0).nonzero().flatten()
        staged = self.engine == "staged" and layers[i - 1] == layers[i] - 1
        if staged:  # rows sorted by how many tokens they are active on, so batches pad little
            rows = rows[(weight[:, rows] != 0).sum(0).argsort(stable=True)]
        elif self.engine == "staged":
            logger.info(
                "attribute_aggregated: blocks %d..%d lie between SAE layers; rows by plain VJPs through them (slower).",
                layers[i - 1] + 1,
                layers[i],
            )
        dirs, index = _padded_sources(prev, self.norms[i - 1], d_acts, d_errs)
        e = torch.zeros(sae.cfg.d_sae + 1, prev.cfg.d_sae + 2, dtype=torch.float64)  # + a padding column
        grad_prev = torch.zeros_like(self.leaves.values[i - 1][0])
        batch = self._staged(i, dirs) if staged else self._vjp(i, dirs)
        for start in range(0, len(rows), self.batch_size):
            fo = rows[start : start + self.batch_size]
            proj, j_sum = batch(fo, weight[:, fo])
            e[fo] = e[fo].index_add(1, index, proj.reshape(len(fo), -1).double())
            grad_prev += j_sum
        return torch.cat([e[:, :-2], e[:, -2:-1]], 1), grad_prev  # the padding column dropped; error last

    def _staged(self, i: int, dirs: Tensor) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
        block, model = self.rrm.layers[i], self.rrm.model
        sources = Sources.for_block(model, block, self.frozen, dirs)
        w_h = affine.encoder_weights(self.rrm.saes[i])[0].detach()

        def batch(fo: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
            return block_rows(
                model,
                block,
                self.frozen,
                self.mids[i],
                w_h[:, fo].T,
                norm=self.norms[i],
                tokens=active_tokens(weight.T),
                sources=sources,
                workspace=self.workspace,
                grad_sum=True,
            )

        return batch

    def _vjp(self, i: int, dirs: Tensor) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
        pre, leaf = self.pre[i], self.leaves.values[i - 1]

        def batch(fo: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
            cot = torch.zeros(len(fo), *pre.shape, dtype=pre.dtype)
            cot[torch.arange(len(fo)), 0, :, fo] = weight.T
            (j,) = torch.autograd.grad(pre, leaf, grad_outputs=cot, is_grads_batched=True, retain_graph=True)
            j = j[:, 0].detach()  # [rows, pos, d_model]
            return torch.einsum("rpd,pkd->rpk", j, dirs), j.sum(0)

        return batch


def _padded_sources(sae: Any, norm: affine.FrozenNorm, d_acts: Tensor, d_err: Tensor) -> tuple[Tensor, Tensor]:
    """The source directions that can carry an edge, per token: ``d_f[p]·(z − m)[p, f]`` for the ``f``
    with ``(z − m)[p, f] ≠ 0``, zero-padded, then the error difference ``(e − e_ref)[p]``:
    ``[T, k_max + 1, d_model]``, and each slot's column in the edge matrix, flattened ``[T·(k_max + 1)]``
    (``d_sae`` for the error, ``d_sae + 1`` for padding: a column that is dropped)."""
    pos, feat = d_acts.nonzero(as_tuple=True)  # sorted by position
    n_pos, d_sae = d_acts.shape
    counts = torch.bincount(pos, minlength=n_pos)
    slot = torch.arange(len(pos)) - (torch.cumsum(counts, 0) - counts)[pos]
    k_max = int(counts.max()) if len(pos) else 0
    dirs = affine.decoder_directions(sae, feat, norm.select(pos)).detach() * d_acts[pos, feat, None]
    padded = torch.zeros(n_pos, k_max + 1, sae.cfg.d_in, dtype=dirs.dtype)
    padded[pos, slot] = dirs
    padded[:, k_max] = d_err
    index = torch.full((n_pos, k_max + 1), d_sae + 1, dtype=torch.long)
    index[pos, slot] = feat
    index[:, k_max] = d_sae
    return padded, index.flatten()


def _references(given: list[Tensor] | None, like: list[Tensor], name: str) -> list[Tensor]:
    if given is None:
        return [torch.zeros_like(t) for t in like]
    if len(given) != len(like):
        raise ValueError(f"{name} has {len(given)} layers; the replacement model has {len(like)} SAE layers.")
    for i, (g, t) in enumerate(zip(given, like, strict=True)):
        if tuple(g.shape) != tuple(t.shape):
            raise ValueError(f"{name}[{i}] has shape {tuple(g.shape)}; expected {tuple(t.shape)} ([pos, width]).")
    return given
