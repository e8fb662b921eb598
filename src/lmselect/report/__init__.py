"""Write report.html, figures and the results table of a run directory, from its artifacts alone.

``lmselect report RUN_DIR`` reads only files under the run directory (manifests, ``train_log.jsonl``,
``bilevel_log.jsonl``, scores parquet parts, ``selection/summary.json`` + ``selected.npy``, ``eval/results.json``, the
pool for decoding examples) -- never live state -- and writes::

    RUN/report.html      self-contained: inline CSS, figures embedded as base64 data URIs, no external requests
    RUN/figures/*.png    the same figures as files
    RUN/results.md       headline table per method and seed (+ per-task table)
    RUN/results.json     the same numbers, machine-readable (deterministic: no timestamps, no absolute paths)

Missing pieces (a run in progress, a method without scores, no downstream eval) are skipped with a note.

Layout: ``model`` (the read model: :func:`collect` -> :class:`RunData`), ``results`` (headline numbers and tables),
``figures`` (one function per figure; drawing in ``plots``), ``html`` (report.html and examples), ``cli``.
The pipeline imports only ``lmselect.report.results``.
"""

from __future__ import annotations

from lmselect.report.cli import add_arguments, run
from lmselect.report.figures import concat_logs, make_figures
from lmselect.report.html import examples, render_html, write_report
from lmselect.report.model import RoundData, RunData, collect, stage_seconds
from lmselect.report.results import results, results_markdown, write_results

__all__ = [
    "collect", "results", "results_markdown", "write_results", "make_figures", "concat_logs", "examples",
    "render_html", "write_report", "add_arguments", "run", "RunData", "RoundData", "stage_seconds",
]
