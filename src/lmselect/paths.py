"""Where bundled data lives. Nothing here (or anywhere at run time) reads the staging folder beside the repo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parents[1]
DATA_DIR = REPO_DIR / "data"  # bundled demo corpus, validation text and eval-task slices (editable install)
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
