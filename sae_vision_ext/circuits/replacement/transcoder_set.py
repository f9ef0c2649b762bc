"""Transcoders as the transcoder replacement model (`transcoder.py`) sees them: transcoders replace
MLPs. Either per-layer transcoders (SAELens ``Transcoder``, ``SkipTranscoder``, ``JumpReLUTranscoder``,
``JumpReLUSkipTranscoder`` and subclasses such as a TopK transcoder; any subset of blocks, at most one
per block) or one cross-layer transcoder (``saes/clt.py``: every block's encoder, decoders to that
block and every later one).

Contracts:

- Block ``l``'s encoder reads ``blocks.{l}.ln2.hook_normalized`` or ``blocks.{l}.hook_resid_mid``
  (``cfg.metadata.hook_name``; a CLT's ``cfg.hook_in``); outputs replace ``blocks.{j}.hook_mlp_out``
  (``cfg.metadata.hook_name_out``). The replaced MLP output of block ``j`` is
  ``ŷ_j = Σ_{i<=j} a_i @ W_dec[i→j] + b_dec_j (+ skip_j(x_j)) + e_j`` (a per-layer transcoder has only
  ``i = j``), with the *error* ``e_j = mlp_out_j − ŷ_j`` without it: kept, the output is the clean model's.
- A block without a transcoder output keeps its MLP; in the attribution graph its whole MLP output is
  that block's error node (nothing inside an MLP is linearised: :class:`TranscoderSet`).
- Active features equal their pre-activation ``h = x @ W_enc + b_enc`` (ReLU, JumpReLU, TopK); input
  normalisation must be the identity (``normalize_activations`` ``none`` and SAELens's other identity
  settings) and decoder-norm rescaling off; anything else raises ``ValueError``.
- Per-layer lists here follow ``layers`` (encoder blocks, ascending); arguments name blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ...models.splicing import warn_if_trained_on_another_model
from ...saes.affine import IDENTITY_NORMS

if TYPE_CHECKING:
    from sae_lens import SAE

    from ...models.hooked_vit import HookedViT
    from ...saes.clt import CrossLayerTranscoder

INPUT_HOOKS = ("ln2.hook_normalized", "hook_resid_mid")
"""What a transcoder of block ``l`` may read: ``blocks.{l}.<one of these>``."""
OUTPUT_HOOK = "hook_mlp_out"
"""What it writes: ``blocks.{l}.hook_mlp_out``."""


def _parse(hook: str, allowed: Sequence[str]) -> tuple[int, str] | None:
    parts = hook.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2] in allowed:
        return int(parts[1]), parts[2]
    return None


def is_clt(obj: object) -> bool:
    """Whether ``obj`` is a cross-layer transcoder (``saes/clt.py``'s interface: per-layer encode and decode)."""
    return all(hasattr(obj, name) for name in ("encode_layer", "decode_layer", "pre_acts_layer", "W_dec"))


class TranscoderSet:
    """Per-layer transcoders or one CLT, seen uniformly: encoders per block of ``layers``, decoder
    outputs per block of ``out_layers``, each with its bias and optional linear skip."""

    def __init__(self, model: HookedViT, transcoders: Any) -> None:
        n_blocks, d = model.cfg.n_layers, model.cfg.d_model
        items = list(transcoders.values()) if isinstance(transcoders, dict) else transcoders
        items = [items] if is_clt(items) else list(items)
        if not items:
            raise ValueError(
                "TranscoderReplacementModel needs at least one transcoder (or one cross-layer transcoder)."
            )
        clts = [t for t in items if is_clt(t)]
        self.clt: CrossLayerTranscoder | None = None
        self.by_layer: dict[int, SAE] = {}
        if clts:
            if len(items) != 1:
                raise ValueError(
                    f"Pass one cross-layer transcoder alone; got {len(clts)} CLT(s) among {len(items)} transcoders "
                    "(a CLT already replaces every block's MLP; per-layer transcoders cannot be added to it)."
                )
            self._check_clt(model, clts[0])
            self.clt = clts[0]
            self.layers = list(range(n_blocks))
            self.hook_kind = {layer: self.clt.cfg.hook_in for layer in self.layers}
        else:
            self.hook_kind = {}
            for tc in items:
                layer, kind = self._check_transcoder(model, tc, d)
                if layer in self.by_layer:
                    raise ValueError(f"Two transcoders for block {layer}; pass one per block.")
                self.by_layer[layer], self.hook_kind[layer] = tc, kind
            self.layers = sorted(self.by_layer)
        self.out_layers: list[int] = list(self.layers)
        """Blocks whose MLP output is replaced (a CLT: every block)."""

    @staticmethod
    def _check_transcoder(model: HookedViT, tc: Any, d_model: int) -> tuple[int, str]:
        from sae_lens.saes.transcoder import Transcoder

        if not isinstance(tc, Transcoder):
            raise ValueError(
                f"TranscoderReplacementModel takes SAELens transcoders (Transcoder, SkipTranscoder, JumpReLU and "
                f"TopK variants) or one CrossLayerTranscoder; got {type(tc).__name__}. Residual-stream SAEs go to "
                "ResidualReplacementModel."
            )
        meta = tc.cfg.metadata
        hook_in, hook_out = meta.hook_name or "", getattr(meta, "hook_name_out", None) or ""
        parsed = _parse(hook_in, INPUT_HOOKS)
        if parsed is None or parsed[0] >= model.cfg.n_layers:
            raise ValueError(
                f"A transcoder reads {hook_in!r}; supported: blocks.L.ln2.hook_normalized or blocks.L.hook_resid_mid "
                f"with L < {model.cfg.n_layers} (cfg.metadata.hook_name)."
            )
        layer = parsed[0]
        if hook_out != f"blocks.{layer}.{OUTPUT_HOOK}":
            raise ValueError(
                f"The transcoder reading {hook_in!r} writes {hook_out!r}; it must write blocks.{layer}.{OUTPUT_HOOK} "
                "(cfg.metadata.hook_name_out): an MLP's replacement."
            )
        if tc.cfg.d_in != d_model or tc.cfg.d_out != d_model:
            raise ValueError(
                f"Transcoder of block {layer} has d_in={tc.cfg.d_in}, d_out={tc.cfg.d_out}; the model's d_model is "
                f"{d_model}."
            )
        norm = tc.cfg.normalize_activations
        if norm not in IDENTITY_NORMS or getattr(tc.cfg, "rescale_acts_by_decoder_norm", False):
            raise ValueError(
                f"Transcoder of block {layer}: normalize_activations={norm!r} / rescale_acts_by_decoder_norm are not "
                f"linearised for transcoders; supported: normalize_activations in {list(IDENTITY_NORMS)}, no "
                "rescaling (fold them into the weights)."
            )
        warn_if_trained_on_another_model(tc, model)
        return layer, parsed[1]

    @staticmethod
    def _check_clt(model: HookedViT, clt: CrossLayerTranscoder) -> None:
        cfg = clt.cfg
        if cfg.n_layers != model.cfg.n_layers or cfg.d_in != model.cfg.d_model or cfg.d_output != model.cfg.d_model:
            raise ValueError(
                f"The CLT has n_layers={cfg.n_layers}, d_in={cfg.d_in}, d_out={cfg.d_output}; the model has "
                f"{model.cfg.n_layers} blocks of width {model.cfg.d_model} (a CLT spans every block)."
            )
        if cfg.hook_in not in INPUT_HOOKS or cfg.hook_out != OUTPUT_HOOK:
            raise ValueError(
                f"CLT hooks {cfg.hook_in!r} -> {cfg.hook_out!r}; supported: {list(INPUT_HOOKS)} -> {OUTPUT_HOOK!r}."
            )
        warn_if_trained_on_another_model(clt, model)

    # ---- per-block views
    def hook_in(self, layer: int) -> str:
        return f"blocks.{layer}.{self.hook_kind[layer]}"

    def hook_out(self, layer: int) -> str:
        return f"blocks.{layer}.{OUTPUT_HOOK}"

    def normalized_input(self, layer: int) -> bool:
        """Whether block ``layer``'s encoder reads ``ln2``'s output (else ``resid_mid``)."""
        return self.hook_kind[layer] == "ln2.hook_normalized"

    def d_sae(self, layer: int) -> int:
        return self.clt.cfg.d_sae if self.clt is not None else self.by_layer[layer].cfg.d_sae

    def hook_names(self) -> list[str]:
        """The transcoders' input hooks (circuit-tracer's ``transcoder_list``)."""
        return [self.hook_in(layer) for layer in self.layers]

    def modules(self) -> list[torch.nn.Module]:
        return [self.clt] if self.clt is not None else [self.by_layer[layer] for layer in self.layers]

    def dtype(self) -> torch.dtype:
        return next(self.modules()[0].parameters()).dtype

    def pre_acts(self, layer: int, x: Tensor) -> Tensor:
        """``h = x @ W_enc + b_enc`` of block ``layer``'s encoder (affine, differentiable)."""
        if self.clt is not None:
            return self.clt.pre_acts_layer(x, layer)
        tc = self.by_layer[layer]
        return x.to(tc.W_enc.dtype) @ tc.W_enc + tc.b_enc

    def encode(self, layer: int, x: Tensor) -> Tensor:
        """Block ``layer``'s feature activations (the transcoder's own ``encode``)."""
        if self.clt is not None:
            return self.clt.encode_layer(x, layer)
        return self.by_layer[layer].encode(x)

    def encoder_cols(self, layer: int, feats: Tensor) -> Tensor:
        """``∂h_f/∂x`` of features ``feats``: ``[len(feats), d_in]``."""
        if self.clt is not None:
            return self.clt.W_enc[layer][feats]
        return self.by_layer[layer].W_enc[:, feats].T

    def decoder_rows(self, source: int, out: int, feats: Tensor) -> Tensor:
        """Rows of ``W_dec[source→out]`` of features ``feats`` of block ``source``: ``[len(feats), d_out]``."""
        if self.clt is not None:
            return self.clt.W_dec[source][feats, out - source]
        if source != out:
            raise ValueError(f"A per-layer transcoder of block {source} writes block {source} only, not {out}.")
        return self.by_layer[source].W_dec[feats]

    def sources_of(self, out: int) -> list[int]:
        """Encoder blocks whose features write block ``out``'s MLP output."""
        if self.clt is not None:
            return list(range(out + 1))
        return [out] if out in self.by_layer else []

    def b_dec(self, out: int) -> Tensor:
        return self.clt.b_dec[out] if self.clt is not None else self.by_layer[out].b_dec

    def skip_matrix(self, out: int) -> Tensor | None:
        """``M`` with ``skip_j(x) = x @ M`` (``[d_in, d_out]``), ``None`` without a skip connection."""
        if self.clt is not None:
            return None if self.clt.W_skip is None else self.clt.W_skip[out]
        w = getattr(self.by_layer[out], "W_skip", None)
        return None if w is None else w.T

    def decode(self, out: int, acts: dict[int, Tensor], x: Tensor) -> Tensor:
        """Block ``out``'s replaced MLP output from the activations ``acts`` (by encoder block) and
        its input ``x`` (for the skip), without the error term."""
        y = self.b_dec(out) + sum(acts[i] @ self.decoder_rows_all(i, out) for i in self.sources_of(out))
        skip = self.skip_matrix(out)
        return y if skip is None else y + x.to(skip.dtype) @ skip

    def decoder_rows_all(self, source: int, out: int) -> Tensor:
        """``W_dec[source→out]``: ``[d_sae, d_out]``."""
        if self.clt is not None:
            return self.clt.W_dec[source][:, out - source]
        return self.by_layer[source].W_dec


Edit = Callable[[int, Tensor], Tensor]
"""``edit(block, acts [batch, pos, d_sae]) -> acts``: changes a block's feature activations in a forward."""


def splice_hooks(
    tcs: TranscoderSet,
    *,
    layers: Sequence[int] | None = None,
    errors: bool | dict[int, Tensor | bool] = True,
    edit: Edit | None = None,
    record: dict[str, dict[int, Tensor]] | None = None,
) -> list[tuple[str, Callable]]:
    """Forward hooks splicing the transcoders in: each encoder block's input is captured, and the MLP
    output of each block of ``layers`` (default ``tcs.out_layers``) is replaced by the decoded features
    (after ``edit``) plus an error term, per block of ``errors`` (a bool: the same for every block):
    ``True`` this forward's own error (``mlp_out − decode`` of the unedited features: SAELens's
    ``use_error_term``), ``False`` or missing none, a tensor ``[.., pos, d]`` that fixed error.
    ``record`` (if given) receives ``inputs``, ``acts`` (after edits) and ``errors`` by block."""
    out_layers = list(tcs.out_layers if layers is None else layers)
    state: dict[str, dict[int, Tensor]] = {"inputs": {}, "acts": {}, "clean": {}, "errors": {}}

    def capture(t: Tensor, hook: Any, layer: int) -> Tensor:
        if layer == tcs.layers[0]:  # a new forward
            for v in state.values():
                v.clear()
        state["inputs"][layer] = t
        clean = tcs.encode(layer, t)
        state["clean"][layer] = clean
        state["acts"][layer] = clean if edit is None else edit(layer, clean)
        return t

    def replace(t: Tensor, hook: Any, layer: int) -> Tensor:
        x = state["inputs"].get(layer, t)
        y = tcs.decode(layer, state["acts"], x).to(t.dtype)
        kind = errors if isinstance(errors, bool) else errors.get(layer, False)
        if kind is True:
            with torch.no_grad():
                err = t - tcs.decode(layer, state["clean"], x).to(t.dtype)
        elif kind is False:
            err = None
        else:
            err = kind.to(t.dtype).expand_as(t)
        if err is not None:
            state["errors"][layer] = err
            y = y + err
        if record is not None:
            for k in ("inputs", "acts", "errors"):
                record.setdefault(k, {}).update(state[k])
        return y

    hooks: list[tuple[str, Callable]] = [
        (tcs.hook_in(layer), lambda t, hook, layer=layer: capture(t, hook, layer)) for layer in tcs.layers
    ]
    hooks += [(tcs.hook_out(j), lambda t, hook, j=j: replace(t, hook, j)) for j in out_layers]
    return hooks
