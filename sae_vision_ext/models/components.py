"""Hooked building blocks shared by every adapter: norm, attention, MLP and the pre-norm block.

A block holds *references* to the wrapped model's own modules (a :class:`BlockParts`), never copies,
so the hooked forward always reads the current weights. Only :class:`HookPoint` children are
registered as submodules; the wrapped parameters belong to ``HookedViT.wrapped``.

Token order everywhere: prefix tokens first (CLS, then registers or the distillation token), then
patches in row-major order. Hook shapes follow TransformerLens: ``hook_q/k/v/z`` are
``[batch, pos, head_index, d_head]`` and ``hook_attn_scores``/``hook_pattern`` are
``[batch, head_index, query_pos, key_pos]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

QKV = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]
Rotary = Callable[[Tensor], Tensor]
"""Rotary position embedding of queries or keys ``[batch, pos, head, d_head]`` (prefix tokens left alone)."""


def is_active(point: nn.Module) -> bool:
    """True if ``point`` is not a bare HookPoint: it has hooks, or was replaced (e.g. by a spliced SAE).

    The fast paths (``F.layer_norm``, ``F.scaled_dot_product_attention``) are taken only when every
    hook they skip is inactive, so a hook never silently misses its activation.
    """
    if not isinstance(point, HookPoint):
        return True
    return bool(point._forward_hooks or point._backward_hooks or point._forward_pre_hooks)


class FusedQKV:
    """q, k, v from one fused projection ``owner.<weight>`` of shape ``[3 * n_heads * d_head, d_model]``."""

    def __init__(self, owner: nn.Module, weight: str = "weight", bias: str = "bias") -> None:
        self.owner, self.weight, self.bias = owner, weight, bias

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = F.linear(x, getattr(self.owner, self.weight), getattr(self.owner, self.bias, None))
        q, k, v = out.chunk(3, dim=-1)
        return q, k, v

    def value_weight(self) -> Tensor:
        """``W_V`` (``[n_heads * d_head, d_model]``): the last third of the fused weight."""
        weight = getattr(self.owner, self.weight)
        return weight[2 * (weight.shape[0] // 3) :]


class SeparateQKV:
    """q, k, v from three projection modules (Hugging Face layout)."""

    def __init__(self, q: nn.Module, k: nn.Module, v: nn.Module) -> None:
        self.q, self.k, self.v = q, k, v

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.q(x), self.k(x), self.v(x)

    def value_weight(self) -> Tensor:
        """``W_V`` (``[n_heads * d_head, d_model]``)."""
        return self.v.weight


@dataclass(eq=False)
class BlockParts:
    """The wrapped modules one pre-norm block reads. ``None`` means 'not present' (identity)."""

    ln1: nn.Module
    qkv: QKV
    out_proj: nn.Module
    ln2: nn.Module
    fc1: nn.Module
    act: nn.Module
    fc2: nn.Module
    n_heads: int
    d_head: int
    attn_scale: float
    q_norm: nn.Module | None = None
    k_norm: nn.Module | None = None
    attn_out_norm: nn.Module | None = None
    mlp_norm: nn.Module | None = None
    ls1: nn.Module | None = None
    ls2: nn.Module | None = None
    block: nn.Module | None = None
    """The wrapped block itself (tests hook its output to check residual-stream parity)."""
    fc1_linear: nn.Module | None = None
    """Gated MLPs (SwiGLU, GeGLU): the linear branch. ``fc1`` is then the gate branch and the hidden
    activation is ``act(fc1(x)) * fc1_linear(x)`` (TransformerLens's ``hook_pre`` / ``hook_pre_linear``)."""
    rotary: Rotary | None = None
    """Rotary position embedding applied to q and k after any q/k norm (``attn.hook_rot_q``/``hook_rot_k``)."""
    key_mask: Callable[[], Tensor | None] | None = None
    """NaFlex models: the current forward's ``[batch, pos]`` bool mask of real tokens (``None`` when no
    image is padded); attention scores of padding keys are set to the dtype's minimum, as the native models do."""

    def mlp_in_weight(self) -> Tensor | None:
        """``W_in`` of the branch the frozen MLP gate multiplies (``fc1_linear`` for gated MLPs, else
        ``fc1``), ``[d_mlp, d_model]``; ``None`` when that projection has no plain weight."""
        proj = self.fc1_linear if self.fc1_linear is not None else self.fc1
        weight = getattr(proj, "weight", None)
        return weight if isinstance(weight, Tensor) and weight.ndim == 2 else None


class LinearSlice(nn.Module):
    """Output rows ``start:stop`` of a wrapped ``nn.Linear`` (one branch of a packed GLU projection),
    reading the wrapped weights on every call."""

    def __init__(self, linear: nn.Module, start: int, stop: int) -> None:
        super().__init__()
        _keep_unregistered(self, "linear", linear)
        self.start, self.stop = start, stop

    @property
    def weight(self) -> Tensor:
        return self.linear.weight[self.start : self.stop]

    @property
    def bias(self) -> Tensor | None:
        bias = self.linear.bias
        return None if bias is None else bias[self.start : self.stop]

    @property
    def out_features(self) -> int:
        return self.stop - self.start

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        return F.linear(x, self.weight, self.bias)


class ParamScale(nn.Module):
    """LayerScale held as a bare parameter ``owner.<attr>`` (timm Eva's ``gamma_1``/``gamma_2``): ``x * gamma``."""

    def __init__(self, owner: nn.Module, attr: str) -> None:
        super().__init__()
        _keep_unregistered(self, "owner", owner)
        self.attr = attr

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        return getattr(self.owner, self.attr) * x


def norm_kind(norm: nn.Module) -> str:
    """``"RMS"`` for RMS norms (by class name), else ``"LN"``."""
    return "RMS" if "rms" in type(norm).__name__.lower() else "LN"


def _keep_unregistered(module: nn.Module, name: str, value: object) -> None:
    """Store ``value`` on ``module`` without registering it as a child (no duplicate parameters)."""
    module.__dict__[name] = value


class HookedNorm(nn.Module):
    """LayerNorm or RMSNorm over the last dim with ``hook_scale`` and ``hook_normalized``.

    ``hook_scale`` is ``sqrt(var + eps)`` (RMS: ``sqrt(mean(x^2) + eps)``), shape ``[..., 1]``;
    ``hook_normalized`` is the output after the affine weight and bias, as in TransformerLens.
    """

    def __init__(self, norm: nn.Module, kind: str = "LN") -> None:
        super().__init__()
        _keep_unregistered(self, "norm", norm)
        self.kind = kind
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        norm = self.norm
        weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
        eps = getattr(norm, "eps", None)
        eps = norm.variance_epsilon if eps is None else eps  # HF's T5-style RMSNorm
        if self.kind == "LN" and not is_active(self.hook_scale):
            out = F.layer_norm(x, x.shape[-1:], weight, bias, eps)
        elif self.kind == "RMS" and not is_active(self.hook_scale):
            out = norm(x)  # the wrapped norm itself (HF's computes in float32 whatever the input dtype)
        else:
            centred = x - x.mean(-1, keepdim=True) if self.kind == "LN" else x
            scale = self.hook_scale((centred.pow(2).mean(-1, keepdim=True) + eps).sqrt())
            out = centred / scale
            if weight is not None:
                out = out * weight
            if bias is not None:
                out = out + bias
        return self.hook_normalized(out)


class HookedAttention(nn.Module):
    """Multi-head self-attention over all tokens (NaFlex batches: padding keys masked), with TransformerLens hooks.

    ``hook_q``/``hook_k`` are after any per-head q/k norm; with rotary embeddings ``hook_rot_q``/
    ``hook_rot_k`` hold the rotated vectors whose dot product is scored (TransformerLens's names). A norm
    on the heads' concatenated output (timm ``scale_attn_inner``, EVA-CLIP) is ``attn.ln``.
    When neither ``hook_attn_scores`` nor ``hook_pattern`` is active the pattern is never
    materialised: attention runs through ``F.scaled_dot_product_attention``.
    """

    def __init__(self, parts: BlockParts | None = None) -> None:
        super().__init__()
        self.hook_q = HookPoint()
        self.hook_k = HookPoint()
        if parts is not None and parts.rotary is not None:
            self.hook_rot_q = HookPoint()
            self.hook_rot_k = HookPoint()
        out_norm = parts.attn_out_norm if parts is not None else None
        self.ln = HookedNorm(out_norm, norm_kind(out_norm)) if out_norm is not None else None
        self.hook_v = HookPoint()
        self.hook_attn_scores = HookPoint()
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"], parts: BlockParts) -> Float[Tensor, "batch pos d_model"]:
        b, n, _ = x.shape
        q, k, v = (t.reshape(b, n, parts.n_heads, parts.d_head) for t in parts.qkv(x))
        if parts.q_norm is not None:
            q, k = parts.q_norm(q), parts.k_norm(k)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if parts.rotary is not None:
            q, k = self.hook_rot_q(parts.rotary(q)), self.hook_rot_k(parts.rotary(k))
        mask = parts.key_mask() if parts.key_mask is not None else None
        if is_active(self.hook_attn_scores) or is_active(self.hook_pattern):
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * parts.attn_scale
            if mask is not None:  # padding keys of a NaFlex batch, masked before the hook as TransformerLens does
                scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
            pattern = self.hook_pattern(self.hook_attn_scores(scores).softmax(dim=-1))
            z = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
        else:
            z = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                attn_mask=None if mask is None else mask[:, None, None, :],
                scale=parts.attn_scale,
            ).transpose(1, 2)
        z = self.hook_z(z).reshape(b, n, parts.n_heads * parts.d_head)
        if self.ln is not None:
            z = self.ln(z)
        return parts.out_proj(z)


