"""The package's import rules (DESIGN "Import rules"), read from the source with ``ast``: every ``import`` counts,
the lazy ones inside functions too, since a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import lmselect

SRC = Path(lmselect.__file__).parent
# select/ modules every other room may use: the registry, the selection format and its writer, the select verb, top-k, summaries, diagnostics
SELECT_SHARED = {"lmselect.select", "lmselect.select.base", "lmselect.select.cli", "lmselect.select.selection", "lmselect.select.topk",
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


# ---- layers (DESIGN "Import rules"): each room imports its own layer and those below; the upward arrows are listed
LAYERS = {"lmselect": 1, "lmselect.errors": 1, "lmselect.paths": 1, "lmselect.config": 1, "lmselect.artifacts": 1,
          "lmselect.stats": 1, "lmselect.layout": 1, "lmselect.log": 2, "lmselect.runlock": 2, "lmselect.context": 2, "lmselect.models": 2,
          "lmselect.data": 2, "lmselect.train": 2, "lmselect.score": 2, "lmselect.eval": 2, "lmselect.select": 3,
          "lmselect.recipe": 4, "lmselect.stages": 4, "lmselect.export": 4, "lmselect.integrations": 4,
          "lmselect.provenance": 5, "lmselect.report": 5, "lmselect.inspect": 5, "lmselect.pipeline": 6,
          "lmselect.compare": 6, "lmselect.check": 6, "lmselect.pipeline_demo": 6, "lmselect.cli": 6,
          "lmselect.slurm": 6, "lmselect.testing": 6}
# the upward arrows DESIGN names: the warm-up's random fraction; score --jsonl's text scorers through the registry
UPWARD = {("lmselect.context", "lmselect.select.topk"), ("lmselect.score.cli", "lmselect.select.base"),
          ("lmselect.score.documents", "lmselect.select.base"), ("lmselect.score.windows", "lmselect.select.base")}


def layer(mod: str) -> int:
    parts = mod.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in LAYERS:
            return LAYERS[".".join(parts[:i])]
    raise KeyError(f"{mod}: no layer in tests/test_imports.py LAYERS (add it, and to DESIGN 'Import rules')")


def test_imports_go_down_the_layers_but_for_the_listed_arrows():
    up = {(m, t) for m, ts in import_graph().items() for t in ts if layer(t) > layer(m)}
    assert up <= UPWARD, f"new upward imports (DESIGN 'Import rules'): {sorted(up - UPWARD)}"
    assert up == UPWARD, f"arrows listed but gone (drop them here and in DESIGN): {sorted(UPWARD - up)}"


def test_the_circle_finder_counts_package_inits():
    """Importing ``a.b.c`` runs ``a/b/__init__.py`` first: the circle test sees those edges too."""
    g = with_package_edges({"lmselect.x.y": {"lmselect.z"}, "lmselect.z": set(), "lmselect.x": {"lmselect.z"}})
    assert g["lmselect.z"] == set() and "lmselect.x" not in g["lmselect.x.y"]
    g = with_package_edges({"lmselect.a": {"lmselect.b.c"}, "lmselect.b": set(), "lmselect.b.c": set()})
    assert g["lmselect.a"] == {"lmselect.b.c", "lmselect.b"}


def with_package_edges(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """``graph`` plus, for every import of ``pkg.mod``, an edge to each enclosing package the importer is not in."""
    out = {m: set(ts) for m, ts in graph.items()}
    for m, ts in graph.items():
        for t in ts:
            parts = t.split(".")
            for i in range(2, len(parts)):
                p = ".".join(parts[:i])
                if p in graph and p != m and not m.startswith(p + "."):
                    out[m].add(p)
    return out


def test_no_import_circle_through_package_inits():
    cycle = find_cycle(with_package_edges(import_graph()))
    assert cycle is None, " -> ".join(cycle or [])


# ---- import budget (issue 32): imports at the top unless something forces a lazy one (an optional or heavy
# dependency at start-up, a circle; said in a comment there); no private name imported from another module
INNER_IMPORT_BUDGET = 35  # lmselect imports inside functions (246 before issue 32)
# private names imported across modules (dunders such as __version__ are public): none (20 before issue 32)
PRIVATE_IMPORT_BUDGET = 0


def counts_in(tree: ast.AST, mod: str, rel: str) -> tuple[list[str], list[str]]:
    """One module's lmselect imports inside functions and private names it imports from another module."""
    inner, private = [], []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for n in ast.walk(fn):
                if (isinstance(n, ast.ImportFrom) and n.module and (n.module.startswith("lmselect") or n.level)) \
                        or (isinstance(n, ast.Import) and any(a.name.startswith("lmselect") for a in n.names)):
                    inner.append(f"{rel}:{n.lineno}")
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("lmselect") and n.module != mod:
            private += [f"{rel}:{n.lineno} {n.module}.{a.name}" for a in n.names
                        if a.name.startswith("_") and not (a.name.startswith("__") and a.name.endswith("__"))]
    return inner, private


def import_counts() -> tuple[list[str], list[str]]:
    """(lmselect imports inside functions, private names imported from another module), as ``file:line`` strings."""
    inner, private = [], []
    for mod, path in _modules().items():
        a, b = counts_in(ast.parse(path.read_text(), str(path)), mod, path.relative_to(SRC).as_posix())
        inner += a
        private += b
    return inner, private


def test_import_budget():
    inner, private = import_counts()
    assert len(inner) <= INNER_IMPORT_BUDGET, (
        f"{len(inner)} lmselect imports inside functions (budget {INNER_IMPORT_BUDGET}): import at the top unless a "
        f"circle or a heavy optional dependency forces it (say which in a comment); {inner}")
    assert len(private) <= PRIVATE_IMPORT_BUDGET, f"private names imported from another module: {private}"


def test_import_counter_counts():
    """The counter sees nested lazy imports (nested functions once each) and a private cross-module name, and
    neither a top-level import, a dunder nor a module's own private name (so the budget test can fail)."""
    import textwrap

    tree = ast.parse(textwrap.dedent("""
        from lmselect.a import _x, __version__, y
        from lmselect.m import _own
        def f():
            if True:
                from lmselect.b import y
            import lmselect.c
            import numpy
            def g():
                from .d import e
    """))
    inner, private = counts_in(tree, "lmselect.m", "m.py")
    # a nested function's import is counted in each enclosing function (as /tmp/count_imports.py, issue 32, does)
    assert sorted(inner) == ["m.py:10", "m.py:10", "m.py:6", "m.py:7"]
    assert private == ["m.py:2 lmselect.a._x"]
