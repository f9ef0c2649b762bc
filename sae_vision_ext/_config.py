"""``ConfigMixin``: ``to_dict``/``from_dict``/``from_file`` shared by every config dataclass."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T", bound="ConfigMixin")


class ConfigMixin:
    """For dataclasses: plain-dict round trips that reject unknown keys by name."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any]) -> T:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"Unknown {cls.__name__} keys {sorted(unknown)}; valid keys: {sorted(names)}.")
        return cls(**d)

    @classmethod
    def from_file(cls: type[T], path: str | Path) -> T:
        """Load from ``.yaml``/``.yml`` or ``.json``."""
        path = Path(path)
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            return cls.from_dict(yaml.safe_load(text) or {})
        return cls.from_dict(json.loads(text))
