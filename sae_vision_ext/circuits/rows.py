"""Gradient-weighted attribution rows through one frozen block, in closed form on the tokens where
they are non-zero.

A row is the gradient, at the residual ``x`` entering block ``b``, of ``Σ_p c[p]·h[p, f]``: a weighted
sum over tokens of one feature's pre-activation in the SAE after block ``b``, with ``c`` zero wherever
the feature is inactive (a TopK feature is active on a few tokens). Under the frozen linearisation
(``linearise.py``, ``saes/affine.py``), going backwards:

1. SAE encoder: ``∂h[p, f]/∂resid_post[p] = s[p]·P W_h[:, f]`` (``s`` the frozen input scale, ``P``
   the centring projection for ``layer_norm``): a rank-one cotangent on the row's active tokens only.
2. MLP half (per token; ``ln2`` scale and gate frozen): one backward through the MLP recomputed on
   just those tokens.
3. Attention half: ``resid_mid = x + ls1(W_O · pattern · W_V · ln1(x))`` with the pattern and the
   ``ln1`` scale frozen, so the query and key weights never enter. With few active tokens ``A`` the
   value weights are applied per (token, head) before mixing (``A·d_model²``), else after mixing at
   every key (``T·d_model²``); the ``ln1`` backward is ``C(γ ⊙ g)/s`` and the residual adds the
   cotangent itself.

Needs the standard pre-norm block (``HookedBlock`` with a LayerScale-like ``ls1``, no norm inside
attention: ``Attributor`` refuses the others); tests compare the rows with plain batched VJPs through
the whole frozen block on every adapter family (``tests/test_aggregated.py``, float64).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..saes import affine
from .linearise import frozen_hooks, pre_capture_hooks


def _mlp_half_vjp(
    model: Any, layer: int, resid_mid: Tensor, pos: Tensor, cot: Tensor, frozen: dict[str, Tensor]
) -> Tensor:
    """``cot · ∂mlp_half/∂resid_mid`` on the tokens ``pos`` (``[N]``; ``cot``: ``[N, d]``), the MLP half
    recomputed on them with their own frozen ``ln2`` scale and gate."""
    block = model.blocks[layer]
    prefix = f"blocks.{layer}."
    gathered = {k: v[:, pos] for k, v in frozen.items() if k.startswith(prefix + "ln2.") or k == prefix + "mlp.gate"}
    hooks = [h for h in pre_capture_hooks(model) if h[0].startswith(prefix)] + frozen_hooks(model, gathered)
    y = resid_mid[0, pos].detach()[None].requires_grad_()
    with model.hooks(fwd_hooks=hooks):
        out = block.mlp(block.ln2(y), block.parts)
        if block.parts.ls2 is not None:
            out = block.parts.ls2(out)
    (g,) = torch.autograd.grad(out, y, grad_outputs=cot[None])
    return g[0]


def mix_first(n_active: int, heads: int, d_model: int) -> bool:
    """Whether the attention half mixes over keys before applying ``W_V`` (cheaper once a batch's
    rows are active on more than ``d_model / heads`` tokens)."""
    return n_active * heads > d_model


def target_rows(
    model: Any,
    layer: int,
    frozen: dict[str, Tensor],
    resid_mid: Tensor,
    sae: Any,
    norm: affine.FrozenNorm,
    feats: Tensor,
    weights: Tensor,
) -> Tensor:
    """``[rows, T, d_model]``: the gradient at block ``layer``'s input of ``Σ_p weights[r, p]·h[p, feats[r]]``
    for the SAE after the block (module docstring). ``weights``: ``[rows, T]``; ``resid_mid``:
    ``[1, T, d_model]`` of the traced image."""
    block = model.blocks[layer]
    parts, prefix = block.parts, f"blocks.{layer}."
    n_rows, n_pos = weights.shape
    d, heads, d_head = resid_mid.shape[-1], parts.n_heads, parts.d_head
    active = weights != 0
    n_act = max(int(active.sum(1).max()), 1)
    pos = torch.argsort((~active).to(torch.int8), dim=1, stable=True)[:, :n_act]  # active tokens first
    w = torch.gather(weights, 1, pos) * torch.gather(active, 1, pos)  # [R, A], zero on padding
    # 1. encoder cotangent at resid_post, rank one per token
    w_h, _ = affine.encoder_weights(sae)
    cols = w_h[:, feats].T.detach()
    if norm.center:
        cols = cols - cols.mean(-1, keepdim=True)
    scale = norm.in_scale.reshape(-1)[pos] if norm.in_scale.ndim else norm.in_scale
    u = (w * scale)[..., None] * cols[:, None, :]  # [R, A, d]
    # 2. MLP half on the gathered tokens
    v = u + _mlp_half_vjp(model, layer, resid_mid, pos.reshape(-1), u.reshape(-1, d), frozen).reshape(u.shape)
    # 3. attention half (value path): cotangent at z, then through the frozen pattern and W_V
    g = v if parts.ls1 is None else v * parts.ls1(torch.ones(d, dtype=v.dtype, device=v.device))
    dz = (g @ parts.out_proj.weight).reshape(n_rows, n_act, heads, d_head)
    w_v = parts.qkv.value_weight().reshape(heads, d_head, d)
    pattern = frozen[prefix + "attn.hook_pattern"][0].to(v.dtype)  # [H, q, k]
    if not mix_first(n_act, heads, d):  # W_V per (token, head) before mixing
        y = torch.einsum("rahd,hde->rahe", dz, w_v)
        d_ln = torch.einsum("hrak,rahe->rke", pattern[:, pos], y)
    else:  # mix first at every key, then W_V once per key
        dense = torch.zeros(n_rows, n_pos, heads, d_head, dtype=v.dtype, device=v.device)
        dense.scatter_add_(1, pos[..., None, None].expand_as(dz), dz)
        d_ln = torch.einsum("hqk,rqhd->rkhd", pattern, dense).reshape(n_rows, n_pos, -1) @ w_v.reshape(-1, d)
    ln1 = block.ln1
    gamma = getattr(ln1.norm, "weight", None)
    d_ln = d_ln if gamma is None else d_ln * gamma
    if ln1.kind == "LN":
        d_ln = d_ln - d_ln.mean(-1, keepdim=True)
    dx = d_ln / frozen[prefix + "ln1.hook_scale"][0].to(v.dtype)  # [T, 1] frozen scale
    return dx.scatter_add_(1, pos[..., None].expand_as(v), v)  # the residual path
