"""One small registry type used for every named thing in the package.

Adapters, model loaders, embedded checkpoints, image sources, SAE formats and SAE releases each register in one place
with a decorator, the way timm's ``register_model`` works. Looking up an unknown name raises
``ValueError`` that lists close matches and a few valid names, so a typo is a one-line fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object table with a registering decorator and helpful lookup errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering the decorated object under ``name`` (names are unique)."""

        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered; pick another name.")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """The object registered as ``name``; ``ValueError`` naming close and valid names if none."""
        try:
            return self._items[name]
        except KeyError:
            raise ValueError(unknown_name_message(self.kind, name, list(self._items))) from None

    def names(self) -> list[str]:
        return list(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(list(self._items.items()))

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __len__(self) -> int:
        return len(self._items)


def unknown_name_message(kind: str, name: str, valid: list[str], shown: int = 8) -> str:
    """'Unknown <kind> <name>. Did you mean ...? Valid: ...' with at most ``shown`` valid names."""
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    msg = f"Unknown {kind} {name!r}."
    if close:
        msg += f" Did you mean {', '.join(repr(c) for c in close)}?"
    listed = ", ".join(repr(v) for v in valid[:shown])
    more = f" (and {len(valid) - shown} more)" if len(valid) > shown else ""
    return f"{msg} Valid {kind} names: {listed}{more}."
