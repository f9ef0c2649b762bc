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


def _typing_only(tree: ast.Module) -> set[int]:
    """Ids of the import nodes under ``if TYPE_CHECKING:`` (annotations only: never run)."""
    blocks = [n for n in ast.walk(tree) if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"]
    return {id(m) for b in blocks for stmt in b.body for m in ast.walk(stmt)}


def _imports(name: str, runtime_only: bool = False) -> list[tuple[str, list[str]]]:
    """``(imported module, names)`` for every ``sae_vision_ext`` import in module ``name`` (with
    ``runtime_only``, not those under ``if TYPE_CHECKING:``)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    tree = ast.parse(path.read_text())
    skip = _typing_only(tree) if runtime_only else set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
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


EDGES = {m: {t for t, _ in _imports(m, runtime_only=True) if t in MODULES and t != m} for m in MODULES}
"""Runtime imports (a cycle is among these; imports for annotations only still obey the levels)."""


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


DOMAIN_PARAMS = {"model", "sae", "saes", "graph", "rrm", "stats", "trainer", "dataset", "aggregated", "pixels"}
"""Parameters that always hold one of the package's (or a host's) types: never typed ``Any``."""


def _public_functions():
    for name, path in MODULES.items():
        if any(part.startswith("_") for part in name.split(".")[1:]):
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                yield name, node
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                for m in node.body:
                    if isinstance(m, ast.FunctionDef) and (not m.name.startswith("_") or m.name == "__init__"):
                        yield f"{name}.{node.name}", m


def test_public_api_is_typed():
    """Every public function and method annotates each parameter and its return; the parameters that
    carry a model, SAE, graph or replacement model name its type (``Any`` hides the contract)."""
    problems = []
    for where, f in _public_functions():
        args = [a for a in f.args.posonlyargs + f.args.args + f.args.kwonlyargs if a.arg not in ("self", "cls")]
        for a in args:
            hint = ast.unparse(a.annotation) if a.annotation is not None else None
            if hint is None or (a.arg in DOMAIN_PARAMS and hint.replace(" | None", "") == "Any"):
                problems.append(f"{where}.{f.name}({a.arg}: {hint})")
        if f.returns is None:
            problems.append(f"{where}.{f.name} -> (no return annotation)")
    assert not problems, "untyped public API:\n" + "\n".join(problems)


CIRCUITS_LEVELS = {"replacement": 0, "graph": 1, "engine": 2, "models": 3, "evaluate": 4, "": 5}
"""Inside ``circuits/`` (docs/architecture.md): a replacement kind (``replacement/``) knows no graph; the
graph type, its operations and exports (``graph/``) name a replacement model only in annotations;
the engines (``engine/``) build graphs from a replacement model; ``models.py`` joins a kind with the
engines' methods; evaluation (``evaluate/``) uses all of them."""


def _circuits_part(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) < 2 or parts[1] != "circuits":
        return None
    return parts[2] if len(parts) > 2 else ""


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _circuits_part(m) is not None))
def test_circuits_layers_go_one_way_and_keep_private_names(module):
    mine = _circuits_part(module)
    assert mine in CIRCUITS_LEVELS, f"{module}: add its folder to CIRCUITS_LEVELS and docs/architecture.md"
    for target, names in _imports(module):
        theirs = _circuits_part(target)
        if theirs is None or theirs == mine or target not in MODULES:
            continue
        assert CIRCUITS_LEVELS[theirs] < CIRCUITS_LEVELS[mine], f"{module} imports {target} (upwards in circuits/)"
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private, f"{module} imports private {private} from {target}"
