"""Register this package's SAELens classes whenever SAELens is (or gets) imported.

A folder saved from a converted saev TopK SAE names the architecture ``signed_topk``, a TopK
transcoder ``topk_transcoder`` / ``topk_skip_transcoder``; plain ``SAE.load_from_disk`` finds them once
``import sae_vision_ext`` has run, in either import order. The
hook costs nothing at import: it imports neither torch nor SAELens; it registers right away when
SAELens is already loaded, otherwise right after SAELens finishes loading (a one-shot meta-path
finder that removes itself).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Any

_REGISTRARS = (
    ("sae_vision_ext.saes.signed_topk", "ensure_registered"),
    ("sae_vision_ext.saes.transcoders", "ensure_registered"),
    ("sae_vision_ext.training.transcoders", "ensure_training_registered"),  # transcoder, skip_transcoder, clt, ...
)
"""The modules that register classes with SAELens, and their (idempotent) registering function."""


def _initialising(name: str) -> bool:
    module = sys.modules.get(name)
    return module is not None and bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _register() -> None:
    """Register every class now. A registrar whose own import is what loaded SAELens (its code is still
    running), or whose import needs such a module, is skipped here: each registrar also registers on
    the last line of its own module (it imported SAELens), so none is missed once it is loaded."""
    for name, function in _REGISTRARS:
        if _initialising(name):
            continue
        try:
            module = importlib.import_module(name)
            getattr(module, function)()
        except (ImportError, AttributeError):
            if not any(_initialising(m) for m in list(sys.modules) if m.startswith("sae_vision_ext.")):
                raise  # not an import cycle of a module still loading: a real error


class _AfterSAELensImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: ModuleType | None = None) -> Any:
        if name != "sae_lens":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            _register()

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Register now if SAELens is loaded, else once it is."""
    if "sae_lens" in sys.modules and hasattr(sys.modules["sae_lens"], "SAE"):
        _register()
    elif not any(isinstance(f, _AfterSAELensImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterSAELensImport())
