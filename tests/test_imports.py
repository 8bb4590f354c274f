"""The import graph of affextract and seqhead, read from the source with `ast` (nothing is imported).

Every import counts, whether at module level, under TYPE_CHECKING or inside a function: a lazy import that closes a
loop still ties the two modules together, and only moves the failure from import time to call time.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("affextract", "seqhead")


def _modules() -> dict[str, Path]:
    """Dotted name -> source file of every module of the packages (a package is named by its __init__)."""
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that `name` imports: `from pkg import sub` names the submodule when there is one, and the
    package (its __init__) otherwise."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in modules else base)
    return {m for m in out if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, comps = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def _into_own_init(graph: dict[str, set[str]]) -> list[str]:
    """`module -> package` for every module that imports the __init__ of a package it belongs to."""
    return sorted(f"{m} -> {p}" for m, deps in graph.items() for p in deps if m.startswith(p + "."))


def test_the_walk_sees_the_graph():
    """The walker finds the imports it is meant to judge: one it must see, and a package's own names."""
    graph = _graph()
    assert "affextract.schema" in graph["affextract.features"]
    assert "affextract.training.losses" in graph["affextract.training.train"]
    assert {"affextract.extract", "affextract.features"} <= graph["affextract"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _into_own_init({"p.m": {"p"}, "p": {"p.m"}, "q.m": {"p"}}) == ["p.m -> p"]


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_no_module_imports_its_own_package_init():
    assert _into_own_init(_graph()) == []
