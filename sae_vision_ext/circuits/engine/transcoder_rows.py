"""Rows of transcoder attribution graphs (``engine/transcoder_attribution.py``): for a batch of targets,
the edge weights onto *every* earlier node (layer-skipping edges included), in closed form through
the frozen blocks or by batched VJPs (the reference).

A row is the gradient of one target (a feature's pre-activation ``h`` at its block's transcoder input,
or an output direction) with respect to each block's MLP output ``blocks.{j}.hook_mlp_out`` and the
embeddings ``blocks.0.hook_resid_pre``, with attention patterns and every norm scale frozen, the
transcoders' features and errors held (sources, not functions of the residual) and their skip
connections live (linear). Going backwards from a feature of block ``l`` (closed form):

1. encoder: ``∂h/∂x = W_enc[:, f]`` at the feature's token; through ``ln2`` (frozen scale) when the
   transcoder reads ``ln2.hook_normalized``: ``ln2ᵀ(u) = C(γ₂ ⊙ u)/s₂`` (``C`` centring, LayerNorm only);
2. block ``l``'s attention half on that one token: ``dz = (ls1 ⊙ v) W_O``, per head mixed to every key by
   the frozen pattern and through ``W_V`` (rank ``H`` over tokens), ``ln1ᵀ``, plus the residual path;
3. for each block ``j < l`` downwards: the gradient ``g`` at ``resid_post_j`` *is* the gradient at
   ``mlp_out_j``: it is projected on block ``j``'s source directions (its features' decoder rows into
   ``j``, every earlier CLT layer's too, and its error vector); then the skip path
   ``g += ln2ᵀ(g Mⱼᵀ)`` (``skip_j(x) = x Mⱼ``) and block ``j``'s attention half, now on every token;
4. at ``resid_pre_0``: projected on the embeddings.

Edge ``(feature s → t) = a_s Σ_j <g_j[p_s], W_dec[s→j]>``, ``(error → t) = <g_j[p], e_j[p]>``,
``(embedding → t) = <g_in[p], x_in[p]>``. Arithmetic per row through ``n`` blocks: about
``n·(2·T·d² + T²·d)`` multiply-adds (:func:`transcoder_row_macs`): unlike the residual engine's rows, whose
gradient lives on a few tokens of one block, a layer-skipping row is dense after one attention layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .rows import _diag, _norm_backward

if TYPE_CHECKING:
    from ...models.hooked_vit import HookedViT
    from ..replacement.transcoder_set import TranscoderSet


def transcoder_row_macs(n_pos: int, d_model: int, n_blocks: int, k_slots: int) -> int:
    """Multiply-adds of one row through ``n_blocks`` frozen attention halves (the first on one token),
    projected on ``k_slots`` directions per token and block (module docstring; FLOPs are twice this)."""
    dense = max(n_blocks - 1, 0) * (2 * n_pos * d_model**2 + n_pos**2 * d_model)
    return 2 * d_model**2 + n_pos * d_model + dense + (n_blocks + 1) * n_pos * k_slots * d_model


class TranscoderSources:
    """Per block ``j`` the directions ``dirs [T, K+1, d]`` rows are projected on at ``mlp_out_j`` (the
    active features writing ``j``: their decoder rows, then the error vector), which flattened slot
    each source node reads (``sel``), its node id and its multiplier (activation, or 1)."""

    def __init__(self) -> None:
        self.blocks: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        self.inputs: tuple[Tensor, Tensor] | None = None

    def add_block(
        self, j: int, features: list[tuple[Tensor, Tensor, Tensor, Tensor]], error: Tensor, err_ids: Tensor
    ) -> None:
        """``features``: per encoder block writing ``j``, ``(pos [n], rows [n, d], acts [n], node ids [n])``;
        ``error``: ``[T, d]``, ``err_ids``: ``[T]``."""
        n_pos, dev = error.shape[0], error.device
        pos = torch.cat([f[0] for f in features]) if features else torch.zeros(0, dtype=torch.long, device=dev)
        rows = torch.cat([f[1] for f in features]) if features else error[:0]
        acts = torch.cat([f[2] for f in features]) if features else error[:0, 0]
        ids = torch.cat([f[3] for f in features]) if features else err_ids[:0]
        counts = torch.bincount(pos, minlength=n_pos)
        order = torch.argsort(pos, stable=True)
        pos, rows, acts, ids = pos[order], rows[order], acts[order], ids[order]
        slot = torch.arange(len(pos), device=dev) - (torch.cumsum(counts, 0) - counts)[pos]
        k = int(counts.max()) if len(pos) else 0
        dirs = torch.zeros(n_pos, k + 1, error.shape[1], dtype=error.dtype, device=dev)
        dirs[pos, slot] = rows.to(error.dtype)
        dirs[:, k] = error
        every = torch.arange(n_pos, device=dev)
        sel = torch.cat([pos * (k + 1) + slot, every * (k + 1) + k])
        mult = torch.cat([acts.to(error.dtype), torch.ones(n_pos, dtype=error.dtype, device=dev)])
        self.blocks[j] = (dirs, sel, mult, torch.cat([ids, err_ids]))

    def set_inputs(self, x_in: Tensor, ids: Tensor) -> None:
        self.inputs = (x_in, ids)

    def project(self, w: Tensor, j: int, g: Tensor) -> None:
        """``w[r, node] += mult·<g[r, p], dirs[p, k]>`` for block ``j``'s sources (``g``: ``[R, T, d]``)."""
        dirs, sel, mult, ids = self.blocks[j]
        proj = torch.einsum("rpd,pkd->rpk", g, dirs).reshape(len(g), -1)
        w.index_add_(1, ids, proj[:, sel] * mult)

    def project_inputs(self, w: Tensor, g: Tensor) -> None:
        assert self.inputs is not None
        x_in, ids = self.inputs
        w.index_add_(1, ids, (g * x_in).sum(-1))


