"""The selection artifact's format (DESIGN "Selection"): the one writer every selection (``lmselect select``, every
method of the pipeline) goes through, and its reader.

A selection directory holds ``selected.npy`` (sorted, unique int64 sequence ids; for a document selection the
records' 0-based numbers), ``summary.json`` (method, fraction, k, n_candidates, threshold, 50-bin histograms of
candidate and selected scores, per-source candidates / selected / rate), ``score_hist.png``, ``source_rates.png``,
``config.yaml``, optionally ``selected.jsonl.gz`` (a document selection's records) and, last, the manifest
(kind=selection). It is built in a temporary place and renamed: all or nothing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from lmselect.artifacts import (
    LmselectError,
    Manifest,
    atomic_path,
    atomic_save_npy,
    atomic_write_json,
    atomic_write_text,
    check_replaceable,
    read_manifest,
    write_manifest,
)
from lmselect.layout import SELECTED_FILE, SUMMARY_FILE
from lmselect.select.summary import build_summary, plot_score_hist, plot_source_rates

log = logging.getLogger("lmselect.select")

SELECTED_RECORDS = "selected.jsonl.gz"  # document selections: the selected records of the scored .jsonl file
#: the files a selection directory may hold: only such a directory is replaced
OWN_FILES = {SELECTED_FILE, SUMMARY_FILE, "score_hist.png", "source_rates.png", "config.yaml", "manifest.json",
             SELECTED_RECORDS}


def check_out_dir(out: Path) -> None:
    """Refuse to replace a directory that is not a (possibly incomplete) selection: it may be someone's data."""
    check_replaceable(out, "selection", OWN_FILES)


def write_selection(
    out_dir: str | Path,
    pool: Any,
    cand_ids: np.ndarray,
    scores_or_None: np.ndarray | None,
    selected: np.ndarray,
    method: str,
    fraction: float,
    extra: dict[str, Any] | None = None,
    parents: list[dict[str, str]] | None = None,
    *,
    config: dict[str, Any] | None = None,
    seed: int | None = None,
    largest: bool | None = None,
    plots: bool = True,
    extra_files: Callable[[Path], None] | None = None,
) -> Path:
    """Write a complete selection artifact atomically (all files, then the manifest, then one rename).

    ``scores_or_None`` are aligned with ``cand_ids``; ``largest`` defaults to ``not extra["lowest"]``; ``extra`` is
    merged into ``summary.json`` and the manifest's ``extra``; ``extra_files(tmp_dir)`` writes further files into
    the artifact before its manifest (document selections: ``selected.jsonl.gz``). Returns ``out_dir``.
    """
    out = Path(out_dir)
    cand_ids = np.asarray(cand_ids, dtype=np.int64)
    sel = np.unique(np.asarray(selected, dtype=np.int64))  # sorted, unique
    if len(sel) != len(np.asarray(selected)):
        raise LmselectError(f"{out}: selection has duplicate ids")
    if not np.all(np.isin(sel, cand_ids)):
        raise LmselectError(f"{out}: selection contains ids that are not candidates")
    extra = dict(extra or {})
    if largest is None:
        largest = not bool(extra.get("lowest", False))
    if seed is None and extra.get("seed") is not None:
        seed = int(extra["seed"])
    summary = build_summary(pool, cand_ids, scores_or_None, sel, method, fraction, largest=largest, extra=extra)
    cfg = config if config is not None else {"method": method, "fraction": float(fraction), **extra}
    cfg = json.loads(json.dumps(cfg, default=str))
    check_out_dir(out)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        atomic_save_npy(tmp / SELECTED_FILE, sel)
        atomic_write_json(tmp / SUMMARY_FILE, summary)
        if plots:
            plot_score_hist(summary, tmp / "score_hist.png")
            plot_source_rates(summary, tmp / "source_rates.png")
        atomic_write_text(tmp / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
        if extra_files is not None:
            extra_files(tmp)
        write_manifest(
            tmp,
            Manifest(
                kind="selection", config=cfg, seed=seed, parents=list(parents or []),
                counts={"candidates": int(len(cand_ids)), "selected": int(len(sel))},
                extra={"method": method, "fraction": float(fraction), "threshold": summary["threshold"],
                       "largest": bool(largest), "pool": str(getattr(pool, "path", "")), **extra},
            ),
        )
    log.info("selection: %s (%s, %d of %d)", out, method, len(sel), len(cand_ids))
    return out


def read_selection(sel_dir: str | Path) -> np.ndarray:
    """Selected ids (sorted int64) of a complete selection artifact."""
    d = Path(sel_dir)
    read_manifest(d, kind="selection")
    try:
        ids = np.load(d / SELECTED_FILE)
    except (OSError, ValueError) as e:
        raise LmselectError(f"{d / SELECTED_FILE}: unreadable ({str(e).splitlines()[0][:200]})") from None
    return np.asarray(ids, dtype=np.int64)
