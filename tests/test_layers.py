"""The shape of the code: layers that read bottom-up, no import cycles, no hidden (function-level) imports.

Layers, lowest first: ``kernels`` < ``engine`` < ``export`` < ``streaming`` < ``streaming.cli`` < ``benchmarks``
(< ``tests``).
A module may import its own layer and the layers below it, never one above. Inside a layer, the sub-packages
(``engine.audio``, ``engine.motion``, ``streaming.transports``, ...) and the modules must not import each other in
a circle. Project modules are imported at module level only: an import inside a function hides an edge of this
graph (optional third-party packages may still be imported where they are used). An ``importlib.import_module``
of a literal project module name (the CLI's and the backends' registries) counts as an import too.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kernels", "engine", "export", "streaming", "benchmarks", "tests")
# (module prefix, rank): the longest matching prefix decides
LAYERS = (
    ("kernels", 0),
    ("engine", 1),
    ("export", 2),
    ("streaming", 3),
    ("streaming.cli", 4),
    ("benchmarks", 5),
    ("tests", 6),
)


def layer(module: str) -> int:
    best, rank = "", -1
    for prefix, r in LAYERS:
        if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
            best, rank = prefix, r
    return rank


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _target(current: str, is_package: bool, node: ast.ImportFrom, alias: str, known: dict[str, Path]) -> str:
    if node.level:
        base = current.split(".") if is_package else current.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        module = ".".join(base + ([node.module] if node.module else []))
    else:
        module = node.module or ""
    full = f"{module}.{alias}"
    return full if full in known else module


class Edge:
    def __init__(self, source: str, target: str, line: int, in_function: bool) -> None:
        self.source, self.target, self.line, self.in_function = source, target, line, in_function

    def __repr__(self) -> str:
        return f"{self.source}:{self.line} -> {self.target}"


def _is_project(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def edges(known: dict[str, Path]) -> Iterator[Edge]:
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        in_function: set[int] = set()
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                in_function.update(id(n) for n in ast.walk(fn) if n is not fn)
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                targets = [_target(name, is_package, node, a.name, known) for a in node.names]
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "import_module"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                targets = [node.args[0].value]
                # a registry's lazy lookup by name is allowed where it is used
                yield from (Edge(name, t, node.lineno, False) for t in targets if _is_project(t))
                continue
            for target in targets:
                if _is_project(target):
                    yield Edge(name, target, node.lineno, id(node) in in_function)


def group(module: str) -> str:
    """The node of the sub-package graph: ``engine.motion.scheduler`` -> ``engine.motion``; top modules as is."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


@pytest.fixture(scope="module")
def all_edges() -> list[Edge]:
    return list(edges(modules()))


def test_no_upward_imports(all_edges: list[Edge]) -> None:
    upward = [e for e in all_edges if layer(e.target) > layer(e.source)]
    assert not upward, "imports that point up a layer:\n" + "\n".join(map(repr, upward))


def test_no_function_level_imports_of_project_modules(all_edges: list[Edge]) -> None:
    hidden = [e for e in all_edges if e.in_function]
    assert not hidden, "project modules imported inside functions:\n" + "\n".join(map(repr, hidden))


def test_no_cycles_between_modules(all_edges: list[Edge]) -> None:
    known = modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for e in all_edges:
        # `from engine.models import x` also runs engine/models/__init__.py: an edge to the package itself
        if e.target in known and e.target != e.source:
            graph[e.source].add(e.target)
    assert find_cycle(graph) is None, f"module import cycle: {' -> '.join(find_cycle(graph) or [])}"


def test_no_cycles_between_subpackages(all_edges: list[Edge]) -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for e in all_edges:
        a, b = group(e.source), group(e.target)
        if a != b and not (e.source == a and b.startswith(a + ".")):  # a package's __init__ may re-export
            graph[a].add(b)
    cycle = find_cycle(graph)
    assert cycle is None, f"sub-package import cycle: {' -> '.join(cycle or [])}"


def test_the_checker_sees_what_it_forbids() -> None:
    """The rules above reject the shapes they exist for (a cycle, an upward edge, a hidden import)."""
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert layer("engine.motion.scheduler") < layer("streaming.session") < layer("streaming.cli.render")
    tree = ast.parse("def f():\n    import engine.paths\n")
    fn = tree.body[0]
    assert isinstance(fn, ast.FunctionDef) and isinstance(fn.body[0], ast.Import)
