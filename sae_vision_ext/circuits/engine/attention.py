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
import functools
from collections.abc import Sequence
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
    return head_loadings_many(rrm, pixels, [(source, target, block)])[0]


def _check_edge(rrm: ReplacementModelBase, source: Node, target: Node | tuple[str, int], block: int | None) -> int:
    """The block of ``head_loadings(source, target, block)`` after checking the edge exists; ``ValueError`` if not."""
    model, layers = rrm.model, rrm.layers
    s_layer, s_pos, _ = source
    if s_layer not in layers:
        raise ValueError(f"source layer {s_layer} has no SAE; the SAE layers are {layers}.")
    _check_position(rrm, s_pos, "source position")
    after = layers[layers.index(s_layer) + 1] if s_layer != layers[-1] else model.cfg.n_layers
    if target[0] != "output":
        t_layer, t_pos, _ = target
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
    return block


@torch.no_grad()
def head_loadings_many(
    rrm: ReplacementModelBase,
    pixels: Float[Tensor, "1 chan h w"],
    edges: Sequence[tuple[Node, Node | tuple[str, int], int | None]],
    *,
    max_rows: int = 96,
) -> list[HeadLoadings]:
    """:func:`head_loadings` of each ``(source, target, block)``, in order, from batched frozen forwards:
    the edges of one ``(source, block)`` share their rows (``n_heads + 2`` of them), at most ``max_rows`` rows
    (plus the clean one) per forward."""
    _one_image(pixels, "head_loadings")
    checked = [(tuple(s), tuple(t), _check_edge(rrm, s, t, b)) for s, t, b in edges]
    acts = rrm.feature_acts(pixels)
    for s, _, _ in checked:
        if float(acts[rrm.slot(s[0])][0, s[1], s[2]]) == 0:
            raise ValueError(f"source {s} is not active on this image (activation 0): it has no edges.")
    groups: dict[tuple[Node, int], list[int]] = {}
    for i, (s, _, b) in enumerate(checked):
        groups.setdefault((s, b), []).append(i)
    keys, results = list(groups), [None] * len(checked)
    frozen = rrm.frozen_state(pixels)
    n_heads = {b: rrm.model.blocks[b].parts.n_heads for _, b in keys}
    chunk: list[tuple[Node, int]] = []
    for k, key in enumerate(keys):
        chunk.append(key)
        rows = sum(n_heads[b] + 2 for _, b in chunk)
        if k + 1 == len(keys) or rows + n_heads[keys[k + 1][1]] + 2 > max_rows:
            values = _frozen_rows(rrm, pixels, frozen, chunk, [checked[i] for key in chunk for i in groups[key]])
            for key in chunk:  # one [n_heads + 2] row per edge of the group: edge, direct, then each head
                for i in groups[key]:
                    s, t, b = checked[i]
                    v = values.pop(0)
                    results[i] = HeadLoadings(s, t, b, float(v[0]), float(v[1]), v[2:] - v[1])
            chunk = []
    return results


def _frozen_rows(
    rrm: ReplacementModelBase,
    pixels: Tensor,
    frozen: tuple[dict[str, Tensor], list[Any]],
    groups: list[tuple[Node, int]],
    edges: list[tuple[Node, Node | tuple[str, int], int]],
) -> list[Tensor]:
    """``rrm.intervene(freeze=True)``'s forward for a batch of copies of the image: row 0 clean, then per
    ``(source, block)`` group ``n_heads + 2`` rows with the source set to 0: every head open (the edge), every
    head of ``block`` holding row 0's clean ``hook_z`` (the direct part), then one head open each. Returns,
    per edge of ``edges`` (in the groups' order), its target's change per row: ``[n_heads + 2]`` float64."""
    from ..replacement.linearise import frozen_hooks, pre_capture_hooks

    model = rrm.model
    starts: dict[tuple[Node, int], int] = {}
    rows = 1
    removals: dict[int, list[tuple[int, int, int]]] = {}  # SAE layer -> (row, pos, feature)
    gates: dict[int, list[tuple[int, Tensor]]] = {}
    for source, block in groups:
        n = model.blocks[block].parts.n_heads
        starts[(source, block)] = rows
        removals.setdefault(source[0], []).extend((r, source[1], source[2]) for r in range(rows, rows + n + 2))
        gates.setdefault(block, []).append((rows, torch.cat([torch.ones(1, n), torch.zeros(1, n), torch.eye(n)])))
        rows += n + 2
    batch = pixels.expand(rows, -1, -1, -1)

    def remove(a: Tensor, hook: Any, idx: Tensor) -> Tensor:
        a = a.clone()
        a[idx[:, 0], idx[:, 1], idx[:, 2]] = 0
        return a

    def gate_heads(z: Tensor, hook: Any, gate: Tensor) -> Tensor:
        return z[:1] + gate.to(z.dtype)[:, None, :, None] * (z - z[:1])

    hooks = pre_capture_hooks(model) + frozen_hooks(model, frozen[0])
    for layer, idx in removals.items():
        hook = functools.partial(remove, idx=torch.tensor(idx, device=pixels.device))
        hooks.append((sae_acts(resid_post(layer)), hook))
    for block, parts in gates.items():
        gate = torch.ones(rows, model.blocks[block].parts.n_heads, device=pixels.device, dtype=pixels.dtype)
        for start, mask in parts:
            gate[start : start + len(mask)] = mask.to(gate)
        hooks.append((f"blocks.{block}.attn.hook_z", functools.partial(gate_heads, gate=gate)))
    t_layers = sorted({t[0] for _, t, _ in edges if t[0] != "output"})
    t_inputs = {layer: f"{rrm.sae_at(layer).cfg.metadata.hook_name}.hook_sae_input" for layer in t_layers}
    with contextlib.ExitStack() as stack:
        for sae, norm in zip(rrm.saes, frozen[1], strict=True):
            stack.enter_context(affine.frozen_normalisation(sae, norm))
        stack.enter_context(rrm.spliced(keep_errors=True))
        stack.enter_context(model.hooks(fwd_hooks=hooks))
        names = set(t_inputs.values()) | {"hook_out"}  # never an empty filter
        out, cache = model.run_with_cache(batch, names_filter=lambda n: n in names, return_cache_object=False)
    pre = {layer: affine.pre_acts(rrm.sae_at(layer), cache[name], frozen[1][rrm.slot(layer)])
           for layer, name in t_inputs.items()}  # fmt: skip
    values = []
    for source, target, block in edges:
        sel = slice(starts[(source, block)], starts[(source, block)] + model.blocks[block].parts.n_heads + 2)
        if target[0] == "output":
            direction = -torch.full_like(out[0], 1.0 / out.shape[-1])
            direction[int(target[1])] += 1.0
            v = (out[:1] - out[sel]) @ direction
        else:
            p = pre[target[0]]
            v = p[0, target[1], target[2]] - p[sel, target[1], target[2]]
        values.append(v.double())
    return values


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
    return qk_attribution_many(rrm, pixels, [(block, head, query, key)], atol=atol)[0]


