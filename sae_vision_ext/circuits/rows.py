"""Gradient-weighted attribution rows through one frozen block, computed in stages that use the
structure of the linearisation instead of one generic vector-Jacobian product per row.

A row is the gradient, at the residual ``x`` entering block ``b``, of ``Σ_p c[p]·h[p, f]``: a
weighted sum over tokens of one feature's pre-activation in the SAE after block ``b``. Under the
frozen linearisation (``linearise.py``, ``saes/affine.py``):

1. SAE encoder: ``∂h[p, f]/∂resid_post[p] = s[p]·P W_h[:, f]`` (``s`` the frozen input scale, ``P``
   the centring projection for ``layer_norm``), so a row's cotangent at ``resid_post`` is the
   rank-one ``c[p]·s[p]·P W_h[:, f]`` per token, written down directly (no ``[T, d_sae]`` product).
2. MLP half (``resid_post = resid_mid + ls2(mlp(ln2(resid_mid)))``, ``ln2`` scale and gate frozen):
   per token an affine map with Jacobian ``J_p`` (``[d_model, d_model]``); the ``J_p`` of every token
   are obtained once per block from ``d_model`` basis cotangents (the map acts per token, so one
   basis vector at every token gives row ``d`` of every ``J_p``), then each row costs
   ``T·d_model²`` instead of ``T·2·d_model·d_mlp``.
3. Attention half: with the pattern frozen only the value path carries gradient, so
   :func:`attention_half` recomputes ``resid_mid`` from ``x`` through ``ln1``, ``W_V``, the pattern,
   ``W_O`` and LayerScale alone, and one batched vector-Jacobian product goes through that (about
   half the work of one through the fused ``qkv`` projection).

``block_rows`` returns the rows for a batch of ``(feature, token weights)``; tests compare it with a
plain batched VJP from ``h`` (``tests/test_aggregated.py``, float64).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..saes import affine
from .linearise import frozen_hooks, pre_capture_hooks


def mlp_half_jacobians(model: Any, layer: int, resid_mid: Tensor, frozen: dict[str, Tensor],
                       chunk: int = 128) -> Tensor:  # fmt: skip
    """``J[p] = ∂resid_post[p]/∂resid_mid[p] − I`` of block ``layer`` at every token, ``[T, d_out, d_in]``
    (``ln2`` scale and MLP gate frozen at ``frozen``; ``resid_mid``: ``[1, T, d_model]``)."""
    block = model.blocks[layer]
    prefix = f"blocks.{layer}."
    hooks = [h for h in pre_capture_hooks(model) if h[0].startswith(prefix)]
    hooks += frozen_hooks(model, {k: v for k, v in frozen.items()
                                  if k.startswith(prefix + "ln2.") or k == prefix + "mlp.gate"})  # fmt: skip
    y = resid_mid.detach().requires_grad_()
    with model.hooks(fwd_hooks=hooks):
        out = block.mlp(block.ln2(y), block.parts)
        if block.parts.ls2 is not None:
            out = block.parts.ls2(out)
    n_pos, d = y.shape[1], y.shape[2]
    jac = torch.empty(n_pos, d, d, dtype=y.dtype, device=y.device)
    for start in range(0, d, chunk):
        dims = torch.arange(start, min(start + chunk, d), device=y.device)
        cot = torch.zeros(len(dims), 1, n_pos, d, dtype=y.dtype, device=y.device)
        cot[torch.arange(len(dims)), 0, :, dims] = 1.0
        (g,) = torch.autograd.grad(out, y, grad_outputs=cot, is_grads_batched=True, retain_graph=True)
        jac[:, start : start + len(dims)] = g[:, 0].transpose(0, 1)  # [T, dims, d_in]
    return jac


def encoder_cotangents(sae: Any, norm: affine.FrozenNorm, feats: Tensor, weights: Tensor) -> Tensor:
    """``[rows, T, d_in]``: the cotangent at the SAE's input of ``Σ_p weights[r, p]·h[p, feats[r]]``
    (stage 1 of the module docstring); ``weights``: ``[rows, T]``."""
    w_h, _ = affine.encoder_weights(sae)
    cols = w_h[:, feats].T.detach()  # [rows, d_in]
    if norm.center:
        cols = cols - cols.mean(-1, keepdim=True)
    scale = norm.in_scale.reshape(-1) if norm.in_scale.ndim else norm.in_scale  # [T] or scalar
    return (weights * scale)[..., None] * cols[:, None, :]


def attention_half(model: Any, layer: int, x: Tensor, frozen: dict[str, Tensor]) -> Tensor:
    """Block ``layer``'s ``resid_mid`` from its input ``x`` with the ``ln1`` scale and the attention
    pattern frozen: only the value path is computed (``x + ls1(W_O · pattern · v(ln1(x)))``), so a
    gradient never multiplies by the query and key weights."""
    block = model.blocks[layer]
    parts = block.parts
    prefix = f"blocks.{layer}."
    with model.hooks(fwd_hooks=frozen_hooks(model, {prefix + "ln1.hook_scale": frozen[prefix + "ln1.hook_scale"]})):
        h = block.ln1(x)
    n, t = x.shape[:2]
    v = parts.qkv.value(h).reshape(n, t, parts.n_heads, parts.d_head)
    pattern = frozen[prefix + "attn.hook_pattern"].to(v.dtype)
    out = parts.out_proj(torch.einsum("bhqk,bkhd->bqhd", pattern, v).reshape(n, t, parts.n_heads * parts.d_head))
    return x + (out if parts.ls1 is None else parts.ls1(out))


def block_rows(source: Tensor, resid_mid: Tensor, cotangent: Tensor, mlp_jac: Tensor) -> Tensor:
    """Stages 2 and 3: the cotangent at ``resid_post`` (``[rows, T, d]``) carried through the MLP half
    (``mlp_jac`` from :func:`mlp_half_jacobians`) and the attention half (``resid_mid`` computed from
    the leaf ``source`` by :func:`attention_half`) to ``source``. Returns ``[rows, T, d]``."""
    at_mid = cotangent + torch.einsum("rpo,poi->rpi", cotangent, mlp_jac)
    (g,) = torch.autograd.grad(resid_mid, source, grad_outputs=at_mid[:, None], is_grads_batched=True,
                               retain_graph=True)  # fmt: skip
    return g[:, 0]
