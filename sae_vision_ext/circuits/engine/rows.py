"""Gradient-weighted attribution rows through one frozen block, in closed form, projected straight
onto the source directions.

A row is the gradient, at the residual ``x`` entering block ``b``, of ``Σ_p c[p]·h[p, f]``: a weighted
sum over tokens of one feature's pre-activation in the SAE after block ``b``, with ``c`` zero wherever
the feature is inactive (a TopK feature is active on a few tokens). Rows are never materialised as
``[T, d_model]`` gradients: what a graph needs is their inner products with the source directions at
each token (:class:`Sources`: active features' effective decoder rows, error vectors, inputs), so
:func:`block_rows` returns ``proj[r, p, k] = <row_r[p], dirs[p, k]>``. Under the frozen linearisation
(``replacement/linearise.py``, ``saes/affine.py``), going backwards from the target:

1. SAE encoder: ``∂h[p, f]/∂resid_post[p] = s[p]·P W_h[:, f]`` (``s`` the frozen input scale, ``P``
   the centring projection for ``layer_norm``): a rank-one cotangent ``u`` on the row's active tokens.
2. MLP half (per token; ``ln2`` scale and gate ``g`` frozen): ``v = u + ln2ᵀ(W_in^T (g ⊙ W_out^T (ls2 ⊙ u)))``
   on those tokens only, with ``ln2ᵀ(y) = C(γ₂ ⊙ y)/s₂`` (``C`` the centring for LayerNorm). Two
   matmuls, no recomputed forward (modules other than ``nn.Linear`` fall back to autograd).
3. Attention half: ``resid_mid = x + ls1(W_O · pattern · W_V · ln1(x))`` with the pattern and the
   ``ln1`` scale frozen, so Q and K never enter: ``dz = (ls1 ⊙ v) W_O`` per (token, head), then the
   gradient at ``ln1``'s output ``G[r, p] = Σ_{a,h} pattern[h, q_a, p]·(W_V^h)ᵀ dz[r, a, h]`` (values
   first when a row has few tokens, keys mixed first otherwise: :func:`mix_first`).
4. Projection: ``ln1``'s backward is folded into the sources once per block
   (``dirs~[p, k] = γ₁ ⊙ C(dirs[p, k]) / s₁[p]``, since ``<C(γ₁⊙G)/s₁, d> = <G, γ₁⊙C(d)/s₁>``), so
   ``proj[r, p, k] = <G[r, p], dirs~[p, k]> + Σ_a [p = q_a]·<v[r, a], dirs[p, k]>`` (the last term is
   the residual path).

Arithmetic per single-token row on ViT-B (T 197, d 768, d_mlp 3072, k 32): MLP ``2·d·d_mlp``, OV
``2·d²``, mixing ``H·T·d``, projection ``T·(k+1)·d``: about 12 M multiply-adds (:func:`row_macs`).
Large temporaries live in a reused :class:`Workspace` (a fresh 40 MB tensor per batch costs more in
page faults than the matmul that fills it).

Needs the pre-norm block (``HookedBlock`` with a LayerScale-like ``ls1``; norms inside the block,
``attn.ln`` and ``mlp.ln``, and gated MLPs enter through their frozen scales and gates); tests compare
the rows with plain batched VJPs through the whole frozen block on every adapter family, float64
(``tests/unit/test_rows.py``, ``tests/unit/test_aggregated.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from ...saes import affine
from ..replacement.linearise import frozen_hooks, pre_capture_hooks

if TYPE_CHECKING:
    from ...models.hooked_vit import HookedViT


class Workspace:
    """Reusable buffers for the large per-batch temporaries (one per attribution run)."""

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialised tensor of ``shape`` with ``like``'s dtype and device, reusing storage."""
        n = 1
        for s in shape:
            n *= s
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(n, dtype=like.dtype, device=like.device)
            self._buffers[name] = buf
        return buf[:n].view(shape)


@dataclass
class Sources:
    """What the rows of targets at block ``block`` are projected on: per token of the residual entering
    the block, ``K`` directions (``dirs [T, K, d_model]``, zero-padded), e.g. the active features'
    effective decoder rows and the error vector. ``folded`` is ``ln1``'s backward applied to them
    (module docstring, step 4), computed once."""

    dirs: Float[Tensor, "pos k d_model"]
    folded: Float[Tensor, "pos k d_model"] = field(init=False)

    @classmethod
    def for_block(cls, model: HookedViT, block: int, frozen: dict[str, Tensor], dirs: Tensor) -> Sources:
        out = cls(dirs)
        ln1 = model.blocks[block].ln1
        folded = dirs - dirs.mean(-1, keepdim=True) if ln1.kind == "LN" else dirs
        gamma = getattr(ln1.norm, "weight", None)
        if gamma is not None:
            folded = folded * gamma.detach().to(dirs.dtype)
        out.folded = folded / frozen[f"blocks.{block}.ln1.hook_scale"][0, :, :, None].to(dirs.dtype)
        return out


