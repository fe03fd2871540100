"""The import rules of scripts/ (docs/README.md, "Code layering"), read from the source with ``ast`` (nothing imported).

Layers, lowest first: engine -> data -> model -> evaluation and saliency -> the main job and the ablation. A module
imports from its own layer or lower ones only; no import cycle between modules; project modules are imported at
module level (function-local imports are for optional heavy dependencies only).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

# package under scripts/ -> rank; top-level modules (scripts/plan.py, main_job.py, ablation.py, finetune.py) rank above all
LAYERS = {"engine": 0, "data": 1, "model": 2, "evaluation": 3, "saliency": 3}
TOP = max(LAYERS.values()) + 1

# (importing file, imported module) -> why it is allowed
EXCEPTIONS = {
    ("scripts/data/probe.py", "scripts.evaluation.metrics"): (
        "a command-line check (`python -m scripts.data.probe`, documented under data/) that scores whole-image "
        "statistics with the evaluation's AUC and DeLong interval; no module imports it, so it adds no cycle"
    ),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SCRIPTS.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(SCRIPTS.rglob("*.py"))}


def _rank(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return -1  # the scripts package itself: nothing in it
    return LAYERS.get(parts[1], TOP)


def _resolve(node: ast.ImportFrom, importer: str) -> str:
    if not node.level:
        return node.module or ""
    package = importer.split(".")
    is_package = MODULES[importer].name == "__init__.py"
    base = package[: len(package) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """``(imported scripts module, line, function-local)`` for every import of a project module in ``path``."""
    importer = _module_name(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    local = {
        id(n)
        for f in ast.walk(tree)
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for n in ast.walk(f)
        if isinstance(n, (ast.Import, ast.ImportFrom))
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(node, importer)
            # ``from scripts.data import schema`` imports the module scripts.data.schema
            names = [f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module for a in node.names]
        else:
            continue
        for name in names:
            if name == "scripts" or name.startswith("scripts."):
                found.append((name, node.lineno, id(node) in local))
    return found


def _rel(path: Path) -> str:
    return path.relative_to(SCRIPTS.parent).as_posix()


def test_the_layers_cover_every_package():
    packages = {p.parent.name for p in SCRIPTS.glob("*/__init__.py")}
    assert packages == set(LAYERS), f"give each package under scripts/ a layer in LAYERS: {packages ^ set(LAYERS)}"


def test_no_module_imports_from_a_higher_layer():
    violations = []
    used = set()
    for name, path in MODULES.items():
        for imported, line, _ in _imports(path):
            if _rank(imported) <= _rank(name):
                continue
            if (_rel(path), imported) in EXCEPTIONS:
                used.add((_rel(path), imported))
                continue
            violations.append(f"{_rel(path)}:{line} imports {imported} (a higher layer)")
    rule = "imports against the layering (engine -> data -> model -> evaluation/saliency -> main job)"
    assert not violations, rule + ":\n" + "\n".join(violations)
    assert used == set(EXCEPTIONS), f"exceptions no longer needed, remove them: {set(EXCEPTIONS) - used}"


def test_project_modules_are_imported_at_module_level():
    local = [
        f"{_rel(path)}:{line} imports {imported} inside a function"
        for path in MODULES.values()
        for imported, line, is_local in _imports(path)
        if is_local
    ]
    assert not local, "\n".join(local)


def test_no_import_cycle():
    graph = {name: {m for m, _, _ in _imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
