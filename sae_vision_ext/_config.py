"""``ConfigMixin``: ``to_dict``/``from_dict``/``from_file`` shared by every config dataclass."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T", bound="ConfigMixin")


class ConfigMixin:
    """For dataclasses: plain-dict round trips that reject unknown keys by name and parse ``bool``
    fields strictly (:func:`parse_bool`)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any]) -> T:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"Unknown {cls.__name__} keys {sorted(unknown)}; valid keys: {sorted(names)}.")
        bools = {f.name for f in dataclasses.fields(cls) if _field_kinds(f) == {"bool"}}  # type: ignore[arg-type]
        d = {k: parse_bool(k, v) if k in bools else v for k, v in d.items()}
        return cls(**d)

    @classmethod
    def from_file(cls: type[T], path: str | Path) -> T:
        """Load from ``.yaml``/``.yml`` or ``.json``: a mapping of field names to values. A missing
        file, another suffix, a syntax error or a top level that is not a mapping raise ``ValueError``
        naming the file."""
        path = Path(path)
        if path.suffix.lower() not in CONFIG_SUFFIXES:
            raise ValueError(
                f"{cls.__name__}.from_file({str(path)!r}): the suffix {path.suffix or '(none)'!r} is not a config "
                f"format; use a {'/'.join(CONFIG_SUFFIXES)} file holding a mapping of field names to values."
            )
        try:
            text = path.read_text()
        except OSError as e:
            raise ValueError(f"{cls.__name__}.from_file: cannot read {str(path)!r} ({e}); check the path.") from e
        data = _parse_config_text(path, text)
        if data is None:  # an empty file: every field at its default
            data = {}
        if not isinstance(data, dict):
            raise ValueError(
                f"{str(path)!r} holds a {type(data).__name__} at its top level ({_preview(data)}); a "
                f"{cls.__name__} file must be a mapping of field names to values, e.g. `n_images: 512` "
                'on its own line (YAML) or {"n_images": 512} (JSON).'
            )
        bad = [k for k in data if not isinstance(k, str)]
        if bad:
            raise ValueError(f"{str(path)!r}: keys must be field names (strings); got {bad!r}.")
        return cls.from_dict(data)


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it in the class body), whitespace collapsed and
    reST double backticks dropped: the one description of a field, also shown by ``--help``. Fields
    without one (or a class whose source is not available) are left out."""
    import ast
    import inspect
    import itertools
    import textwrap

    try:
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body  # type: ignore[attr-defined]
    except (OSError, TypeError):
        return {}
    docs = {}
    for node, after in itertools.pairwise(body):
        text = getattr(getattr(after, "value", None), "value", None)
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(text, str):
            docs[node.target.id] = " ".join(text.replace("``", "").split())
    return docs


CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
"""The file suffixes ``ConfigMixin.from_file`` reads."""

_TRUE = frozenset({"true", "yes", "y", "on", "1"})
_FALSE = frozenset({"false", "no", "n", "off", "0"})


def _parse_config_text(path: Path, text: str) -> Any:
    """The YAML or JSON value of a config file; a syntax error names the file and its line."""
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{str(path)!r} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}; fix the syntax "
                "(or write the config as YAML in a .yaml file)."
            ) from e
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(
            f"{str(path)!r} is not valid YAML: {problem}{where}; fix the syntax (one `field: value` per line, "
            "quote strings that hold ':' or '#')."
        ) from e


def _preview(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _field_kinds(f: dataclasses.Field) -> set[str]:
    """The names of a field's annotation (``"int | None"`` -> ``{"int", "None"}``)."""
    text = f.type.__name__ if isinstance(f.type, type) else str(f.type)
    return {part.strip() for part in text.split("|")}


def parse_bool(name: str, value: Any) -> bool:
    """A boolean field's value: a bool, 0/1, or one of ``true/false/yes/no/on/off/1/0`` (any case);
    anything else raises ``ValueError`` naming the field (a string ``'no'`` is not silently true)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(
        f"{name} must be a boolean, got {value!r} ({type(value).__name__}); use true or false "
        "(yes/no, on/off and 1/0 are read as booleans too)."
    )


def coerce_bools(obj: Any) -> None:
    """Parse every ``bool`` field of a dataclass instance strictly (:func:`parse_bool`)."""
    for f in dataclasses.fields(obj):
        if _field_kinds(f) == {"bool"}:
            setattr(obj, f.name, parse_bool(f.name, getattr(obj, f.name)))


def coerce_fields(obj: Any) -> None:
    """Coerce by field type: numeric strings in ``int``/``float`` fields (:func:`coerce_numbers`), the
    spellings of booleans in ``bool`` fields (:func:`coerce_bools`). Config dataclasses call it first
    in ``__post_init__``."""
    coerce_numbers(obj)
    coerce_bools(obj)


def coerce_numbers(obj: Any) -> None:
    """Convert numeric strings in ``int``/``float`` fields (PyYAML reads ``4e-4`` and ``1e5`` as strings);
    anything else that is not a number raises ``ValueError`` naming the field.

    Works from the dataclass's annotations (``"int"``, ``"float"``, ``"int | None"``, ...)."""
    for f in dataclasses.fields(obj):
        kinds = _field_kinds(f)
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
