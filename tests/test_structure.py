"""The package's layering (docs/design.md §3), read from the source: imports run one way, the
kernel layer is used through its one entry, no import is hidden in a function, no cycles.

Bottom: ``params``, ``config``, ``_compat``, ``_tracing``, ``eligibility``, ``reference``, ``validation``
(nothing above them). Middle: ``lowering/`` (imports only the bottom's ``params``, ``config``,
``_compat``, ``eligibility``). Top: the rest of ``varlen_compile``, which imports ``lowering/``
only as ``varlen_compile.lowering`` (its ``__init__``), never a module inside it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE, LOWERING = ROOT / "varlen_compile", ROOT / "lowering"
BOTTOM = {"params", "config", "_compat", "_tracing", "eligibility", "reference", "validation"}
LOWERING_MAY_USE = {"params", "config", "_compat", "eligibility"}


def _module_name(path: Path) -> str:
    if path.is_relative_to(LOWERING):
        parts = ("varlen_compile", "lowering", *path.relative_to(LOWERING).with_suffix("").parts)
    else:
        parts = ("varlen_compile", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(part for part in parts if part != "__init__")


SOURCES = {_module_name(path): path for root in (PACKAGE, LOWERING) for path in sorted(root.rglob("*.py"))}


def _imports(name: str) -> list[tuple[str, int, bool]]:
    """``(imported module, line, inside a function)`` for every import of ``name``'s source that
    names a module of this package (``from . import x`` gives ``package.x``)."""
    path = SOURCES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    local = {id(node) for function in ast.walk(tree) if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
             for node in ast.walk(function)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in SOURCES else base for alias in node.names]
        else:
            continue
        found += [(target, node.lineno, id(node) in local) for target in targets if target.startswith("varlen_compile")]
    return found


def _short(module: str) -> str:
    return module.removeprefix("varlen_compile.")


def test_no_import_of_our_modules_is_hidden_in_a_function():
    hidden = [f"{name}:{line} imports {target}" for name in SOURCES for target, line, local in _imports(name) if local]
    assert not hidden, hidden


def test_the_bottom_layer_imports_nothing_above_it():
    wrong = [
        f"{name}:{line} imports {target}"
        for name in SOURCES if _short(name) in BOTTOM
        for target, line, _ in _imports(name)
        if target != "varlen_compile" and _short(target) not in BOTTOM
    ]
    assert not wrong, wrong


def test_the_kernel_layer_uses_only_the_bottom_layer():
    wrong = [
        f"{name}:{line} imports {target}"
        for name in SOURCES if name.startswith("varlen_compile.lowering")
        for target, line, _ in _imports(name)
        if not target.startswith("varlen_compile.lowering") and _short(target) not in LOWERING_MAY_USE
    ]
    assert not wrong, wrong


def test_the_rest_uses_the_kernel_layer_through_its_entry_only():
    wrong = [
        f"{name}:{line} imports {target}"
        for name in SOURCES if not name.startswith("varlen_compile.lowering")
        for target, line, _ in _imports(name)
        if target.startswith("varlen_compile.lowering.")
    ]
    assert not wrong, wrong


def test_no_import_cycles():
    graph = {name: {target for target, _, _ in _imports(name) if target in SOURCES and target != name} for name in SOURCES}
    # A package's __init__ is imported before its modules: an edge into it from inside is not a cycle.
    for name, targets in graph.items():
        targets -= {target for target in targets if name.startswith(target + ".")}
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail + [name, target]))
            if target not in state:
                visit(target, trail + [name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
