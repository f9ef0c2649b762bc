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


def coerce_numbers(obj: Any) -> None:
    """Convert numeric strings in ``int``/``float`` fields (PyYAML reads ``4e-4`` and ``1e5`` as strings);
    anything else that is not a number raises ``ValueError`` naming the field.

    Works from the dataclass's annotations (``"int"``, ``"float"``, ``"int | None"``, ...)."""
    for f in dataclasses.fields(obj):
        kinds = {part.strip() for part in str(f.type).split("|")}
        if not kinds & {"int", "float"} or kinds - {"int", "float", "None"}:
            continue
        value = getattr(obj, f.name)
        if value is None and "None" in kinds:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"{f.name} must be a number, got {value!r} ({type(value).__name__}).")
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{f.name} must be a number, got the string {value!r}.") from None
        if "float" not in kinds:
            if float(value) != int(value):
                raise ValueError(f"{f.name} must be a whole number, got {value!r}.")
            value = int(value)
        elif "int" not in kinds:
            value = float(value)
        setattr(obj, f.name, value)
