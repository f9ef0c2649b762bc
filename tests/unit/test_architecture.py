"""The package's import structure: no cycles, dependencies one way along the pipeline, no private
names imported across subpackages. Reads the source with ``ast`` (function-level imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "sae_vision_ext"
LEVELS = {
    "_compat": 0, "_config": 0, "_io": 0, "_errors": 0, "_hooks": 0, "_registry": 0, "_version": 0, "distributed": 0,
    "data": 1, "models": 2, "activations": 3, "saes": 3, "training": 4, "vis": 4, "circuits": 5,
    "_sae_lens_hook": 6, "demo": 6, "analyse": 6, "cli": 7, "launch": 8, "": 9,
}  # fmt: skip
"""Where each subpackage sits in the pipeline (data -> models -> activations/saes -> training/vis ->
circuits -> cli); an import may only go to a lower level or stay inside its subpackage."""


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imports(name: str) -> list[tuple[str, list[str]]]:
    """``(imported module, names)`` for every ``sae_vision_ext`` import in module ``name``."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("sae_vision_ext"):
                continue
            names = [a.name for a in node.names]
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            found += [(s, []) for s in subs]
            if len(subs) < len(names):
                found.append((target, [n for n in names if f"{target}.{n}" not in MODULES]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name in MODULES]
    return found


def _subpackage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


EDGES = {m: {t for t, _ in _imports(m) if t in MODULES and t != m} for m in MODULES}


def test_every_subpackage_has_a_level():
    assert {_subpackage(m) for m in MODULES} <= set(LEVELS)


def test_no_import_cycles_between_modules():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(EDGES[m]):
            if state.get(t) == 1:
                pytest.fail("import cycle: " + " -> ".join([*stack[stack.index(t) :], t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_pipeline_and_never_take_private_names_across_subpackages(module):
    mine = _subpackage(module)
    for target, names in _imports(module):
        theirs = _subpackage(target)
        if theirs == mine or target not in MODULES:
            continue
        assert LEVELS[theirs] < LEVELS[mine] or theirs.startswith("_"), f"{module} imports {target} (upwards)"
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private, f"{module} imports private {private} from {target}"
        assert not target.rsplit(".", 1)[-1].startswith("_") or theirs.startswith("_") or target.endswith("__init__"), (
            f"{module} imports the private module {target}"
        )
