"""The transcoder replacement model (circuit-tracer's kind, on ViTs): per-layer transcoders or one
cross-layer transcoder replace the MLPs (``transcoder_set.py``: which transcoders, their hooks, the
uniform encoder/decoder view, splicing).

Contracts (besides ``transcoder_set.py``'s):

- ``spliced()`` keeps every block's error term by default, so with no edit the output is the clean
  model's; ``keep_errors=False`` is the pure replacement model (blocks without a transcoder output
  keep their real MLP).
- ``intervene(freeze=True)`` holds attention patterns and LayerNorm scales at their clean values,
  every error term and the MLP output of every block without a transcoder at the traced image's (the
  graph's linearisation: ``engine/transcoder_attribution.py``);
  ``constrained_layers`` also hold those blocks' features at their clean values (circuit-tracer's
  ``constrained_layers``), so a change read at any later feature or the output is a sum of *direct*
  graph edges. ``freeze=False`` is the real model's response (errors recomputed per forward).
- Per-layer lists follow ``layers`` (encoder blocks); for a CLT, ``layers`` is every block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from ...saes.affine import FrozenNorm
from .base import ReplacementModelBase
from .transcoder_set import Edit, TranscoderSet, splice_hooks

if TYPE_CHECKING:
    from ...models.hooked_vit import HookedViT


@dataclass
class TranscoderRecord:
    """One clean forward of one image (every block's error kept, so the clean model's values)."""

    frozen: dict[str, Tensor]
    """Attention patterns and norm scales (``linearise.frozen_from_cache``)."""
    clean_out: Tensor
    """The model's output ``[1, d_out]``."""
    x_in: Tensor
    """``blocks.0.hook_resid_pre`` ``[pos, d_model]``: the embedding nodes."""
    inputs: dict[int, Tensor]
    """Each encoder block's transcoder input ``[pos, d_in]``."""
    acts: dict[int, Tensor]
    """Each encoder block's feature activations ``[pos, d_sae]``."""
    pre: dict[int, Tensor]
    """Their pre-activations ``h``."""
    mlp_out: dict[int, Tensor]
    """Every block's true MLP output ``[pos, d_model]``."""
    errors: dict[int, Tensor]
    """Every block's error ``mlp_out − transcoder output`` (a block without an output: its MLP output)."""


