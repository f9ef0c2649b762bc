"""Version shims for the host libraries, kept in one place.

Each helper hides one difference between releases of timm, open_clip, transformers or
TransformerLens so that adapter code reads the same on every supported version.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def first_attr(obj: Any, *paths: str, default: Any = ...) -> Any:
    """The first dotted attribute path that exists on ``obj``.

    Hugging Face renamed many vision internals in transformers 5 (``encoder.layer`` -> ``layers``,
    ``attention.attention.query`` -> ``attention.q_proj``); adapters list both spellings here.
    """
    for path in paths:
        cur = obj
        ok = True
        for part in path.split("."):
            if not hasattr(cur, part):
                ok = False
                break
            cur = getattr(cur, part)
        if ok:
            return cur
    if default is not ...:
        return default
    raise AttributeError(f"{type(obj).__name__} has none of the attributes {paths}")


def is_identity(module: nn.Module | None) -> bool:
    """True for ``None`` and for ``nn.Identity`` (timm and open_clip use it for 'no layer')."""
    return module is None or isinstance(module, nn.Identity)
