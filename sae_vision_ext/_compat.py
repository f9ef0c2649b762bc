"""Version shims for the host libraries, kept in one place.

Each helper hides one difference between releases of timm, open_clip, transformers or
TransformerLens so that adapter code reads the same on every supported version; ``renamed_kwargs``
keeps this package's own old argument names working for one release.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

F = TypeVar("F", bound=Callable[..., Any])


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


def renamed_kwargs(**old_to_new: str) -> Callable[[F], F]:
    """Decorator: keyword arguments under their old names (``old=new`` pairs) still work for one
    release, with a ``DeprecationWarning`` naming the new name; both names at once is a ``TypeError``."""
    import functools
    import warnings

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn.__name__}() got both {new!r} and its old name {old!r}; pass {new}= only.")
                    warnings.warn(
                        f"{fn.__name__}({old}=...) is renamed {new}=...; the old name goes in the next release.",
                        DeprecationWarning,
                        stacklevel=2,
                    )
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return inner  # type: ignore[return-value]

    return wrap


def reordered_args(old_order: tuple[str, ...], is_old: Callable[[tuple[Any, ...]], bool]) -> Callable[[F], F]:
    """Decorator: a call in a function's previous positional order (``old_order`` names its
    parameters in that order; ``is_old(args)`` recognises such a call by its positional arguments)
    still works for one release, bound by name, with a ``DeprecationWarning`` showing the new order."""
    import functools
    import inspect
    import warnings

    def wrap(fn: F) -> F:
        new_order = [p for p in inspect.signature(fn).parameters if p in old_order]

        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            if not args or not is_old(args):
                return fn(*args, **kwargs)
            warnings.warn(
                f"{fn.__name__}({', '.join(old_order[: len(args)])}, ...) is the old argument order; "
                f"call {fn.__name__}({', '.join(new_order[:6])}, ...). The old order goes in the next release.",
                DeprecationWarning,
                stacklevel=2,
            )
            return fn(**dict(zip(old_order, args, strict=False)), **kwargs)

        return inner  # type: ignore[return-value]

    return wrap