class HookedMLP(nn.Module):
    """``fc2(act(fc1(x)))`` with ``hook_pre`` (before the activation) and ``hook_post`` (after).

    Gated MLPs (``parts.fc1_linear``): ``fc2(act(fc1(x)) * fc1_linear(x))`` with TransformerLens's
    ``hook_pre`` (gate branch), ``hook_pre_linear`` (linear branch) and ``hook_post`` (their product).
    A norm on the hidden activation (the sub-LN of EVA-02 / timm ``scale_mlp``) is ``mlp.ln``.
    """

    def __init__(self, parts: BlockParts | None = None) -> None:
        super().__init__()
        self.hook_pre = HookPoint()
        if parts is not None and parts.fc1_linear is not None:
            self.hook_pre_linear = HookPoint()
        self.hook_post = HookPoint()
        hidden_norm = parts.mlp_norm if parts is not None else None
        self.ln = HookedNorm(hidden_norm, norm_kind(hidden_norm)) if hidden_norm is not None else None

    def forward(self, x: Float[Tensor, "batch pos d_model"], parts: BlockParts) -> Float[Tensor, "batch pos d_model"]:
        act = parts.act(self.hook_pre(parts.fc1(x)))
        if parts.fc1_linear is not None:
            act = act * self.hook_pre_linear(parts.fc1_linear(x))
        post = self.hook_post(act)
        if self.ln is not None:
            post = self.ln(post)
        return parts.fc2(post)