class TranscoderReplacementBase(ReplacementModelBase):
    """A ``HookedViT`` whose MLPs are replaced by transcoders (module docstring). It is a
    ``ReplacementModelBase`` for the evaluation code (``layers``, ``spliced``, ``reference_values``,
    ``feature_acts``, ``errors``, ``intervene``, ``faithfulness``), with transcoders where the residual
    kind has SAEs."""

    def __init__(self, model: HookedViT, transcoders: Any) -> None:
        self.model = model
        self.transcoders = TranscoderSet(model, transcoders)
        self.layers: list[int] = list(self.transcoders.layers)
        """Encoder blocks, ascending."""
        self.saes = self.transcoders.modules()
        """The per-layer transcoders in the order of ``layers`` (a CLT: ``[clt]``)."""

    @property
    def n_layers(self) -> int:
        """Number of encoder blocks (``len(layers)``)."""
        return len(self.layers)

    def sae_at(self, layer: int) -> Any:
        """The transcoder of block ``layer`` (a CLT for every block)."""
        return self.saes[0] if self.transcoders.clt is not None else self.saes[self.slot(layer)]

    @contextlib.contextmanager
    def spliced(
        self,
        layers: Sequence[int] | None = None,
        keep_errors: bool | Sequence[int] = False,
        error_values: dict[int, Tensor] | None = None,
        *,
        edit: Edit | None = None,
    ) -> Iterator[HookedViT]:
        """Context with the transcoder outputs of blocks ``layers`` (all if ``None``) replacing their MLP
        outputs. ``keep_errors``: ``True`` every replaced block keeps its own error term (this forward's
        ``mlp_out − decode``, SAELens's ``use_error_term``: with no edit the output is the model's),
        ``False`` none (the pure replacement model), or the blocks that keep theirs; ``error_values``:
        fixed ``{block: [pos, d_model]}`` errors instead (those blocks get an error either way).
        ``edit(block, acts) -> acts`` changes features in the forward."""
        tcs = self.transcoders
        layers = list(tcs.out_layers if layers is None else layers)
        error_values = dict(error_values or {})
        for name, blocks in (("layers", layers), ("error_values", list(error_values))):
            unknown = sorted(set(blocks) - set(layers if name == "error_values" else tcs.out_layers))
            if unknown:
                raise ValueError(
                    f"{name} names blocks {unknown} that are not replaced; the transcoder blocks are {tcs.out_layers}."
                )
        keep = set(layers) if keep_errors is True else set() if keep_errors is False else set(keep_errors)
        errors: dict[int, Tensor | bool] = {j: j in keep for j in layers} | error_values
        with self.model.hooks(fwd_hooks=splice_hooks(tcs, layers=layers, errors=errors, edit=edit)):
            yield self.model

    @contextlib.contextmanager
    def editing(self, edit: Callable[[int, Tensor], Tensor]) -> Iterator[HookedViT]:
        """Context with every transcoder spliced, error terms kept (each forward's own), and each encoder
        block's features passed through ``edit(slot, acts)`` (``slot``: index in ``layers``)."""
        with self.spliced(keep_errors=True, edit=lambda layer, acts: edit(self.slot(layer), acts)):
            yield self.model

    @torch.no_grad()
    def record(self, pixels: Float[Tensor, "1 chan h w"], names: Sequence[str] = ()) -> TranscoderRecord:
        """The clean forward of one image (``TranscoderRecord``); ``names``: extra hooks to cache
        (returned in ``rec.frozen`` under their own names is avoided: see ``recorded_forward``)."""
        from .linearise import frozen_from_cache, frozen_names

        model, tcs = self.model, self.transcoders
        mlp = [f"blocks.{j}.hook_mlp_out" for j in range(model.cfg.n_layers)]
        wanted = set(frozen_names(model)) | {"blocks.0.hook_resid_pre", *names}
        rec: dict[str, dict[int, Tensor]] = {}
        true_mlp: dict[int, Tensor] = {}

        def grab(t: Tensor, hook: Any, j: int) -> Tensor:
            true_mlp[j] = t
            return t

        hooks = [(name, lambda t, hook, j=j: grab(t, hook, j)) for j, name in enumerate(mlp)]
        hooks += splice_hooks(tcs, errors=True, record=rec)
        with model.hooks(fwd_hooks=hooks):
            out, cache = model.run_with_cache(pixels, names_filter=lambda n: n in wanted, return_cache_object=False)
        self._last_cache = {n: cache[n] for n in names}
        acts = {layer: rec["acts"][layer][0] for layer in tcs.layers}
        errors = {j: rec["errors"][j][0] if j in rec["errors"] else true_mlp[j][0] for j in range(len(mlp))}
        return TranscoderRecord(
            frozen=frozen_from_cache(model, cache),
            clean_out=out,
            x_in=cache["blocks.0.hook_resid_pre"][0],
            inputs={layer: rec["inputs"][layer][0] for layer in tcs.layers},
            acts=acts,
            pre={layer: tcs.pre_acts(layer, rec["inputs"][layer][0]) for layer in tcs.layers},
            mlp_out={j: true_mlp[j][0] for j in range(len(mlp))},
            errors=errors,
        )

    @torch.no_grad()
    def frozen_state(self, pixels: Float[Tensor, "1 chan h w"]) -> tuple[dict[str, Tensor], list[FrozenNorm]]:
        """The recorded attention patterns, norm scales and MLP gates of ``pixels``' clean forward; no
        transcoder input statistics are frozen (their normalisation is the identity): ``(frozen, [])``."""
        return self.record(pixels).frozen, []

    @torch.no_grad()
    def recorded_forward(
        self, pixels: Float[Tensor, "1 chan h w"], names: Sequence[str]
    ) -> tuple[dict[str, Tensor], list[FrozenNorm], Tensor, dict[str, Tensor]]:
        """``(frozen, [], output, cache)`` of one clean forward (error terms kept), as the base's."""
        rec = self.record(pixels, names)
        return rec.frozen, [], rec.clean_out, self._last_cache

    @torch.no_grad()
    def intervene(
        self,
        pixels: Tensor,
        interventions: Sequence[tuple[int, int | None, int, float]],
        freeze: bool = True,
        constrained_layers: Sequence[int] = (),
    ) -> dict[str, Any]:
        """Set features ``(block, position or None, feature, value)`` and run the spliced model (module
        docstring for ``freeze`` and ``constrained_layers``). Returns ``output``, ``clean_output`` and,
        per encoder block, ``feature_acts`` (after the edits) and ``feature_pre_acts`` (``h`` from each
        transcoder's input in this forward)."""
        from .linearise import frozen_hooks

        model, tcs, n_ctx = self.model, self.transcoders, self.model.cfg.n_ctx
        edits: dict[int, list[tuple[int | None, int, float]]] = {}
        for layer, pos, feat, value in interventions:
            if layer not in self.layers or not 0 <= feat < tcs.d_sae(layer):
                raise ValueError(
                    f"Intervention {(layer, pos, feat, value)} is out of range: the transcoder blocks are "
                    f"{self.layers}, features 0..d_sae-1."
                )
            if pos is not None and not -n_ctx <= pos < n_ctx:
                raise ValueError(f"Intervention {(layer, pos, feat, value)}: position {pos} is outside {n_ctx} tokens.")
            edits.setdefault(layer, []).append((pos, feat, float(value)))
        unknown = sorted(set(constrained_layers) - set(self.layers))
        if unknown:
            raise ValueError(
                f"constrained_layers {unknown} have no transcoder; the transcoder blocks are {self.layers}."
            )
        if freeze and pixels.shape[0] != 1:
            raise ValueError("freeze=True intervenes on one image at a time.")
        rec = self.record(pixels) if freeze else None  # every norm hooked: the graph's own values
        held: dict[int, Tensor] = {}
        if constrained_layers:
            acts = [rec.acts[layer][None] for layer in self.layers] if rec is not None else self.feature_acts(pixels)
            held = {layer: acts[self.slot(layer)] for layer in constrained_layers}

        def edit(layer: int, acts: Tensor) -> Tensor:
            acts = held[layer].to(acts.dtype).clone() if layer in held else acts.clone()
            for pos, feat, value in edits.get(layer, []):
                acts[:, slice(None) if pos is None else pos, feat] = value
            return acts

        record: dict[str, dict[int, Tensor]] = {}
        hooks: list = []
        errors: bool | dict[int, Tensor] = True
        if freeze:
            frozen = {k: v for k, v in rec.frozen.items() if not k.endswith("mlp.gate")}  # MLPs are replaced
            hooks = frozen_hooks(model, frozen)
            errors = {j: e[None] for j, e in rec.errors.items() if j in tcs.out_layers}
            held_mlp = [j for j in range(model.cfg.n_layers) if j not in tcs.out_layers]
            hooks += [(f"blocks.{j}.hook_mlp_out", lambda t, hook, v=rec.mlp_out[j]: v.expand_as(t)) for j in held_mlp]
        with torch.no_grad():
            clean = model(pixels)
        hooks += splice_hooks(tcs, errors=errors, edit=edit, record=record)
        with model.hooks(fwd_hooks=hooks):
            out = model(pixels)
        return {
            "output": out,
            "clean_output": clean,
            "feature_acts": [record["acts"][layer] for layer in self.layers],
            "feature_pre_acts": [tcs.pre_acts(layer, record["inputs"][layer]) for layer in self.layers],
        }

    @torch.no_grad()
    def feature_acts(self, pixels: Float[Tensor, "batch chan h w"]) -> list[Float[Tensor, "batch pos d_sae"]]:
        """Each encoder block's features on the clean model: ``[batch, pos, d_sae]`` per block."""
        tcs = self.transcoders
        names = [tcs.hook_in(layer) for layer in self.layers]
        _, cache = self.model.run_with_cache(pixels, names_filter=names, return_cache_object=False)
        return [tcs.encode(layer, cache[n]) for layer, n in zip(self.layers, names, strict=True)]

    @torch.no_grad()
    def errors(self, pixels: Float[Tensor, "batch chan h w"]) -> list[Float[Tensor, "batch pos d_model"]]:
        """Each transcoder output block's error ``mlp_out − transcoder output`` on the clean model, in
        the order of ``transcoders.out_layers``."""
        record: dict[str, dict[int, Tensor]] = {}
        with self.model.hooks(fwd_hooks=splice_hooks(self.transcoders, errors=True, record=record)):
            self.model(pixels)
        return [record["errors"][j] for j in self.transcoders.out_layers]
