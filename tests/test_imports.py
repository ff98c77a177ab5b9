"""No import cycles among attnkit's modules (the backends included), read from the source with ``ast``.

Every ``import`` statement that can run counts, at module level or inside a function: a deferred import does not
remove a cycle, it only moves the failure to the first call that takes that path. Imports under
``if TYPE_CHECKING:`` never run and are left out (annotations only).
"""

from __future__ import annotations

import ast
from pathlib import Path

import attnkit.backends

import attnkit


def _modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (source file, is a package). ``attnkit.backends`` lives in its own folder in a source
    checkout (``package-dir`` in pyproject.toml), so each package is walked from where Python imports it."""
    roots = (
        ("attnkit", Path(attnkit.__file__).parent),
        ("attnkit.backends", Path(attnkit.backends.__file__).parent),
    )
    modules: dict[str, tuple[Path, bool]] = {}
    for prefix, root in roots:
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if prefix == "attnkit" and parts[0] == "backends":
                continue  # walked from its own root
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            modules[".".join([prefix, *parts])] = (path, is_package)
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(name: str, path: Path, is_package: bool, modules: dict[str, tuple[Path, bool]]) -> set[str]:
    """The attnkit modules that ``name``'s import statements name."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    type_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and _is_type_checking(node.test)
        for stmt in node.body
        for inner in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in modules:
                    found.add(submodule)
                elif base in modules:
                    found.add(base)
    found.discard(name)
    return found


def _import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imported(name, path, is_pkg, modules) for name, (path, is_pkg) in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return components


def test_no_import_cycles():
    graph = _import_graph()
    assert len(graph) > 50, f"found only {len(graph)} modules: the walk is not seeing the package"
    assert {"attnkit.dispatch", "attnkit.registry", "attnkit.backends.reference"} <= graph.keys()
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_graph_sees_relative_absolute_and_deferred_imports():
    graph = _import_graph()
    assert "attnkit.registry" in graph["attnkit.dispatch"]  # from .registry import ...
    assert "attnkit.spec" in graph["attnkit.registry"]  # from .spec import ..., also inside resolve_alias
    assert "attnkit.bench.peers" in graph["attnkit.bench.providers"]  # from . import peers


def test_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"e2"}, "e2": {"e"}, "f": set()}
    assert sorted(_cycles(graph)) == [["a", "b", "c"], ["e", "e2"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_type_checking_imports_are_left_out(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        "from typing import TYPE_CHECKING\nimport typing\nfrom . import a\n"
        "if TYPE_CHECKING:\n    from . import b\nif typing.TYPE_CHECKING:\n    from . import c\n"
    )
    modules = {name: (src, False) for name in ("pkg.m", "pkg.a", "pkg.b", "pkg.c")}
    assert _imported("pkg.m", src, False, modules) == {"pkg.a"}
