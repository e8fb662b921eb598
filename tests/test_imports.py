"""The package's import rules (DESIGN "Import rules"), read from the source with ``ast``: every ``import`` counts,
the lazy ones inside functions too, since a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import lmselect

SRC = Path(lmselect.__file__).parent
# select/ modules every other room may use: the registry, the selection writer, top-k, summaries, diagnostics
SELECT_SHARED = {"lmselect.select", "lmselect.select.base", "lmselect.select.cli", "lmselect.select.topk",
                 "lmselect.select.summary", "lmselect.select.diagnostics"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(SRC.rglob("*.py")):
        parts = ("lmselect",) + p.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the lmselect modules it imports (``from pkg import sub`` names the submodule ``pkg.sub``)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            graph[mod] |= {t for t in targets if t in mods and t != mod}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_cycle_finder_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_lazy_imports():
    g = import_graph()
    assert "lmselect.stages" in g["lmselect.provenance"]  # imported inside stale_stages()
    assert "lmselect.report.results" in g["lmselect.pipeline"]  # imported inside a method of the runner


def test_no_import_circle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_nothing_outside_select_imports_a_method_module():
    bad = [(m, t) for m, ts in import_graph().items() if not m.startswith("lmselect.select")
           for t in ts if t.startswith("lmselect.select") and t not in SELECT_SHARED]
    assert not bad, bad
