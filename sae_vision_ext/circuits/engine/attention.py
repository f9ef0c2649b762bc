"""Attribution through attention: an edge split over heads, and a pre-softmax score split into feature pairs.

Both hold under the frozen linearisation of ``circuits/replacement/linearise.py`` (attention patterns, LayerNorm scales
and MLP gates at their clean values on the traced image), on a :class:`ReplacementModelBase` with SAEs on the
residual stream.

- :func:`head_loadings`: an edge of the attribution graph, source ``(layer, pos, feature)`` at one SAE layer,
  target ``(layer, pos, feature)`` at the next (or the output), passes through the attention of every block in
  between. For one such block, the edge is the sum of a ``direct`` part (the paths that skip that block's
  attention: the residual stream and the MLPs) and one part per head (the paths through that head's value
  and output projection under the frozen pattern). Each part is measured as a frozen intervention with every
  other head's ``hook_z`` held at its clean value; the model is affine under the freeze, so the parts sum to
  the edge exactly (tested against the graph's own adjacency in float64).
- :func:`qk_attribution`: the pre-softmax score ``s = scale·<q, k>`` of ``(block, head, query, key)``. The
  block reads the residual after the previous block, which the SAE there writes as
  ``x[p] = Σ_f a_f d_f[p] + e[p] + c[p]`` (features, error, decoder bias; ``saes/affine.py``). With the block's
  LayerNorm scale frozen, ``q`` and ``k`` are affine in ``x``, so ``s`` is a sum over pairs (query-side term ×
  key-side term) of the features, the error and one bias term per side: ``pairs`` is that matrix, and its
  sum equals the model's ``hook_attn_scores`` exactly (checked on every call). Blocks with a per-head q/k norm
  or rotary embeddings (``attn.hook_rot_q``) are refused: their scores are not bilinear in the residual.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..._hooks import resid_post, sae_acts
from ...saes import affine

if TYPE_CHECKING:
    from jaxtyping import Float

    from ..replacement.base import ReplacementModelBase

Node = tuple[int, int, int]
"""``(layer, position, feature)``: a feature node (layer: the block whose residual output the SAE reads)."""


@dataclass
class HeadLoadings:
    """One edge split over the heads of one block (module docstring); ``direct + heads.sum() == edge``."""

    source: Node
    target: Node | tuple[str, int]
    """A feature node, or ``("output", class)`` for the demeaned logit of that class."""
    block: int
    """The block whose attention heads the edge is split over."""
    edge: float
    """The edge as a frozen intervention: activation × d(target)/d(activation)."""
    direct: float
    """Paths that skip this block's attention (the residual stream and MLPs); 0 between different positions
    when source and target are one block apart."""
    heads: Tensor = field(repr=False)
    """``[n_heads]``: the part through each head."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": list(self.source),
            "target": list(self.target),
            "block": self.block,
            "edge": self.edge,
            "direct": self.direct,
            "heads": self.heads.tolist(),
        }


