"""An SAE as an affine map once its input normalisation is frozen (the SAE side of the linearisation).

Every SAELens inference SAE that can sit on the residual stream computes, per token ``x``,

    x̃ = norm_in(x) − b_dec·[apply_b_dec_to_input],   h = x̃ @ W_h + b_h,   a = act(h),
    x̂ = norm_out(a @ W_dec / n + b_dec)

with ``n`` the decoder row norms when ``rescale_acts_by_decoder_norm`` is set (1 otherwise) and ``h``
the *pre-activation that an active feature's activation equals* (``a_f = h_f`` whenever ``a_f ≠ 0``):

- ``standard``, ``jumprelu`` (BatchTopK and Matryoshka save as it): ``W_h = W_enc``, ``b_h = b_enc``;
- ``topk``, ``abstopk``, ``signed_topk``: the same, times ``n`` when rescaling (SAELens's
  ``hook_sae_acts_pre`` is read *before* that factor, so it is not ``h`` then);
- ``gated``: the magnitude path, ``W_h = W_enc·exp(r_mag)``, ``b_h = b_mag`` (the gate is a mask).

The normalisation is frozen at the clean token's statistics (:class:`FrozenNorm`):

- ``layer_norm``: ``norm_in(x) = (x − mean(x)) / (σ* + 1e-5)`` with the std ``σ*`` frozen and the
  centring live (linear), as the seed paper (and every LayerNorm in ``circuits/replacement/linearise.py``) does;
  ``norm_out(y) = y·σ* + μ*`` with the clean mean ``μ*``.
- ``constant_norm_rescale``: ``norm_in(x) = x·c*``, ``norm_out(y) = y / c*``, ``c* = √d_in / |x_clean|``.
- ``none``, ``expected_average_only_in``, ``covariance_whitening``: identity at inference in SAELens
  (the statistics are folded into the weights), so nothing is frozen.

With the statistics frozen, ``h`` is affine in ``x`` and the reconstruction is affine in ``a``:
``x̂[p] = Σ_f a_f · d_f[p] + c[p]`` with the *effective decoder* ``d_f[p] = s[p]·W_dec[f]/n_f`` and
bias ``c[p] = s[p]·b_dec + μ*[p]`` (``s`` the output scale). On the clean token every function here
reproduces the SAE's own ``encode``/``decode`` (tested against SAELens for every class and setting).
Anything else (transcoders, ``hook_z`` reshaping, unknown classes) raises ``ValueError`` naming it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

if TYPE_CHECKING:
    from sae_lens import SAE

LINEAR_ARCHITECTURES = ("standard", "jumprelu", "topk", "abstopk", "signed_topk", "gated")
"""SAELens architectures whose active features equal an affine pre-activation (see module docstring)."""
IDENTITY_NORMS = ("none", "expected_average_only_in", "covariance_whitening")
"""``normalize_activations`` values that SAELens applies as the identity at inference."""
LN_EPS = 1e-5
"""SAELens's (and the seed paper's) epsilon for ``layer_norm``: ``x̃ = (x − μ) / (σ + eps)``."""


@dataclass(frozen=True)
class FrozenNorm:
    """An SAE's input normalisation held at one set of tokens' clean statistics.

    Shapes broadcast against the tokens ``[..., d_in]`` they were computed on (``[..., 1]``)."""

    kind: str
    """``normalize_activations`` of the SAE."""
    center: bool
    """Subtract the token's own mean before scaling (live, linear): ``layer_norm`` only."""
    in_scale: Tensor
    """Multiplies the (centred) input: ``1/(σ*+eps)``, ``c*`` or 1."""
    out_scale: Tensor
    """Multiplies the decoder output: ``σ*``, ``1/c*`` or 1."""
    out_shift: Tensor
    """Added after scaling the decoder output: ``μ*`` or 0."""

    def select(self, index: Any) -> FrozenNorm:
        """The statistics of a subset of tokens (``index`` into the token dimensions)."""
        pick = (lambda t: t[index]) if self.in_scale.ndim else (lambda t: t)
        return FrozenNorm(self.kind, self.center, pick(self.in_scale), pick(self.out_scale), pick(self.out_shift))


def check_linearisable(sae: SAE, where: str = "attribution") -> None:
    """Raise ``ValueError`` (naming the setting) if ``sae`` has no exact affine view."""
    cfg = sae.cfg
    arch = cfg.architecture()
    hook = getattr(cfg.metadata, "hook_name", None)
    if getattr(cfg.metadata, "hook_name_out", None) or "transcoder" in arch:
        raise ValueError(
            f"{where}: the SAE at {hook!r} is a transcoder ({arch!r}); the residual replacement model "
            "needs SAEs that reconstruct their own hook. Trace transcoders with "
            "sve.TranscoderReplacementModel(model, transcoders)."
        )
    if arch not in LINEAR_ARCHITECTURES:
        raise ValueError(
            f"{where}: SAE architecture {arch!r} (at {hook!r}) is not supported: its active features are "
            f"not an affine pre-activation. Supported: {', '.join(LINEAR_ARCHITECTURES)}."
        )
    norm = cfg.normalize_activations
    if norm not in (*IDENTITY_NORMS, "layer_norm", "constant_norm_rescale"):
        raise ValueError(
            f"{where}: normalize_activations={norm!r} (SAE at {hook!r}) cannot be frozen exactly; "
            f"supported: {', '.join((*IDENTITY_NORMS, 'layer_norm', 'constant_norm_rescale'))}."
        )
    if getattr(cfg, "reshape_activations", "none") != "none":
        raise ValueError(
            f"{where}: reshape_activations={cfg.reshape_activations!r} (SAE at {hook!r}) is not "
            "supported on the residual stream."
        )


