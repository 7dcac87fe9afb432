"""The package's shape: no import cycles (module-level or deferred); the library apart from the app."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("envlf", "demo", "benchmarks", "experiments")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports, at the top or inside a function alike
    (a deferred import is still a dependency). `from pkg import mod` counts as pkg.mod."""
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for t in targets:
                while t and t not in files:  # envlf.model.core.EnVLF -> envlf.model.core
                    t = t.rpartition(".")[0]
                if t and t != mod and not mod.startswith(t + "."):  # a package's own __init__ is not a cycle
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    assert "envlf.search.index" in graph["envlf.search.engine"]  # the graph does see the imports
    assert "envlf.model.core" in graph["envlf.search.cli"]  # deferred or not
    assert cycles(graph) == []


def test_the_library_does_not_import_the_app_benchmarks_or_experiments():
    graph = import_graph()
    for mod, deps in graph.items():
        if mod.startswith("envlf.") and mod != "envlf.cli":  # the CLI dispatches to them by name
            assert not {d for d in deps if d.split(".")[0] in ("demo", "benchmarks", "experiments")}, mod


def test_only_command_lines_and_the_world_itself_import_the_demo_world():
    """The library reads any captioned dataset; what is special about the demo world (its
    ground truth, its renderer) is reached from the world package and from command lines
    that offer it (evaluate's content-oracle row, the app's default build), nowhere else."""
    graph = import_graph()
    allowed = {"envlf.evaluation.cli", "envlf.bootstrap"}
    for mod, deps in graph.items():
        if mod.startswith("envlf.") and not mod.startswith("envlf.world") and mod not in allowed:
            assert not {d for d in deps if d.startswith("envlf.world")}, (mod, sorted(deps))