class TranscoderRows:
    """Closed-form rows (module docstring) of one traced image: ``frozen`` its patterns and scales."""

    def __init__(
        self, model: HookedViT, tcs: TranscoderSet, frozen: dict[str, Tensor], sources: TranscoderSources
    ) -> None:
        self.model, self.tcs, self.frozen, self.sources = model, tcs, frozen, sources

    def _scale(self, block: int, name: str) -> Tensor:
        return self.frozen[f"blocks.{block}.{name}.hook_scale"][0]

    def _attn_weights(self, block: int, like: Tensor) -> tuple[Tensor | None, Tensor, Tensor, Tensor]:
        parts = self.model.blocks[block].parts
        d, heads, d_head = like.shape[-1], parts.n_heads, parts.d_head
        w_v = parts.qkv.value_weight().detach().reshape(heads, d_head, d)
        pattern = self.frozen[f"blocks.{block}.attn.hook_pattern"][0].to(like.dtype)
        return _diag(parts.ls1, d, like), parts.out_proj.weight.detach(), w_v, pattern

    def _heads_out(self, block: int, dz: Tensor, pos: Tensor | slice) -> Tensor:
        attn_ln = self.model.blocks[block].attn.ln
        if attn_ln is None:  # a norm on the heads' output (EVA-CLIP), its scale frozen
            return dz
        return _norm_backward(attn_ln, dz, self._scale(block, "attn.ln")[pos].to(dz.dtype))

    def attention_sparse(self, block: int, v: Tensor, pos: Tensor) -> Tensor:
        """Gradient at ``resid_pre`` ``[R, T, d]`` of cotangents ``v [R, d]`` at ``resid_mid[pos[r]]``."""
        ls1, w_o, w_v, pattern = self._attn_weights(block, v)
        heads, d_head, _ = w_v.shape
        dz = self._heads_out(block, (v if ls1 is None else v * ls1) @ w_o, pos)  # [R, H·dh]
        y = torch.einsum("rhe,hed->rhd", dz.reshape(-1, heads, d_head), w_v)
        g = torch.einsum("hrk,rhd->rkd", pattern[:, pos], y)
        ln1 = self.model.blocks[block].ln1
        g = _norm_backward(ln1, g, self._scale(block, "ln1").to(v.dtype))
        g[torch.arange(len(pos), device=v.device), pos] += v
        return g

    def attention_dense(self, block: int, v: Tensor) -> Tensor:
        """Gradient at ``resid_pre`` of cotangents ``v [R, T, d]`` at ``resid_mid`` (residual path included)."""
        ls1, w_o, w_v, pattern = self._attn_weights(block, v)
        heads, d_head, d = w_v.shape
        n_rows, n_pos = v.shape[:2]
        dz = self._heads_out(block, (v if ls1 is None else v * ls1) @ w_o, slice(None))
        mixed = torch.einsum("hqk,rqhe->rkhe", pattern, dz.reshape(n_rows, n_pos, heads, d_head))
        g = mixed.reshape(n_rows, n_pos, heads * d_head) @ w_v.reshape(heads * d_head, d)
        return v + _norm_backward(self.model.blocks[block].ln1, g, self._scale(block, "ln1").to(v.dtype))

    def skip(self, block: int, g: Tensor) -> Tensor:
        """Gradient at ``resid_mid`` of ``g`` at ``resid_post`` (identity plus the block's skip path)."""
        m = self.tcs.skip_matrix(block) if block in self.tcs.out_layers else None
        if m is None:
            return g
        dx = g @ m.detach().T.to(g.dtype)
        if self.tcs.normalized_input(block):
            dx = _norm_backward(self.model.blocks[block].ln2, dx, self._scale(block, "ln2").to(g.dtype))
        return g + dx

    def encoder_cotangent(self, block: int, pos: Tensor, feats: Tensor, dtype: torch.dtype) -> Tensor:
        """``∂h/∂resid_mid`` of features ``feats`` at their tokens ``pos``: ``[R, d]``."""
        u = self.tcs.encoder_cols(block, feats).detach().to(dtype)
        if self.tcs.normalized_input(block):
            u = _norm_backward(self.model.blocks[block].ln2, u, self._scale(block, "ln2")[pos].to(dtype))
        return u

    @torch.no_grad()
    def feature_rows(self, block: int, pos: Tensor, feats: Tensor, n_sources: int) -> Tensor:
        """Edge weights ``[R, n_sources]`` (columns: node ids ``0..n_sources-1``, every node before block
        ``block``'s) of the features ``feats`` of block ``block`` at tokens ``pos``."""
        x_in = self.sources.inputs[0]
        u = self.encoder_cotangent(block, pos, feats, x_in.dtype)
        w = torch.zeros(len(pos), n_sources, dtype=x_in.dtype, device=x_in.device)
        g = self.attention_sparse(block, u, pos)
        for j in range(block - 1, -1, -1):
            self.sources.project(w, j, g)
            g = self.attention_dense(j, self.skip(j, g))
        self.sources.project_inputs(w, g)
        return w

    def project_grads(self, grads: dict[int, Tensor | None], g_in: Tensor, n_sources: int) -> Tensor:
        """Edge weights from gradients at every block's MLP output (``None``: unused) and the inputs (the
        VJP engine's path)."""
        w = torch.zeros(len(g_in), n_sources, dtype=g_in.dtype, device=g_in.device)
        for j, g in grads.items():
            if g is not None:
                self.sources.project(w, j, g)
        self.sources.project_inputs(w, g_in)
        return w