def row_macs(n_pos: int, d_model: int, d_mlp: int, heads: int, k_slots: int, *, n_active: int = 1) -> int:
    """Multiply-adds of one row with ``n_active`` tokens (module docstring): the FLOP floor is twice this."""
    a = n_active
    return 2 * a * d_model * d_mlp + 2 * a * d_model**2 + a * heads * n_pos * d_model + n_pos * k_slots * d_model


def mix_first(n_active: int, heads: int, d_model: int) -> bool:
    """Whether the attention half mixes over keys before applying ``W_V`` (cheaper once a batch's
    rows are active on more than ``d_model / heads`` tokens)."""
    return n_active * heads > d_model


def _diag(module: nn.Module | None, d: int, like: Tensor) -> Tensor | None:
    """The per-channel factor of a LayerScale-like module (``None`` when absent)."""
    return None if module is None else module(torch.ones(d, dtype=like.dtype, device=like.device)).detach()


def _norm_backward(norm: Any, y: Tensor, scale: Tensor) -> Tensor:
    """``ln^T(y) = C(γ ⊙ y) / s`` for a frozen-scale norm (``C`` the centring for LayerNorm)."""
    gamma = getattr(norm.norm, "weight", None)
    y = y if gamma is None else y * gamma.detach()
    if norm.kind == "LN":
        y = y - y.mean(-1, keepdim=True)
    return y / scale


def _mlp_half_vjp(
    model: HookedViT, layer: int, resid_mid: Tensor, pos: Tensor, cot: Tensor, *, frozen: dict[str, Tensor]
) -> Tensor:
    """``cot · ∂mlp_half/∂resid_mid`` on the tokens ``pos`` (``[N]``; ``cot``: ``[N, d]``) with the block's
    ``ln2`` scale and gate frozen: closed form for ``nn.Linear`` projections, else the MLP recomputed
    on those tokens under autograd."""
    block = model.blocks[layer]
    parts, prefix = block.parts, f"blocks.{layer}."
    w_in = parts.mlp_in_weight()
    if w_in is not None and isinstance(parts.fc2, nn.Linear):
        ls2 = _diag(parts.ls2, cot.shape[-1], cot)
        c = cot if ls2 is None else cot * ls2
        d_post = c @ parts.fc2.weight.detach()
        if block.mlp.ln is not None:  # a norm on the hidden activation (sub-LN), its scale frozen
            d_post = _norm_backward(block.mlp.ln, d_post, frozen[prefix + "mlp.ln.hook_scale"][0, pos].to(c.dtype))
        d_post = d_post * frozen[prefix + "mlp.gate"][0, pos].to(c.dtype)
        d_ln = d_post @ w_in.detach()
        return _norm_backward(block.ln2, d_ln, frozen[prefix + "ln2.hook_scale"][0, pos].to(c.dtype))
    gathered = {k: v[:, pos] for k, v in frozen.items() if k.startswith((prefix + "ln2.", prefix + "mlp."))}
    hooks = [h for h in pre_capture_hooks(model) if h[0].startswith(prefix)] + frozen_hooks(model, gathered)
    y = resid_mid[0, pos].detach()[None].requires_grad_()
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        out = block.mlp(block.ln2(y), parts)
        if parts.ls2 is not None:
            out = parts.ls2(out)
    (g,) = torch.autograd.grad(out, y, grad_outputs=cot[None])
    return g[0]


def _add_direct(proj: Tensor, pos: Tensor, v: Tensor, dirs: Tensor) -> None:
    """``proj[r, pos[r, a], k] += <v[r, a], dirs[pos[r, a], k]>`` (the residual path), grouped by token so
    no ``[R, A, K, d]`` gather is built (``K`` is large for the paper's k)."""
    n_rows, n_act = pos.shape
    flat_pos, flat_v = pos.reshape(-1), v.reshape(-1, v.shape[-1])
    if n_act == 1:  # one token per row: the gather is [R, K, d], small
        proj[torch.arange(n_rows, device=pos.device), flat_pos] += torch.einsum("rd,rkd->rk", flat_v, dirs[flat_pos])
        return
    order = flat_pos.argsort()
    tokens, counts = torch.unique_consecutive(flat_pos[order], return_counts=True)
    row_of = torch.arange(n_rows, device=pos.device).repeat_interleave(n_act)
    for token, idx in zip(tokens.tolist(), order.split(counts.tolist()), strict=True):
        proj[:, token].index_add_(0, row_of[idx], flat_v[idx] @ dirs[token].T)


