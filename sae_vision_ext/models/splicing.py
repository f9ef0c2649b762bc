"""Splicing SAELens SAEs (and transcoders) into a ``HookedViT``, as SAELens's HookedSAETransformer does.

``add_sae(sae)`` replaces the HookPoint at ``sae.cfg.metadata.hook_name`` by an :class:`SAESplice`
module whose hook points carry SAELens's names, so cache keys read
``blocks.3.hook_resid_post.hook_sae_input|acts_pre|acts_post|recons|error|output``.

Contracts:
- ``use_error_term=False``: the hook's output is the reconstruction ``decode(encode(x))``.
- ``use_error_term=True``: the output is ``reconstruction + error`` where
  ``error = x - decode(encode(x))`` is computed with the SAE's own hooks disabled and without
  gradient, so the clean forward is unchanged and an edit to a feature changes the output by
  exactly its decoded effect (the error term stays fixed). Gradients reach ``x`` only through
  the reconstruction.
- Transcoders (``metadata.hook_name_out`` set): the input hook is read, the output hook replaced.
- The SAE is not registered as a submodule (its parameters are not the model's; ``.to`` on the
  model does not move it).
"""

from __future__ import annotations

import contextlib
import difflib
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from .ids import same_model

if TYPE_CHECKING:
    from sae_lens import SAE

    from .hooked_vit import HookedViT


def _set_deep_attr(obj: Any, path: str, value: nn.Module) -> None:
    *parents, last = path.split(".")
    for part in parents:
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    setattr(obj, last, value)


