"""The package's shape: no import circle, no module writing another object's private state, no module globals
that a session mutates. Read from the source (ast), so a new violation fails here with its place named.

How: every ``import`` / ``from ... import`` in every module of ``pytest_day0`` (function-level ones included:
a lazy import that closes a circle is still a circle; ``if TYPE_CHECKING:`` ones excluded, they never run) is an
edge; Tarjan's algorithm finds the strongly connected components; any with two or more modules is a circle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pytest_day0"
MUTATORS = {"append", "extend", "insert", "pop", "popitem", "remove", "clear", "update", "setdefault", "add",
            "discard", "__setitem__", "__delitem__"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in node.body:
                skip.update(id(n) for n in ast.walk(stmt))
    return skip


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_nodes(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [base, *(f"{base}.{a.name}" for a in node.names)]
            else:
                continue
            deps.update(t for t in targets if t in modules and t != name)
        graph[name] = deps
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of size > 1."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_circle() -> None:
    graph = import_graph()
    assert len(graph) > 40 and "pytest_day0.release.suite" in graph["pytest_day0.plugin"]
    assert circles(graph) == []


def test_the_circle_finder_finds_one() -> None:
    """The check can fail: the circle the old plugin/suite pair had is found in a graph that has it."""
    graph = import_graph()
    graph["pytest_day0.release.suite"] = {*graph["pytest_day0.release.suite"], "pytest_day0.plugin"}
    assert any({"pytest_day0.plugin", "pytest_day0.release.suite"} <= set(c) for c in circles(graph))


def _private_writes(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """``other._name = ...``, ``other._name[k] = ...``, ``del other._name``, ``other._name.append(...)``."""

    def foreign_private(node: ast.AST) -> ast.Attribute | None:
        while isinstance(node, ast.Subscript):
            node = node.value
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and not (isinstance(node.value, ast.Name) and node.value.id in {"self", "cls"})):
            return node
        return None

    for node in ast.walk(tree):
        targets: list[ast.AST] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets = list(node.targets)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS:
            targets = [node.func.value]
        for target in targets:
            hit = foreign_private(target)
            if hit is not None:
                yield node.lineno, ast.unparse(hit)


def test_no_module_writes_another_objects_private_state() -> None:
    found = []
    for name, path in sorted(_modules().items()):
        for line, what in _private_writes(ast.parse(path.read_text(encoding="utf-8"))):
            found.append(f"{name}:{line}: {what}")
    assert found == []
    # and the scan sees such a write where there is one (the old remote stages wrote the chain's memo)
    assert list(_private_writes(ast.parse("chain._memo['x'] = True\nchain._memo.pop('y')\nself._ok = 1\n"))) == [
        (1, "chain._memo"), (2, "chain._memo")]


def test_no_module_level_mutable_state_set_by_hooks() -> None:
    """A module global assigned inside a function (``global X`` or ``X[...] = ...`` of a module dict) would leak
    between the sessions pytester runs in one process."""
    found = []
    for name, path in sorted(_modules().items()):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        module_dicts = {t.id for stmt in tree.body if isinstance(stmt, (ast.Assign, ast.AnnAssign))
                        for t in (stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target])
                        if isinstance(t, ast.Name) and isinstance(getattr(stmt, "value", None), (ast.Dict, ast.List))}
        for func in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(func):
                if isinstance(node, ast.Global):
                    found.append(f"{name}:{node.lineno}: global {', '.join(node.names)}")
                if isinstance(node, ast.Assign):
                    for t in node.targets:
                        if (isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name)
                                and t.value.id in module_dicts):
                            found.append(f"{name}:{node.lineno}: {ast.unparse(t)}")
    assert found == []
