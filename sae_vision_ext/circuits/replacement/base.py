"""The residual replacement model (Kim et al. 2025, "Interpreting vision transformers via residual
replacement model"): SAEs on ``blocks.{l}.hook_resid_post`` replace the residual stream with sparse
features.

Contracts:

- The SAE layers are any non-empty set of blocks (``rrm.layers``, ascending): every block, as in the
  position-resolved graphs, or blocks ``0..L-2`` as the seed paper sets it up (no SAE after the last
  block: its computation folds into the edges to the output). The residual between SAE layers is
  carried through the (frozen, when linearised) blocks in between.
- Per-layer lists returned here (``feature_acts``, ``reference_values``, ``errors``, ``frozen_state``)
  follow ``rrm.layers``: entry ``i`` belongs to block ``rrm.layers[i]`` (``rrm.slot(layer)`` maps back).
  Arguments that name layers (``spliced``, ``intervene``) take block numbers.
- Layers are spliced in order; splicing layer ``l`` replaces ``resid_post_l`` (hence
  ``resid_pre_{l+1}``) by the SAE's reconstruction, so errors compound with each spliced layer.
- With the error term kept at a layer, its output equals the clean residual (the error is the
  clean-run difference, fixed, without gradient, as SAELens does); the pure replacement model keeps
  no error term anywhere.
- Reference values (for ablations and circuit evaluation) are per (layer, position, feature):
  ``zero``, ``mean`` or ``median`` of the feature's activation over a reference image set; error
  terms can be replaced by reference errors the same way (``spliced(error_values=...)``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from ..._hooks import resid_post, sae_acts, sae_error
from ...models.splicing import warn_if_trained_on_another_model
from ...saes import affine
from ...saes.affine import FrozenNorm

if TYPE_CHECKING:
    from sae_lens import SAE

    from ...models.hooked_vit import HookedViT

Reference = Literal["zero", "mean", "median"]


def reduce_reference(values: Tensor, kind: str, dim: int = 0) -> Tensor:
    """The ``zero``, ``mean`` or ``median`` (:data:`Reference`) of ``values`` over ``dim``: the one
    definition of a reference value (features, errors and raw residual neurons alike)."""
    if kind == "zero":
        return torch.zeros_like(values.select(dim, 0))
    if kind == "mean":
        return values.mean(dim)
    if kind == "median":
        return values.median(dim).values
    raise ValueError(f"Unknown reference {kind!r}; valid: zero, mean, median.")


class ReplacementModelBase:
    """A ``HookedViT`` with SAEs at ``blocks.{l}.hook_resid_post`` for the blocks ``rrm.layers``."""

    def __init__(self, model: HookedViT, saes: Sequence[SAE] | dict[int, SAE]) -> None:
        saes = list(saes.values()) if isinstance(saes, dict) else list(saes)
        if not saes:
            raise ValueError("ResidualReplacementModel needs at least one SAE on blocks.L.hook_resid_post.")
        by_layer: dict[int, SAE] = {}
        for sae in saes:
            hook = sae.cfg.metadata.hook_name or ""
            parts = hook.split(".")
            if len(parts) != 3 or parts[0] != "blocks" or parts[2] != "hook_resid_post" or not parts[1].isdigit():
                raise ValueError(
                    f"Residual replacement needs SAEs on blocks.L.hook_resid_post; got {hook!r}. "
                    "Set sae.cfg.metadata.hook_name (load_sae(..., hook_name=...))."
                )
            layer = int(parts[1])
            if layer in by_layer:
                raise ValueError(f"Two SAEs for layer {layer} ({hook!r}); pass one per layer.")
            if not 0 <= layer < model.cfg.n_layers:
                raise ValueError(f"SAE hook {hook!r} is past the model's {model.cfg.n_layers} blocks.")
            if sae.cfg.d_in != model.cfg.d_model:
                raise ValueError(
                    f"SAE of layer {layer} has d_in={sae.cfg.d_in}, the model's d_model is {model.cfg.d_model}."
                )
            warn_if_trained_on_another_model(sae, model)
            by_layer[layer] = sae
        self.model = model
        self.layers: list[int] = sorted(by_layer)
        """Blocks with an SAE, ascending."""
        self.saes = [by_layer[layer] for layer in self.layers]
        """The SAEs in the order of ``layers``."""

    @property
    def n_layers(self) -> int:
        """Number of SAE layers (``len(rrm.layers)``; the model's block count is ``model.cfg.n_layers``)."""
        return len(self.saes)

    def slot(self, layer: int) -> int:
        """Index of block ``layer`` in ``rrm.layers`` (and in every per-layer list); ``ValueError`` if it
        has no SAE."""
        try:
            return self.layers.index(int(layer))
        except ValueError:
            raise ValueError(f"Layer {layer} has no SAE; the SAE layers are {self.layers}.") from None

    def sae_at(self, layer: int) -> SAE:
        """The SAE at block ``layer``."""
        return self.saes[self.slot(layer)]

    @contextlib.contextmanager
    def spliced(
        self,
        layers: Sequence[int] | None = None,
        keep_errors: bool | Sequence[int] = False,
        error_values: dict[int, Tensor] | None = None,
    ) -> Iterator[HookedViT]:
        """Context with the SAEs of blocks ``layers`` (all SAE layers if ``None``) spliced in. ``keep_errors``: ``True``
        for every spliced layer, ``False`` for none, or the layers that keep theirs.
        ``error_values``: ``{layer: [pos, d_model]}`` error terms to use instead of the image's own (for
        example ``reference_values(..., of="errors")``); those layers get an error term either way."""
        layers = list(self.layers if layers is None else layers)
        for layer in layers:
            self.slot(layer)  # ValueError naming the SAE layers
        keep = set(layers) if keep_errors is True else set() if keep_errors is False else set(keep_errors)
        error_values = error_values or {}
        unknown = sorted(set(error_values) - set(layers))
        if unknown:
            raise ValueError(f"error_values given for layers {unknown} that are not spliced ({layers}).")
        hooks = [
            (sae_error(resid_post(layer)), lambda t, hook, v=v: v.to(t.dtype).expand_as(t))
            for layer, v in error_values.items()
        ]
        try:
            for layer in layers:
                use_error = layer in keep or layer in error_values
                self.model.add_sae(self.sae_at(layer), use_error_term=use_error, check_model_name=False)
            with self.model.hooks(fwd_hooks=hooks):
                yield self.model
        finally:
            self.model.reset_saes([self.sae_at(layer).cfg.metadata.hook_name for layer in layers])

    @contextlib.contextmanager
    def editing(self, edit: Callable[[int, Tensor], Tensor]) -> Iterator[HookedViT]:
        """Context with every SAE spliced, error terms kept, and each layer's feature activations
        ``[batch, pos, d_sae]`` passed through ``edit(slot, acts)`` (``slot``: index in ``layers``): what
        circuit evaluation patches. Every replacement kind implements it."""
        hooks = [(sae_acts(resid_post(layer)), lambda a, hook, i=i: edit(i, a)) for i, layer in enumerate(self.layers)]
        with self.spliced(keep_errors=True), self.model.hooks(fwd_hooks=hooks):
            yield self.model

    @torch.no_grad()
    def frozen_state(self, pixels: Float[Tensor, "1 chan h w"]) -> tuple[dict[str, Tensor], list[FrozenNorm]]:
        """Everything the frozen linearisation holds fixed for one image, from one clean forward (every
        SAE spliced with its error term, so the clean model's values): the recorded attention
        patterns, LayerNorm scales and MLP gates (``linearise.record``), and each SAE's input
        normalisation at its clean statistics (``saes.affine.frozen_norm``), per layer."""
        frozen, norms, _, _ = self.recorded_forward(pixels, [])
        return frozen, norms

    @torch.no_grad()
    def recorded_forward(
        self, pixels: Float[Tensor, "1 chan h w"], names: Sequence[str]
    ) -> tuple[dict[str, Tensor], list[FrozenNorm], Tensor, dict[str, Tensor]]:
        """``frozen_state(pixels)`` plus, from the same forward (every SAE spliced, error terms kept),
        the output and the activations at the hook points ``names``: ``(frozen, norms, output, cache)``."""
        from .linearise import frozen_from_cache, frozen_names

        inputs = [f"{sae.cfg.metadata.hook_name}.hook_sae_input" for sae in self.saes]
        wanted = set(frozen_names(self.model)) | set(inputs) | set(names)
        with self.spliced(keep_errors=True):
            out, cache = self.model.run_with_cache(
                pixels, names_filter=lambda n: n in wanted, return_cache_object=False
            )
        norms = [affine.frozen_norm(sae, cache[n][0]) for sae, n in zip(self.saes, inputs, strict=True)]
        return frozen_from_cache(self.model, cache), norms, out, {n: cache[n] for n in names}

    @torch.no_grad()
    def intervene(
        self, pixels: Tensor, interventions: Sequence[tuple[int, int | None, int, float]], freeze: bool = True
    ) -> dict[str, Any]:
        """Set features to values and run the model with every SAE spliced (error terms kept, so only
        the interventions change anything).

        ``interventions``: ``(layer, position or None for all positions, feature, new_value)``.
        ``freeze=True`` holds attention patterns, LayerNorm scales, MLP gates and every SAE's input
        normalisation (``saes/affine.py``) at their clean values (the linearised response, under which
        changes follow the attribution graph's edges exactly); ``freeze=False`` gives the real model's
        response. Returns ``output``, ``clean_output`` and, per layer, ``feature_acts`` after the
        intervention and ``feature_pre_acts``: the pre-activation ``h`` that an active feature's
        activation equals (``saes.affine.pre_acts``: decoder-norm rescaling and the gated magnitude
        path included), from each SAE's input in this forward.
        """
        from .linearise import frozen_hooks, pre_capture_hooks

        model = self.model
        edits: dict[int, list[tuple[int | None, int, float]]] = {}
        n_ctx = model.cfg.n_ctx
        for layer, pos, feat, value in interventions:
            if layer not in self.layers or not 0 <= feat < self.sae_at(layer).cfg.d_sae:
                raise ValueError(
                    f"Intervention {(layer, pos, feat, value)} is out of range: the SAE layers are "
                    f"{self.layers}, features 0..d_sae-1."
                )
            if pos is not None and not -n_ctx <= pos < n_ctx:
                raise ValueError(
                    f"Intervention {(layer, pos, feat, value)}: position {pos} is outside the {n_ctx} tokens "
                    "(token order: prefix tokens, then patches row-major); use None for every position."
                )
            edits.setdefault(layer, []).append((pos, feat, float(value)))
        _warn_inactive(self, pixels, edits)

        def edit(acts: Tensor, hook: Any, layer: int) -> Tensor:
            acts = acts.clone()
            for pos, feat, value in edits[layer]:
                acts[:, slice(None) if pos is None else pos, feat] = value
            return acts

        hooks = [(sae_acts(resid_post(layer)), lambda a, hook, layer=layer: edit(a, hook, layer)) for layer in edits]
        with contextlib.ExitStack() as stack:
            if freeze:
                if pixels.shape[0] != 1:
                    raise ValueError("freeze=True intervenes on one image at a time.")
                frozen, norms = self.frozen_state(pixels)
                hooks = pre_capture_hooks(model) + frozen_hooks(model, frozen) + hooks
                for sae, norm in zip(self.saes, norms, strict=True):
                    stack.enter_context(affine.frozen_normalisation(sae, norm))
            stack.enter_context(self.spliced(keep_errors=True))
            clean = model(pixels)
            names = [f"{s.cfg.metadata.hook_name}.hook_sae_{k}" for s in self.saes for k in ("input", "acts_post")]
            with model.hooks(fwd_hooks=hooks):
                out, cache = model.run_with_cache(pixels, names_filter=names, return_cache_object=False)
        inputs = [cache[f"{s.cfg.metadata.hook_name}.hook_sae_input"] for s in self.saes]
        pre = [
            affine.pre_acts(sae, x, norm if freeze else affine.frozen_norm(sae, x))
            for sae, x, norm in zip(self.saes, inputs, norms if freeze else inputs, strict=True)
        ]
        return {
            "output": out,
            "clean_output": clean,
            "feature_acts": [cache[sae_acts(s.cfg.metadata.hook_name)] for s in self.saes],
            "feature_pre_acts": pre,
        }

    @torch.no_grad()
    def feature_acts(self, pixels: Float[Tensor, "batch chan h w"]) -> list[Float[Tensor, "batch pos d_sae"]]:
        """Each layer's SAE features on the *clean* residual stream: ``[batch, pos, d_sae]`` per layer."""
        hooks = [s.cfg.metadata.hook_name for s in self.saes]
        _, cache = self.model.run_with_cache(pixels, names_filter=hooks, return_cache_object=False)
        return [sae.encode(cache[h]) for sae, h in zip(self.saes, hooks, strict=True)]

    @torch.no_grad()
    def reference_values(
        self, pixels: Float[Tensor, "n chan h w"], kind: str = "median", batch_size: int = 64, of: str = "features"
    ) -> list[Tensor]:
        """Per-position reference of every feature (``[pos, d_sae]`` per layer) or of each layer's
        SAE error vector (``of="errors"``: ``[pos, d_model]`` per layer), over ``pixels``. ``kind``:
        ``zero``, ``mean`` or ``median`` (:data:`Reference`), validated with a ``ValueError``."""
        reduce_reference(torch.zeros(1), kind)  # ValueError naming the valid kinds
        if of not in ("features", "errors"):
            raise ValueError(f"Unknown reference target {of!r}; valid: features, errors.")
        if len(pixels) == 0:
            raise ValueError(f"reference_values needs images to take the {kind} over; got 0. Pass reference images.")
        chunks = [pixels[i : i + batch_size] for i in range(0, len(pixels), batch_size)]
        acts = [self.feature_acts(x) if of == "features" else self.errors(x) for x in chunks]
        per_layer = [torch.cat([a[layer] for a in acts]) for layer in range(self.n_layers)]
        return [reduce_reference(a, kind) for a in per_layer]

    @torch.no_grad()
    def errors(self, pixels: Float[Tensor, "batch chan h w"]) -> list[Float[Tensor, "batch pos d_model"]]:
        """Each layer's SAE error ``resid_post − reconstruction`` on the clean stream: ``[batch, pos, d_model]``."""
        names = [sae_error(s.cfg.metadata.hook_name) for s in self.saes]
        _, cache = self.model.run_with_cache_with_saes(
            pixels, saes=self.saes, use_error_term=True, names_filter=names, return_cache_object=False
        )
        return [cache[n] for n in names]

    @torch.no_grad()
    def faithfulness(
        self,
        pixels: Float[Tensor, "n chan h w"],
        labels: Int[Tensor, " n"] | None = None,
        batch_size: int = 64,
        progress: bool = False,
    ) -> list[dict[str, Any]]:
        """The pure replacement model against the original, for the first ``n`` SAE layers spliced
        (``n = 1..len(layers)``, no error terms), so compounding error is visible (``progress``: a
        bar over ``n``).

        Per row: ``n_spliced``, ``top1_agreement``, ``kl`` (clean || spliced, for classifiers),
        ``cosine`` (of the outputs), and ``accuracy`` / ``accuracy_clean`` with labels.
        """
        from ...data.checks import check_images

        labels = check_images("faithfulness", pixels, labels, batch_size)
        chunks = [slice(i, i + batch_size) for i in range(0, len(pixels), batch_size)]
        clean = torch.cat([self.model(pixels[s]) for s in chunks])
        rows = []
        from tqdm.auto import tqdm

        for n in tqdm(range(1, self.n_layers + 1), desc="faithfulness", unit="layer", disable=not progress):
            with self.spliced(self.layers[:n]):
                out = torch.cat([self.model(pixels[s]) for s in chunks])
            row: dict[str, Any] = {
                "n_spliced": n,
                "top1_agreement": float((out.argmax(-1) == clean.argmax(-1)).float().mean()),
                "cosine": float(F.cosine_similarity(out.flatten(1), clean.flatten(1)).mean()),
            }
            if self.model.adapter.output_kind() == "logits":
                row["kl"] = float(
                    F.kl_div(F.log_softmax(out, -1), F.log_softmax(clean, -1), log_target=True, reduction="batchmean")
                )
            if labels is not None:
                row["accuracy"] = float((out.argmax(-1) == labels).float().mean())
                row["accuracy_clean"] = float((clean.argmax(-1) == labels).float().mean())
            rows.append(row)
        return rows


def _warn_inactive(rrm: ReplacementModelBase, pixels: Tensor, edits: dict[int, list]) -> None:
    """Setting a feature that is inactive everywhere on these images adds its decoder direction (a
    steering edit, not an ablation of something present): say so, once per feature."""
    import warnings

    wanted = [(layer, feat) for layer, items in edits.items() for _, feat, value in items if value != 0]
    if not wanted:
        return
    acts = dict(zip(rrm.layers, rrm.feature_acts(pixels), strict=True))
    for layer, feat in dict.fromkeys(wanted):
        if not acts[layer][..., feat].any():
            warnings.warn(
                f"Feature {feat} of layer {layer} is inactive on every token of these images: setting it adds its "
                "decoder direction (steering), it does not scale an existing activation.",
                UserWarning,
                stacklevel=3,
            )
