"""Register this package's SAELens classes whenever SAELens is (or gets) imported.

A folder saved from a converted saev TopK SAE names the architecture ``signed_topk``, a TopK
transcoder ``topk_transcoder`` / ``topk_skip_transcoder``; plain ``SAE.load_from_disk`` finds them once
``import sae_vision_ext`` has run, in either import order. The
hook costs nothing at import: it imports neither torch nor SAELens; it registers right away when
SAELens is already loaded, otherwise right after SAELens finishes loading (a one-shot meta-path
finder that removes itself).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from types import ModuleType
from typing import Any


def _register() -> None:
    from .saes import signed_topk, transcoders

    signed_topk.ensure_registered()
    transcoders.ensure_registered()
    from .training.transcoders import ensure_training_registered  # transcoder, skip_transcoder, clt, ...

    ensure_training_registered()


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