def frozen_norm(sae: SAE, x: Float[Tensor, "*tokens d_in"]) -> FrozenNorm:
    """The normalisation statistics of the clean tokens ``x`` (what SAELens computes in ``encode``)."""
    kind = sae.cfg.normalize_activations
    x = x.detach().to(sae.W_dec.dtype)
    one = torch.ones((), dtype=x.dtype, device=x.device)
    if kind == "layer_norm":
        mu = x.mean(-1, keepdim=True)
        std = (x - mu).std(-1, keepdim=True)
        return FrozenNorm(kind, True, 1 / (std + LN_EPS), std, mu)
    if kind == "constant_norm_rescale":
        coeff = sae.cfg.d_in**0.5 / x.norm(dim=-1, keepdim=True)
        return FrozenNorm(kind, False, coeff, 1 / coeff, torch.zeros_like(coeff))
    return FrozenNorm(kind, False, one, one, 0 * one)


def _decoder_norms(sae: SAE) -> Tensor | None:
    return sae.W_dec.norm(dim=-1) if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False) else None


def encoder_weights(sae: SAE) -> tuple[Float[Tensor, "d_in d_sae"], Float[Tensor, " d_sae"]]:
    """``(W_h, b_h)`` of the pre-activation ``h`` (module docstring), decoder-norm rescaling folded in."""
    if sae.cfg.architecture() == "gated":
        w, b = sae.W_enc * sae.r_mag.exp(), sae.b_mag
    else:
        w, b = sae.W_enc, sae.b_enc
    norms = _decoder_norms(sae)
    return (w, b) if norms is None else (w * norms, b * norms)


def pre_acts(sae: SAE, x: Float[Tensor, "*tokens d_in"], norm: FrozenNorm) -> Float[Tensor, "*tokens d_sae"]:
    """``h`` of tokens ``x`` with the normalisation frozen at ``norm``: affine in ``x``, differentiable."""
    x = x.to(sae.W_dec.dtype)
    if norm.center:
        x = x - x.mean(-1, keepdim=True)
    x = x * norm.in_scale - sae.b_dec * sae.cfg.apply_b_dec_to_input
    w, b = encoder_weights(sae)
    return x @ w + b


def decoder_directions(sae: SAE, feats: Tensor, norm: FrozenNorm) -> Tensor:
    """Effective decoder rows ``d_f[p] = s[p]·W_dec[f]/n_f`` for features ``feats`` at the tokens of
    ``norm`` (``norm.select(...)`` first): ``[*tokens, d_in]`` matching ``feats``' shape."""
    rows = sae.W_dec[feats]
    norms = _decoder_norms(sae)
    if norms is not None:
        rows = rows / norms[feats, None]
    return rows * norm.out_scale


def decoder_projection(
    sae: SAE, grad: Float[Tensor, "*tokens d_in"], norm: FrozenNorm
) -> Float[Tensor, "*tokens d_sae"]:
    """``<grad[p], d_f[p]>`` for every feature ``f`` at every token (the effect of one unit of each
    feature's activation on a linear objective whose gradient at the SAE's site is ``grad``)."""
    proj = (grad.to(sae.W_dec.dtype) * norm.out_scale) @ sae.W_dec.T
    norms = _decoder_norms(sae)
    return proj if norms is None else proj / norms


def decoder_bias(sae: SAE, norm: FrozenNorm) -> Tensor:
    """``c[p] = s[p]·b_dec + μ*[p]``: the reconstruction of all-zero features at the tokens of ``norm``."""
    return sae.b_dec * norm.out_scale + norm.out_shift


def decode(sae: SAE, acts: Float[Tensor, "*tokens d_sae"], norm: FrozenNorm) -> Float[Tensor, "*tokens d_in"]:
    """The reconstruction with frozen statistics: ``Σ_f a_f d_f + c`` (affine in ``acts``)."""
    norms = _decoder_norms(sae)
    if norms is not None:
        acts = acts / norms
    return (acts @ sae.W_dec + sae.b_dec) * norm.out_scale + norm.out_shift


@contextlib.contextmanager
def frozen_normalisation(sae: SAE, norm: FrozenNorm) -> Iterator[None]:
    """Within the context the SAE's own ``encode``/``decode`` use ``norm`` instead of the statistics of
    whatever they are given (SAELens's ``run_time_activation_norm_fn_in/out``, restored on exit), so a
    spliced forward is frozen like the attribution graph. A no-op for the identity normalisations."""
    if norm.kind in IDENTITY_NORMS:
        yield
        return
    saved = sae.run_time_activation_norm_fn_in, sae.run_time_activation_norm_fn_out

    def norm_in(x: Tensor) -> Tensor:
        return ((x - x.mean(-1, keepdim=True)) if norm.center else x) * norm.in_scale

    def norm_out(y: Tensor) -> Tensor:
        return y * norm.out_scale + norm.out_shift

    sae.run_time_activation_norm_fn_in, sae.run_time_activation_norm_fn_out = norm_in, norm_out
    try:
        yield
    finally:
        sae.run_time_activation_norm_fn_in, sae.run_time_activation_norm_fn_out = saved
