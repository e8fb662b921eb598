"""Where bundled data lives. Nothing here (or anywhere at run time) reads the staging folder beside the repo."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parents[1]
DATA_DIR = REPO_DIR / "data"  # bundled demo corpus, validation text and eval-task slices (editable install)
DEMO_DIR = DATA_DIR / "demo"
TASKS_DIR = DATA_DIR / "tasks"
RECIPES_DIR = PACKAGE_DIR / "recipes"