class HookedBlock(nn.Module):
    """Pre-norm block ``x + ls1(attn(ln1(x)))`` then ``+ ls2(mlp(ln2(.)))``.

    ``hook_attn_out`` and ``hook_mlp_out`` are after LayerScale, so
    ``resid_mid = resid_pre + attn_out`` and ``resid_post = resid_mid + mlp_out`` exactly.
    Dropout and drop-path are not applied: the hooked forward is the eval-mode forward.
    """

    def __init__(self, parts: BlockParts, normalization: str = "LN") -> None:
        super().__init__()
        _keep_unregistered(self, "parts", parts)
        self.ln1 = HookedNorm(parts.ln1, normalization)
        self.attn = HookedAttention(parts)
        self.ln2 = HookedNorm(parts.ln2, normalization)
        self.mlp = HookedMLP(parts)
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        parts = self.parts
        resid_pre = self.hook_resid_pre(x)
        attn_out = self.attn(self.ln1(resid_pre), parts)
        if parts.ls1 is not None:
            attn_out = parts.ls1(attn_out)
        resid_mid = self.hook_resid_mid(resid_pre + self.hook_attn_out(attn_out))
        mlp_out = self.mlp(self.ln2(resid_mid), parts)
        if parts.ls2 is not None:
            mlp_out = parts.ls2(mlp_out)
        return self.hook_resid_post(resid_mid + self.hook_mlp_out(mlp_out))


_ACT_NAMES = {
    "quickgelu": "quick_gelu",
    "quickgeluactivation": "quick_gelu",
    "relu": "relu",
    "silu": "silu",
    "siluactivation": "silu",
    "geluactivation": "gelu",
    "newgeluactivation": "gelu_tanh",
    "pytorchgelutanh": "gelu_tanh",
    "gelutanh": "gelu_tanh",
    "gelupytorchtanh": "gelu_tanh",
}


def act_fn_name(act: nn.Module) -> str:
    """TransformerLens-style name of an activation module ('gelu', 'gelu_tanh', 'quick_gelu', ...)."""
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    return _ACT_NAMES.get(type(act).__name__.lower(), "other")