@dataclass
class QKAttribution:
    """A pre-softmax attention score split into query-side × key-side terms (module docstring)."""

    block: int
    head: int
    query: int
    key: int
    score: float
    """The model's ``hook_attn_scores[0, head, query, key]``; equals ``pairs.sum()``."""
    query_terms: list[str]
    """Row names: ``"f<id>"`` for each active feature at the query position, then ``"error"``, ``"bias"``."""
    key_terms: list[str]
    """Column names, as ``query_terms`` at the key position."""
    pairs: Tensor = field(repr=False)
    """``[len(query_terms), len(key_terms)]``: each pair's share of the score."""

    def top(self, n: int = 10) -> list[tuple[str, str, float]]:
        """The ``n`` pairs of largest magnitude: ``(query term, key term, value)``."""
        flat = self.pairs.flatten()
        order = flat.abs().argsort(descending=True)[:n].tolist()
        cols = len(self.key_terms)
        return [(self.query_terms[i // cols], self.key_terms[i % cols], float(flat[i])) for i in order]

    def to_dict(self) -> dict[str, Any]:
        return {
            "block": self.block,
            "head": self.head,
            "query": self.query,
            "key": self.key,
            "score": self.score,
            "query_terms": self.query_terms,
            "key_terms": self.key_terms,
            "pairs": self.pairs.tolist(),
        }


def _one_image(pixels: Tensor, what: str) -> None:
    if pixels.ndim != 4 or pixels.shape[0] != 1:
        raise ValueError(f"{what} traces one image: pixels [1, chan, h, w]; got shape {tuple(pixels.shape)}.")


def _check_position(rrm: ReplacementModelBase, pos: int, what: str) -> int:
    n_ctx = rrm.model.cfg.n_ctx
    if isinstance(pos, bool) or not isinstance(pos, int) or not 0 <= pos < n_ctx:
        raise ValueError(
            f"{what}={pos!r} is not a token position of this model (0..{n_ctx - 1}: prefix tokens, then patches "
            "row-major)."
        )
    return pos


# ---------------------------------------------------------------------------------------------- head loadings
@torch.no_grad()
def head_loadings(
    rrm: ReplacementModelBase,
    pixels: Float[Tensor, "1 chan h w"],
    source: Node,
    target: Node | tuple[str, int],
    block: int | None = None,
) -> HeadLoadings:
    """Split the edge ``source -> target`` over the heads of ``block`` (default: the block right after the
    source's SAE layer). ``target`` is a feature of the next SAE layer or ``("output", class)``; ``source``'s
    feature must be active on the image (an inactive feature has no edge)."""
    _one_image(pixels, "head_loadings")
    model, layers = rrm.model, rrm.layers
    s_layer, s_pos, s_feat = source
    if s_layer not in layers:
        raise ValueError(f"source layer {s_layer} has no SAE; the SAE layers are {layers}.")
    _check_position(rrm, s_pos, "source position")
    after = layers[layers.index(s_layer) + 1] if s_layer != layers[-1] else model.cfg.n_layers
    to_output = target[0] == "output"
    if not to_output:
        t_layer, t_pos, t_feat = target
        if t_layer != after:
            raise ValueError(
                f"target layer {t_layer}: edges from SAE layer {s_layer} go to the next SAE layer ({after}) "
                f"{'or the output' if after == model.cfg.n_layers else ''}; the SAE layers are {layers}."
            )
        _check_position(rrm, t_pos, "target position")
    elif after != model.cfg.n_layers:
        raise ValueError(f"('output', c) is a target of the last SAE layer ({layers[-1]}) only; got source {source}.")
    block = s_layer + 1 if block is None else block
    if not s_layer < block <= min(after, model.cfg.n_layers - 1):
        raise ValueError(
            f"block={block}: the edge from layer {s_layer} passes through blocks {s_layer + 1}..{after} "
            f"(those below {model.cfg.n_layers})."
        )
    acts = rrm.feature_acts(pixels)[rrm.slot(s_layer)]
    if float(acts[0, s_pos, s_feat]) == 0:
        raise ValueError(f"source {source} is not active on this image (activation 0): it has no edges.")
    n_heads = model.blocks[block].parts.n_heads
    # one frozen forward of a batch: row 0 clean, then the source removed with every head open (the edge),
    # with every head held at its clean z (the direct part), and with one head open each
    masks = torch.cat([torch.ones(2, n_heads), torch.zeros(1, n_heads), torch.eye(n_heads)])
    out, pre = _frozen_batch(rrm, pixels, source, block, masks, t_layer=None if to_output else t_layer)
    if to_output:
        direction = -torch.full_like(out[0], 1.0 / out.shape[-1])
        direction[int(target[1])] += 1.0
        values = (out[:1] - out) @ direction
    else:
        values = pre[:1, t_pos, t_feat] - pre[:, t_pos, t_feat]
    values = values.double()
    edge, direct = float(values[1]), float(values[2])
    return HeadLoadings(tuple(source), tuple(target), block, edge, direct, values[3:] - values[2])


def _frozen_batch(
    rrm: ReplacementModelBase, pixels: Tensor, source: Node, block: int, masks: Tensor, *, t_layer: int | None
) -> tuple[Tensor, Tensor | None]:
    """``rrm.intervene(freeze=True)``'s forward for a batch of copies of the image: every row but the first
    has ``source`` set to 0, and row ``b`` gates ``block``'s heads by ``masks[b]`` (a closed head keeps the
    first row's clean ``hook_z``). Returns the outputs and the pre-activations of layer ``t_layer``'s SAE."""
    from ..replacement.linearise import frozen_hooks, pre_capture_hooks

    model = rrm.model
    s_layer, s_pos, s_feat = source
    frozen, norms = rrm.frozen_state(pixels)
    batch = pixels.expand(len(masks), -1, -1, -1)
    gate = masks.to(device=pixels.device, dtype=pixels.dtype)[:, None, :, None]

    def remove_source(a: Tensor, hook: Any) -> Tensor:
        a = a.clone()
        a[1:, s_pos, s_feat] = 0
        return a

    def gate_heads(z: Tensor, hook: Any) -> Tensor:
        return z[:1] + gate.to(z.dtype) * (z - z[:1])

    hooks = pre_capture_hooks(model) + frozen_hooks(model, frozen)
    hooks += [(sae_acts(resid_post(s_layer)), remove_source), (f"blocks.{block}.attn.hook_z", gate_heads)]
    t_input = None if t_layer is None else f"{rrm.sae_at(t_layer).cfg.metadata.hook_name}.hook_sae_input"
    with contextlib.ExitStack() as stack:
        for sae, norm in zip(rrm.saes, norms, strict=True):
            stack.enter_context(affine.frozen_normalisation(sae, norm))
        stack.enter_context(rrm.spliced(keep_errors=True))
        stack.enter_context(model.hooks(fwd_hooks=hooks))
        out, cache = model.run_with_cache(batch, names_filter=t_input or "hook_out", return_cache_object=False)
    if t_input is None:
        return out, None
    slot = rrm.slot(t_layer)
    return out, affine.pre_acts(rrm.saes[slot], cache[t_input], norms[slot])


# ---------------------------------------------------------------------------------------------- QK attribution
@torch.no_grad()
def qk_attribution(
    rrm: ReplacementModelBase,
    pixels: Float[Tensor, "1 chan h w"],
    block: int,
    head: int,
    *,
    query: int,
    key: int,
    atol: float | None = None,
) -> QKAttribution:
    """Split ``hook_attn_scores[0, head, query, key]`` of ``block`` into pairs of query-side and key-side
    terms (module docstring); the SAE of layer ``block - 1`` must be in ``rrm``. ``atol``: the largest
    allowed gap between the pairs' sum and the model's score (default ``1e-9`` in float64, else ``1e-4``
    × the score's scale); a larger gap raises ``ValueError`` (the block is not what this decomposes)."""
    _one_image(pixels, "qk_attribution")
    model = rrm.model
    if block - 1 not in rrm.layers:
        raise ValueError(
            f"block={block} reads the residual after block {block - 1}, which has no SAE here (SAE layers "
            f"{rrm.layers}); pick a block right after an SAE layer."
        )
    parts = model.blocks[block].parts
    if parts.q_norm is not None or f"blocks.{block}.attn.hook_rot_q" in model.hook_dict:
        raise ValueError(
            f"block {block} applies a per-head q/k norm or rotary embeddings: its scores are not bilinear in the "
            "residual stream, so they cannot be split into feature pairs."
        )
    if not 0 <= head < parts.n_heads:
        n = parts.n_heads
        raise ValueError(f"head={head} is out of range: block {block} has {n} heads (0..{n - 1}).")
    _check_position(rrm, query, "query")
    _check_position(rrm, key, "key")
    sae = rrm.sae_at(block - 1)
    x_name, scale_name = f"{sae.cfg.metadata.hook_name}.hook_sae_input", f"blocks.{block}.ln1.hook_scale"
    score_name = f"blocks.{block}.attn.hook_attn_scores"
    # the values the rest of the linearisation freezes (every norm's scale hooked, as in rrm.intervene)
    frozen, _, _, cache = rrm.recorded_forward(pixels, [x_name, score_name])
    x, ln_scale = cache[x_name][0], frozen[scale_name][0]  # [pos, d_model], [pos, 1]
    score = float(cache[score_name][0, head, query, key])
    norm = affine.frozen_norm(sae, x)
    acts = sae.encode(x)
    recon = affine.decode(sae, acts, norm)
    side = {}
    for name, pos, proj in (("query", query, 0), ("key", key, 1)):
        feats = acts[pos].nonzero().flatten()
        dirs = affine.decoder_directions(sae, feats, norm.select(pos)) * acts[pos, feats, None]
        bias = affine.decoder_bias(sae, norm.select(pos)).reshape(1, -1).to(dirs.dtype)
        error = (x[pos] - recon[pos]).reshape(1, -1).to(dirs.dtype)
        vectors = torch.cat([dirs, error, bias])
        mapped = _project(model, block, vectors.to(x.dtype), scale=ln_scale[pos], which=proj, head=head)
        side[name] = (feats, mapped)
    (q_feats, q_vecs), (k_feats, k_vecs) = side["query"], side["key"]
    pairs = (q_vecs.double() @ k_vecs.double().T) * parts.attn_scale
    gap = abs(float(pairs.sum()) - score)
    tol = atol if atol is not None else (1e-9 if x.dtype == torch.float64 else 1e-4) * max(1.0, abs(score))
    if gap > tol:
        raise ValueError(
            f"block {block}'s score ({score:.6g}) differs from the sum of its query × key terms by {gap:.3g} "
            f"(> {tol:.1g}): this block's attention is not q·k of affine projections of the residual here."
        )
    names = lambda feats: [f"f{int(f)}" for f in feats] + ["error", "bias"]
    return QKAttribution(block, head, query, key, score, names(q_feats), names(k_feats), pairs)


def _project(
    model: Any, block: int, vectors: Tensor, *, scale: Tensor, which: int, head: int
) -> Float[Tensor, "n d_head"]:
    """Each residual-stream vector's term of head ``head``'s query (``which=0``) or key (1) at a position
    whose ln1 scale is frozen at ``scale``: linear for every row but the last (the bias row, which also
    carries the LayerNorm bias and the projection's bias)."""
    hooks = [(f"blocks.{block}.ln1.hook_scale", lambda t, hook: scale.expand_as(t))]
    ln1, parts = model.blocks[block].ln1, model.blocks[block].parts
    with model.hooks(fwd_hooks=hooks):
        zero = torch.zeros_like(vectors[:1])
        offset = parts.qkv(ln1(zero))[which]
        out = parts.qkv(ln1(vectors))[which] - offset  # linear parts
    out[-1] += offset[0]
    return out.reshape(len(vectors), parts.n_heads, parts.d_head)[:, head]


__all__ = ["HeadLoadings", "QKAttribution", "head_loadings", "qk_attribution"]
