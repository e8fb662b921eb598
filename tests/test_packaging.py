"""What a user installs is what the code needs: every imported distribution is declared in ``pyproject.toml``, every
datatrove step lmselect uses or the README shows finds the packages it asks for at run time, and every bundled data
file the demo reads ships in the wheel (package data).

CI installs into a fresh virtual environment (``.ci/run``), so these tests see what a user's environment has, not
what the machine's system interpreter happens to carry.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib
import importlib.metadata as md
import re
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None  # type: ignore[assignment]

from lmselect.paths import DATA_DIR, REPO_DIR

PYPROJECT = REPO_DIR / "pyproject.toml"
README = REPO_DIR / "README.md"
needs_clone = pytest.mark.skipif(not PYPROJECT.is_file(), reason="needs the source tree (pyproject.toml)")
needs_toml = pytest.mark.skipif(tomllib is None, reason="tomllib needs Python >= 3.11")


def _project() -> dict:
    return tomllib.loads(PYPROJECT.read_text())


def _req_name(req: str) -> str:
    """``"fasttext-numpy2-wheel==0.9.2"`` -> ``"fasttext-numpy2-wheel"`` (normalised as PEP 503 does)."""
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1)
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_top_level(paths: list[Path]) -> dict[str, str]:
    """Top-level module name -> the first file importing it (lazy imports inside functions count too)."""
    out: dict[str, str] = {}
    for p in paths:
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                out.setdefault(n.split(".")[0], str(p.relative_to(REPO_DIR)))
    return out


@needs_clone
@needs_toml
def test_every_imported_distribution_is_declared() -> None:
    """Each third-party module imported by src/ or tests/ comes from a distribution named in ``dependencies`` or an
    extra: an undeclared one works on a machine that happens to have it and fails for a user."""
    proj = _project()["project"]
    declared = {_req_name(r) for r in proj["dependencies"]}
    for reqs in proj.get("optional-dependencies", {}).values():
        declared |= {_req_name(r) for r in reqs}
    files = sorted((REPO_DIR / "src").rglob("*.py")) + sorted((REPO_DIR / "tests").rglob("*.py"))
    local = {p.stem for p in (REPO_DIR / "tests").rglob("*.py")} | {"lmselect", "tests"}
    dists = md.packages_distributions()
    missing = []
    for mod, where in sorted(_imported_top_level(files).items()):
        if mod in sys.stdlib_module_names or mod in local or mod == "__future__":
            continue
        names = {re.sub(r"[-_.]+", "-", d).lower() for d in dists.get(mod, [])} or {re.sub(r"[-_.]+", "-", mod).lower()}
        if not names & declared:
            missing.append(f"{mod} ({where}; distribution {sorted(names)})")
    assert not missing, "imported but not declared in pyproject.toml: " + "; ".join(missing)


def _datatrove_steps() -> dict[str, type]:
    """The datatrove pipeline steps lmselect builds (its prefilters and its scorer step) and those the README's or the
    guide's code shows: name -> class."""
    from datatrove.pipeline.base import PipelineStep

    from lmselect.data.prefilter import FILTERS

    steps: dict[str, type] = {}
    docs = [README, *sorted((REPO_DIR / "docs").rglob("*.md"))]  # the README and the guide pages (engines: datatrove)
    text = "\n".join(p.read_text() for p in docs if p.is_file())
    names = set(re.findall(r"from datatrove[\w.]* import ([\w, ]+)", text))
    for group in names:
        for name in (n.strip() for n in group.split(",")):
            for modname in ("datatrove.pipeline.readers", "datatrove.pipeline.writers", "datatrove.executor"):
                obj = getattr(importlib.import_module(modname), name, None)
                if isinstance(obj, type):
                    steps[name] = obj
    filters = importlib.import_module("datatrove.pipeline.filters")
    for name, spec in FILTERS.items():
        steps[f"prefilter {name}"] = getattr(filters, spec.cls)
    from lmselect.integrations.datatrove import LmselectScorer

    steps["LmselectScorer"] = LmselectScorer
    return {k: v for k, v in steps.items() if issubclass(v, PipelineStep)}


def test_datatrove_steps_find_their_runtime_dependencies() -> None:
    """datatrove checks a step's ``_requires_dependencies`` only when the step is built (JsonlReader needs orjson),
    after the install looked fine: every step lmselect or its README uses must find them here."""
    steps = _datatrove_steps()
    assert {"JsonlReader", "JsonlWriter", "LmselectScorer"} <= set(steps), sorted(steps)
    missing = []
    for label, cls in sorted(steps.items()):
        for dep in (d for t in cls.mro() for d in getattr(t, "_requires_dependencies", [])):
            mod = dep[0] if isinstance(dep, tuple) else dep
            try:
                importlib.import_module(mod)
            except ImportError:
                missing.append(f"{label} needs {dep}")
    assert not missing, "; ".join(missing)


def test_datatrove_jsonl_round_trip(tmp_path: Path) -> None:
    """The README's reader and writer run end to end in a local executor (the path that failed without orjson)."""
    import gzip
    import json

    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": f"text {i}"}) + "\n" for i in range(3)))
    LocalPipelineExecutor(pipeline=[JsonlReader(str(tmp_path / "in")), JsonlWriter(str(tmp_path / "out"))],
                          tasks=1, workers=1, logging_dir=str(tmp_path / "logs")).run()
    rows = [json.loads(line) for f in sorted((tmp_path / "out").glob("*.jsonl.gz")) for line in gzip.open(f, "rt")]
    assert [r["id"] for r in rows] == ["d0", "d1", "d2"] and rows[2]["text"] == "text 2"


@needs_clone
@needs_toml
def test_every_bundled_data_file_is_package_data() -> None:
    """Each file under ``lmselect/bundled`` that the package reads matches a ``package-data`` pattern, so the wheel
    carries the demo corpus, its selection / report sets and the task slices."""
    patterns = _project()["tool"]["setuptools"]["package-data"]["lmselect"]
    pkg = DATA_DIR.parent
    files = [p.relative_to(pkg).as_posix() for p in DATA_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert len(files) >= 20, files
    # setuptools matches each pattern part by part; fnmatch's * also crosses "/", so compare the depth too
    unmatched = [f for f in files if not any(fnmatch.fnmatch(f, pat) and f.count("/") == pat.count("/") for pat in patterns)]
    assert not unmatched, f"bundled files missing from [tool.setuptools.package-data]: {unmatched}"


def test_bundled_data_is_found_inside_the_package() -> None:
    """The demo's data lives in the installed package, not beside a clone: ``bundled:`` paths resolve under
    ``lmselect/`` (importlib.resources), which is what makes ``lmselect demo`` work from a wheel in any directory."""
    import lmselect
    from lmselect.recipe import resolve_path

    pkg = Path(lmselect.__file__).resolve().parent
    assert DATA_DIR.resolve().parent == pkg
    for rel in ("demo/lambada_select.jsonl", "demo/lambada_report.jsonl", "demo/clean_val.jsonl", "tasks/SOURCE.md"):
        p = Path(resolve_path(f"bundled:{rel}"))
        assert p.is_file() and p.resolve().is_relative_to(pkg), p
    assert sorted(p.name for p in (DATA_DIR / "demo" / "corpus").glob("*.jsonl.gz"))


def test_version_is_one_source() -> None:
    """``lmselect --version``, ``lmselect.__version__`` and the installed metadata agree."""
    import lmselect
    from lmselect.cli import main

    assert md.version("lmselect") == lmselect.__version__
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