def _get_deep_attr(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


@contextlib.contextmanager
def _hooks_disabled(points: Sequence[nn.Module]) -> Iterator[None]:
    saved = [(p, p._forward_hooks) for p in points]
    try:
        for p, _ in saved:
            p._forward_hooks = OrderedDict()
        yield
    finally:
        for p, hooks in saved:
            p._forward_hooks = hooks


class SAESplice(nn.Module):
    """Stands at an SAE's output hook; runs encode -> decode (+ error) with SAELens's hook names."""

    def __init__(self, sae: nn.Module, use_error_term: bool = False) -> None:
        super().__init__()
        self.__dict__["sae"] = sae
        for name, hook in sae.hook_dict.items():
            if name not in ("hook_sae_error", "hook_sae_output"):
                setattr(self, name, hook)
        self.hook_sae_error = HookPoint()
        self.hook_sae_output = HookPoint()
        self.use_error_term = use_error_term
        self._captured: Tensor | None = None

    def capture_input(self, x: Tensor) -> None:
        self._captured = x

    def forward(self, x: Tensor) -> Tensor:
        sae = self.sae
        sae_in = self._captured if self._captured is not None else x
        self._captured = None
        recon = sae.decode(sae.encode(sae_in)).to(x.dtype)  # an fp16 SAE on an fp32 model hands back fp32
        if self.use_error_term:
            with torch.no_grad():
                points = list(sae.hook_dict.values())
                if any(p._forward_hooks for p in points):
                    with _hooks_disabled(points):
                        clean = sae.decode(sae.encode(sae_in)).to(x.dtype)
                else:
                    clean = recon
                error = self.hook_sae_error(x - clean)
            recon = recon + error
        return self.hook_sae_output(recon)


class SAESplicingMixin:
    """Methods for splicing SAEs into a ``HookedRootModule`` with ``hook_dict`` and ``setup()``."""

    def _splices(self) -> dict[str, SAESplice]:
        if "_sae_splices" not in self.__dict__:
            self.__dict__["_sae_splices"] = {}
        return self.__dict__["_sae_splices"]

    def acts_to_saes(self) -> dict[str, nn.Module]:
        """Input hook name -> attached SAE."""
        return {name: s.sae for name, s in self._splices().items()}

    def _hook_width(self, name: str) -> int:
        cache = self.__dict__.setdefault("_hook_shape_cache", {})
        if not cache:
            with self.saes_suspended():
                cache.update(self.hook_shapes(batch_size=1))
        return cache[name][-1]

    @contextlib.contextmanager
    def saes_suspended(self) -> Iterator[None]:
        """Temporarily detach every SAE (restored afterwards, same settings)."""
        saved = [(s.sae, s.use_error_term) for s in self._splices().values()]
        self.reset_saes()
        try:
            yield
        finally:
            for sae, err in saved:
                self.add_sae(sae, use_error_term=err, check_model_name=False)

    def check_sae(self, sae: nn.Module) -> str:
        """``sae``'s hook name after checking it fits this model: ``ValueError`` when it has no
        ``cfg.metadata.hook_name``, the hook is not a hook point here (close names listed) or its ``d_in``
        differs from the hook's width. Everything that reads an SAE at its hook calls this first."""
        meta = getattr(getattr(sae, "cfg", None), "metadata", None)
        hook_in = getattr(meta, "hook_name", None)
        if not hook_in:
            raise ValueError(
                f"The SAE has no cfg.metadata.hook_name ({hook_in!r}), so it is not known which activation it reads. "
                "Set sae.cfg.metadata.hook_name = 'blocks.L.hook_resid_post' (for example), or load it with "
                "load_sae(..., hook_name=...)."
            )
        hook_out = getattr(meta, "hook_name_out", None) or hook_in
        for name in {hook_in, hook_out}:
            if name not in self.hook_dict and name not in self._splices():
                close = difflib.get_close_matches(name, [n for n in self.hook_dict if ".hook_sae_" not in n], n=3)
                hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                raise ValueError(f"SAE hook {name!r} is not a hook point of this model.{hint}")
        width = self._hook_width(hook_in) if getattr(sae.cfg, "reshape_activations", "none") == "none" else None
        if width is not None and sae.cfg.d_in != width:
            raise ValueError(
                f"SAE d_in={sae.cfg.d_in} does not match the width {width} of {hook_in!r} in "
                f"{self.cfg.model_name}. Was it trained on another model or hook?"
            )
        return hook_in

    def add_sae(self, sae: nn.Module, use_error_term: bool | None = None, check_model_name: bool = True) -> None:
        """Attach ``sae`` at ``sae.cfg.metadata.hook_name`` (replacing any SAE already there).

        Raises ``ValueError`` if the hook is not in the model or the SAE's ``d_in`` differs from the
        hook's width; warns if the SAE's metadata names another model (``check_model_name=False``
        silences it).
        """
        hook_in = self.check_sae(sae)
        meta = sae.cfg.metadata
        hook_out = getattr(meta, "hook_name_out", None) or hook_in
        sae_model = getattr(meta, "model_name", None)
        if check_model_name and not same_model(sae_model, self.cfg.model_name):
            warnings.warn(
                f"SAE metadata names model {sae_model!r} but this model is {self.cfg.model_name!r}. "
                "Pass check_model_name=False if that is intended.",
                stacklevel=2,
            )
        if hook_in in self._splices():
            self._reset_sae(hook_in)
        splice = SAESplice(sae, use_error_term=bool(sae.use_error_term if use_error_term is None else use_error_term))
        if hook_out != hook_in:
            _get_deep_attr(self, hook_in).add_hook(
                lambda t, hook: (splice.capture_input(t), t)[1], dir="fwd", is_permanent=True
            )
        _set_deep_attr(self, hook_out, splice)
        self._splices()[hook_in] = splice
        self.setup()

    def _reset_sae(self, hook_in: str) -> None:
        splice = self._splices().pop(hook_in)
        hook_out = getattr(splice.sae.cfg.metadata, "hook_name_out", None) or hook_in
        if hook_out != hook_in:
            _get_deep_attr(self, hook_in).remove_hooks(dir="fwd", including_permanent=True)
        _set_deep_attr(self, hook_out, HookPoint())

    def reset_saes(self, act_names: str | Sequence[str] | None = None) -> None:
        """Detach the SAEs at these input hooks (all if ``None``)."""
        names = [act_names] if isinstance(act_names, str) else list(act_names or self._splices())
        for name in names:
            if name in self._splices():
                self._reset_sae(name)
        self.setup()

    @contextlib.contextmanager
    def saes(
        self,
        saes: nn.Module | Sequence[nn.Module] = (),
        reset_saes_end: bool = True,
        use_error_term: bool | None = None,
    ) -> Iterator[Any]:
        """Context with ``saes`` attached; on exit the previous SAEs at those hooks come back."""
        saes = [saes] if isinstance(saes, nn.Module) else list(saes)
        previous = {}
        for sae in saes:
            name = sae.cfg.metadata.hook_name
            if name in self._splices():
                s = self._splices()[name]
                previous[name] = (s.sae, s.use_error_term)
        try:
            for sae in saes:
                self.add_sae(sae, use_error_term=use_error_term)
            yield self
        finally:
            if reset_saes_end:
                self.reset_saes([sae.cfg.metadata.hook_name for sae in saes])
                for sae, err in previous.values():
                    self.add_sae(sae, use_error_term=err, check_model_name=False)

    def run_with_saes(
        self,
        *args: Any,
        saes: SAE | Sequence[SAE] = (),
        reset_saes_end: bool = True,
        use_error_term: bool | None = None,
        **kwargs: Any,
    ) -> Tensor:
        with self.saes(saes=saes, reset_saes_end=reset_saes_end, use_error_term=use_error_term):
            return self(*args, **kwargs)

    def run_with_cache_with_saes(
        self,
        *args: Any,
        saes: SAE | Sequence[SAE] = (),
        reset_saes_end: bool = True,
        use_error_term: bool | None = None,
        return_cache_object: bool = True,
        **kwargs: Any,
    ) -> tuple[Tensor, Any]:
        with self.saes(saes=saes, reset_saes_end=reset_saes_end, use_error_term=use_error_term):
            return self.run_with_cache(*args, return_cache_object=return_cache_object, **kwargs)

    def run_with_hooks_with_saes(
        self,
        *args: Any,
        saes: SAE | Sequence[SAE] = (),
        reset_saes_end: bool = True,
        fwd_hooks: Sequence = (),
        bwd_hooks: Sequence = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        **kwargs: Any,
    ) -> Tensor:
        with self.saes(saes=saes, reset_saes_end=reset_saes_end):
            return self.run_with_hooks(
                *args,
                fwd_hooks=list(fwd_hooks),
                bwd_hooks=list(bwd_hooks),
                reset_hooks_end=reset_hooks_end,
                clear_contexts=clear_contexts,
                **kwargs,
            )


def warn_if_trained_on_another_model(sae: nn.Module, model: HookedViT) -> None:
    """A ``UserWarning`` when the SAE's (or transcoder's) ``metadata.model_name``, or a cross-layer
    transcoder's ``cfg.model_name``, names a different model than ``model``'s (both known): its features
    are meaningless on this model's activations."""
    import warnings

    metadata = getattr(sae.cfg, "metadata", None)
    theirs = getattr(metadata, "model_name", None) if metadata is not None else getattr(sae.cfg, "model_name", None)
    ours = getattr(model.cfg, "model_name", None)
    if not same_model(theirs, ours):
        where = f"The SAE on {metadata.hook_name}" if metadata is not None else f"The {type(sae).__name__}"
        warnings.warn(
            f"{where} was trained on {theirs!r}, but this model is {ours!r}. Load the model it was trained on "
            f"(HookedViT.from_pretrained({theirs!r})).",
            UserWarning,
            stacklevel=3,
        )