def qk_refusal(rrm: ReplacementModelBase, block: int) -> str | None:
    """Why ``block``'s scores cannot be split into feature pairs here (``None``: they can)."""
    if block - 1 not in rrm.layers:
        return (
            f"block={block} reads the residual after block {block - 1}, which has no SAE here (SAE layers "
            f"{rrm.layers}); pick a block right after an SAE layer."
        )
    if rrm.model.blocks[block].parts.q_norm is not None or f"blocks.{block}.attn.hook_rot_q" in rrm.model.hook_dict:
        return (
            f"block {block} applies a per-head q/k norm or rotary embeddings: its scores are not bilinear in the "
            "residual stream, so they cannot be split into feature pairs."
        )
    return None


@torch.no_grad()
def qk_attribution_many(
    rrm: ReplacementModelBase,
    pixels: Float[Tensor, "1 chan h w"],
    entries: Sequence[tuple[int, int, int, int]],
    *,
    atol: float | None = None,
) -> list[QKAttribution]:
    """:func:`qk_attribution` of each ``(block, head, query, key)``, in order, from one recorded forward."""
    _one_image(pixels, "qk_attribution")
    model = rrm.model
    for block, head, query, key in entries:
        reason = qk_refusal(rrm, block)
        if reason is not None:
            raise ValueError(reason)
        n = model.blocks[block].parts.n_heads
        if not 0 <= head < n:
            raise ValueError(f"head={head} is out of range: block {block} has {n} heads (0..{n - 1}).")
        _check_position(rrm, query, "query")
        _check_position(rrm, key, "key")
    blocks = sorted({e[0] for e in entries})
    x_names = {b: f"{rrm.sae_at(b - 1).cfg.metadata.hook_name}.hook_sae_input" for b in blocks}
    score_names = {b: f"blocks.{b}.attn.hook_attn_scores" for b in blocks}
    # the values the rest of the linearisation freezes (every norm's scale hooked, as in rrm.intervene)
    frozen, _, _, cache = rrm.recorded_forward(pixels, sorted(set(x_names.values()) | set(score_names.values())))
    out = []
    for e in entries:
        x, scale = cache[x_names[e[0]]][0], frozen[f"blocks.{e[0]}.ln1.hook_scale"][0]
        out.append(_qk(rrm, e, x, scale, cache[score_names[e[0]]], atol=atol))
    return out


def _qk(
    rrm: ReplacementModelBase,
    entry: tuple[int, int, int, int],
    x: Float[Tensor, "pos d_model"],
    ln_scale: Float[Tensor, "pos 1"],
    scores: Tensor,
    *,
    atol: float | None,
) -> QKAttribution:
    """One entry's split from the recorded SAE input ``x`` of layer ``block - 1`` and ``block``'s ln1 scale."""
    block, head, query, key = entry
    model, sae = rrm.model, rrm.sae_at(block - 1)
    parts = model.blocks[block].parts
    score = float(scores[0, head, query, key])
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


__all__ = [
    "HeadLoadings",
    "QKAttribution",
    "head_loadings",
    "head_loadings_many",
    "qk_attribution",
    "qk_attribution_many",
    "qk_refusal",
]