def active_tokens(weights: Float[Tensor, "rows pos"]) -> tuple[Tensor, Tensor]:
    """Each row's tokens with a non-zero weight (``pos [R, A]``, padded) and their weights (zero on
    padding): the ``tokens`` argument of :func:`block_rows`."""
    active = weights != 0
    n_act = max(int(active.sum(1).max()), 1)
    pos = torch.argsort((~active).to(torch.int8), dim=1, stable=True)[:, :n_act]
    return pos, torch.gather(weights, 1, pos) * torch.gather(active, 1, pos)


@torch.no_grad()
def block_rows(
    model: HookedViT,
    layer: int,
    frozen: dict[str, Tensor],
    resid_mid: Tensor,
    encoder_cols: Float[Tensor, "rows d_model"],
    *,
    norm: affine.FrozenNorm,
    tokens: tuple[Tensor, Tensor],
    sources: Sources,
    workspace: Workspace | None = None,
    grad_sum: bool = False,
) -> tuple[Float[Tensor, "rows pos k"], Tensor | None]:
    """``proj[r, p, k]``: the gradient at block ``layer``'s input of ``Σ_a w[r, a]·h[pos[r, a], f_r]`` (the
    SAE after the block; ``encoder_cols[r]`` is ``W_h[:, f_r]``, :func:`affine.encoder_weights`;
    ``tokens = (pos, w)``, each ``[R, A]``, from :func:`active_tokens`), projected on ``sources.dirs[p, k]``
    (module docstring). With ``grad_sum`` also the sum of the rows' gradients ``[T, d_model]``.
    ``resid_mid``: ``[1, T, d_model]`` of the traced image. Nothing here reads a value back to the host."""
    ws = workspace or Workspace()
    parts, prefix = model.blocks[layer].parts, f"blocks.{layer}."
    pos, w = tokens
    (n_rows, n_act), n_pos = pos.shape, resid_mid.shape[1]
    d, heads, d_head = resid_mid.shape[-1], parts.n_heads, parts.d_head
    # 1. encoder cotangent at resid_post, rank one per token
    cols = encoder_cols - encoder_cols.mean(-1, keepdim=True) if norm.center else encoder_cols
    scale = norm.in_scale.reshape(-1)[pos] if norm.in_scale.ndim else norm.in_scale
    u = (w * scale)[..., None] * cols[:, None, :]  # [R, A, d]
    # 2. MLP half on the active tokens
    v = u + _mlp_half_vjp(model, layer, resid_mid, pos.reshape(-1), u.reshape(-1, d), frozen=frozen).reshape(u.shape)
    # 3. attention half (value path): cotangent at z, then the gradient G at ln1's output
    ls1 = _diag(parts.ls1, d, v)
    dz = (v if ls1 is None else v * ls1) @ parts.out_proj.weight.detach()  # [R, A, H·dh]
    attn_ln = model.blocks[layer].attn.ln
    if attn_ln is not None:  # a norm on the heads' output (EVA-CLIP), its scale frozen
        dz = _norm_backward(attn_ln, dz, frozen[prefix + "attn.ln.hook_scale"][0, pos].to(v.dtype))
    w_v = parts.qkv.value_weight().detach().reshape(heads, d_head, d)
    pattern = frozen[prefix + "attn.hook_pattern"][0].to(v.dtype)  # [H, q, k]
    g = ws.get("G", (n_rows, n_pos, d), v)
    if not mix_first(n_act, heads, d):  # W_V per (token, head), then mix: G[r] = P_rᵀ [T, A·H] @ y_r [A·H, d]
        y = torch.bmm(dz.reshape(-1, heads, d_head).transpose(0, 1), w_v)  # [H, R·A, d]
        y = y.reshape(heads, n_rows, n_act, d).permute(1, 2, 0, 3).reshape(n_rows, n_act * heads, d)
        p_rows = pattern[:, pos].permute(1, 3, 2, 0).reshape(n_rows, n_pos, n_act * heads)  # [R, T, A·H]
        torch.bmm(p_rows, y, out=g)
    else:  # mix at every key first (Σ_a pattern[h, q_a, k]·dz[r, a, h]), then W_V once per key
        mixed = torch.einsum("hrak,rahe->rkhe", pattern[:, pos], dz.reshape(n_rows, n_act, heads, d_head))
        torch.mm(mixed.reshape(n_rows * n_pos, heads * d_head), w_v.reshape(heads * d_head, d), out=g.view(-1, d))
    # 4. projection on the ln1-folded sources, plus the residual path at the active tokens
    proj = torch.einsum("rpd,pkd->rpk", g, sources.folded)
    _add_direct(proj, pos, v, sources.dirs)
    total = None
    if grad_sum:
        ln1 = model.blocks[layer].ln1
        total = _norm_backward(ln1, g.sum(0), frozen[prefix + "ln1.hook_scale"][0].to(v.dtype))
        total.index_add_(0, pos.reshape(-1), v.reshape(-1, d))
    return proj, total
