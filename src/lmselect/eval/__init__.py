"""Downstream evaluation with lm-evaluation-harness (``lmselect eval``) on local or bundled task data.

Public API (the harness is imported lazily, on first use):

* :func:`evaluate_model` — a live model + tokenizer in memory -> results dict
* :func:`evaluate_checkpoint` — an HF-format checkpoint directory -> results.json + manifest kind=eval
* :func:`headline_average`, :data:`HEADLINE_TASKS`, :data:`ALL_TASKS`, :func:`build_tasks`
"""

from __future__ import annotations

from typing import Any

from lmselect.eval import harness
from lmselect.eval.tasks import ALL_TASKS, HEADLINE_TASKS, LOCAL_TASKS, build_tasks, resolve_task_names

__all__ = [
    "ALL_TASKS",
    "HEADLINE_TASKS",
    "LOCAL_TASKS",
    "build_tasks",
    "resolve_task_names",
    "evaluate_model",
    "evaluate_checkpoint",
    "headline_average",
    "EvalConfig",
]


def __getattr__(name: str) -> Any:
    # harness.py imports numpy/torch-adjacent code; keep `import lmselect.eval` cheap for the CLI's --help
    if name in ("evaluate_model", "evaluate_checkpoint", "headline_average", "EvalConfig", "format_results"):
        return getattr(harness, name)
    raise AttributeError(name)
