"""Where bundled data lives. Nothing here (or anywhere at run time) reads the staging folder beside the repo.

The demo corpus, its selection and report sets and the eval-task slices ship inside the package
(``lmselect/bundled``, package data), so an installed wheel runs ``lmselect demo`` from any directory; in a clone the
top-level ``data`` is a link to the same folder. Found through :mod:`importlib.resources`, which also answers for a
wheel installed into site-packages (a zip import would not give real paths: lmselect is not zip-safe).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(str(files("lmselect")))
REPO_DIR = PACKAGE_DIR.parents[1]  # the clone's root in an editable install (bench scripts, tests); not in a wheel
DATA_DIR = PACKAGE_DIR / "bundled"  # bundled demo corpus, validation text and eval-task slices
DEMO_DIR = DATA_DIR / "demo"
TASKS_DIR = DATA_DIR / "tasks"
RECIPES_DIR = PACKAGE_DIR / "recipes"


def portable(v: Any) -> Any:
    """Paths into the bundled data folder written back as ``bundled:REL`` (in dicts and lists too): an artifact's
    identity must not change when the package is installed somewhere else."""
    if isinstance(v, dict):
        return {k: portable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [portable(x) for x in v]
    if isinstance(v, str) and v.startswith(str(DATA_DIR) + "/"):
        return "bundled:" + v[len(str(DATA_DIR)) + 1:]
    return v
