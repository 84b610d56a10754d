"""The package's import graph (issue 23): no cycle, runtime/ below the engine, config.py at the bottom.

Every import of an activeflow_jax module is read with `ast`, at module level and inside functions
alike: an import deferred into a function still ties the two modules together, it only hides the
tie from the reader. Function-level imports are kept only where they are needed (an optional
heavy dependency, the native library), and each says why in a comment.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "activeflow_jax"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

BEING_REPLACED: set[str] = set()  # modules left out of the checks (none)

# The most function-level imports of our own modules the package may hold (each with a comment):
# one today, runtime/session.py's import of runtime/swap.py (129 before issue 23).
MAX_FUNCTION_LEVEL_IMPORTS = 0


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imported_modules(node: ast.Import | ast.ImportFrom, here: str, is_package: bool,
                     modules: dict[str, Path]) -> list[str]:
    """The activeflow_jax modules one import statement loads: `from a.b import c` is a.b.c when
    that is a module, else a.b; relative imports are resolved against `here`."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == PACKAGE]
    base = node.module or ""
    if node.level:
        anchor = here.split(".")
        anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
        base = ".".join(anchor + ([base] if base else []))
    if base.split(".")[0] != PACKAGE:
        return []
    found = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        found.append(sub if sub in modules else base)
    return found


def scan():
    """(graph: module -> the modules it imports, function-level imports: [(module, line, its text, the line above)])."""
    modules = all_modules()
    graph: dict[str, set[str]] = {}
    deferred = []
    for name, path in modules.items():
        if name in BEING_REPLACED:
            continue
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source, filename=str(path))
        edges = graph.setdefault(name, set())
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        inside = {id(n) for f in functions for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = [t for t in imported_modules(node, name, path.name == "__init__.py", modules) if t != name]
            edges.update(t for t in targets if t not in BEING_REPLACED)
            if targets and id(node) in inside:
                deferred.append((name, node.lineno, lines[node.lineno - 1], lines[node.lineno - 2]))
    return graph, deferred


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, colours white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if state.get(nxt) is None:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None:
            found = visit(node)
            if found:
                return found
    return None


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every group of modules that import each other, directly or around a loop (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_scanner_sees_every_module_and_function_level_imports():
    graph, _ = scan()
    assert "activeflow_jax.engine" in graph and "activeflow_jax.runtime.budget" in graph
    assert not BEING_REPLACED & set(graph)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert strongly_connected({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_no_import_cycle():
    graph, _ = scan()
    cycle = find_cycle(graph)
    groups = strongly_connected(graph)
    assert cycle is None, ("import cycle: " + " -> ".join(cycle) + "\nmodules tied together: "
                           + "; ".join(", ".join(g) for g in groups))


def test_runtime_does_not_import_the_engine():
    graph, _ = scan()
    offenders = sorted(m for m, deps in graph.items()
                       if m.startswith(f"{PACKAGE}.runtime") and f"{PACKAGE}.engine" in deps)
    assert not offenders, f"runtime modules importing the engine: {offenders}"


def test_config_imports_nothing_from_runtime_or_sparse():
    graph, _ = scan()
    below = sorted(d for d in graph[f"{PACKAGE}.config"]
                   if d.startswith((f"{PACKAGE}.runtime", f"{PACKAGE}.sparse")))
    assert not below, f"config.py imports {below}"


def test_few_function_level_imports_each_with_a_reason():
    _, deferred = scan()
    listing = "\n".join(f"{m}:{line}: {text.strip()}" for m, line, text, _ in deferred)
    assert len(deferred) <= MAX_FUNCTION_LEVEL_IMPORTS, (
        f"{len(deferred)} function-level imports of our own modules (at most {MAX_FUNCTION_LEVEL_IMPORTS}):\n{listing}")
    silent = [f"{m}:{line}" for m, line, text, before in deferred
              if "#" not in text and not before.strip().startswith("#")]
    assert not silent, f"function-level imports without a comment saying why: {silent}"
