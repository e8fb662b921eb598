"""``lmselect select``: keep a fraction of scored sequences (deterministic top, seeded Gumbel-top-k, or random).

    lmselect select --scores scores/ --pool POOL --fraction 0.2 --out selection/
    lmselect select --scores scores/ --fraction 0.2 --method gumbel --temperature 0.5 --seed 1 --lowest --out sel/
    lmselect select --scores jsonl_scores/ --fraction 0.2 --out selection/      # documents of a .jsonl file

On the scores of a .jsonl file (``lmselect score --jsonl``) the candidates are the file's documents with a score
(their rolled-up ``documents.parquet`` score), ``selected.npy`` holds their 0-based record numbers and
``selected.jsonl.gz`` the selected records, byte for byte as they are in the file, in file order; the per-source
rates use the records' ``source`` field.

Writes (DESIGN "Selection") ``selected.npy`` (sorted int64 seq ids), ``summary.json`` (method, fraction, k,
n_candidates, threshold, 50-bin histograms of candidate and selected scores, per-source candidates/selected/rate),
``score_hist.png`` (with the threshold line), ``source_rates.png``, ``config.yaml`` and manifest kind="selection".
The directory is built in a temporary place and renamed, so it is all or nothing; the same command twice gives a
byte-identical ``selected.npy``. The format and its writer / reader live in ``select/selection.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmselect.artifacts import (
    LmselectError,
    parent_ref,
    read_json,
    read_manifest,
)
from lmselect.data.records import write_selected_files
from lmselect.select.selection import SELECTED_RECORDS, write_selection
from lmselect.select.topk import gumbel_topk, random_fraction, top_fraction

log = logging.getLogger("lmselect.select")

METHODS = ("top", "gumbel", "random")


@dataclass
class SelectConfig:
    """Resolved ``lmselect select`` configuration (saved as ``config.yaml``)."""

    scores: str = ""
    pool: str | None = None  # default: the pool the scores were computed on (their manifest's parent)
    fraction: float = 0.2
    method: str = "top"  # top | gumbel | random
    temperature: float = 0.5  # gumbel only
    seed: int = 0  # gumbel noise / random draw
    lowest: bool = False  # keep the lowest scores (MATES: lowest predicted loss)
    pool_shard: str | None = None  # restrict candidates to these pool shard(s), e.g. "1" or "0,2"
    out: str = ""


def check_fraction(fraction: Any) -> float:
    """``fraction`` as a float in (0, 1], or a one-line error naming ``--fraction``."""
    from lmselect.config import check_fraction as check

    return check(fraction, "--fraction")


def select_ids(
    method: str,
    cand_ids: np.ndarray,
    scores: np.ndarray | None,
    fraction: float,
    *,
    temperature: float = 0.5,
    seed: int = 0,
    largest: bool = True,
) -> np.ndarray:
    """Sorted selected ids. ``top``: deterministic, ties by lower seq id; ``gumbel``: seeded Gumbel-top-k at
    ``temperature``; ``random``: seeded uniform (scores ignored)."""
    fraction = check_fraction(fraction)
    if method == "random":
        return random_fraction(cand_ids, fraction, seed)
    if method not in METHODS:
        raise LmselectError(f"--method must be one of {', '.join(METHODS)}; got {method!r}")
    if scores is None:
        raise LmselectError(f"--method {method} needs scores")
    if method == "top":
        return top_fraction(cand_ids, scores, fraction, largest=largest)
    if not temperature > 0:
        raise LmselectError(f"--temperature must be > 0 for Gumbel-top-k, got {temperature}")
    return gumbel_topk(cand_ids, scores, fraction, temperature, seed, largest=largest)


# ----------------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scores", required=True, help="scores sidecar directory (lmselect score)")
    parser.add_argument("--pool", help="pool the scores refer to (default: the scores' parent pool)")
    parser.add_argument("--fraction", type=float, required=True, help="fraction of candidates to keep, in (0, 1]")
    parser.add_argument("--method", default="top", help="top (deterministic), gumbel (seeded Gumbel-top-k), random")
    parser.add_argument("--temperature", type=float, default=0.5, help="Gumbel temperature tau (gumbel only)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Gumbel noise / random draw")
    parser.add_argument("--lowest", action="store_true", help="keep the lowest scores instead of the highest")
    parser.add_argument("--pool-shard", help="only candidates from these pool shard(s), e.g. 1 or 0,2")
    parser.add_argument("--out", required=True, help="output selection directory")


def _scores_pool(scores_dir: Path, man: dict[str, Any], pool_arg: str | None) -> Any:
    from lmselect.data.pool import TokenPool

    pool_parents = [p for p in man.get("parents", []) if p.get("kind") == "pool"]
    if pool_arg is None:
        if not pool_parents:
            raise LmselectError(f"{scores_dir}: the manifest names no pool; pass --pool")
        pool_arg = pool_parents[0]["path"]
    pool = TokenPool(pool_arg)
    if pool_parents and pool_parents[0].get("uuid") != pool.manifest.get("uuid"):
        raise LmselectError(
            f"{scores_dir}: scores were computed on pool {pool_parents[0].get('path')} "
            f"(uuid {pool_parents[0].get('uuid')}), not {pool_arg}"
        )
    return pool


def run(args: argparse.Namespace) -> int:
    from lmselect.config import load_config, to_dict
    from lmselect.score import read_scores

    fraction = check_fraction(args.fraction)  # before any I/O: a typo should fail fast
    base = {f.name: getattr(args, f.name) for f in dataclasses.fields(SelectConfig) if hasattr(args, f.name)}
    base["fraction"] = fraction
    cfg = load_config(SelectConfig, None, getattr(args, "overrides", []) or [], base=base)
    cfg.fraction = check_fraction(cfg.fraction)
    if cfg.method not in METHODS:
        raise LmselectError(f"--method must be one of {', '.join(METHODS)}; got {cfg.method!r}")
    if cfg.method == "gumbel" and not cfg.temperature > 0:
        raise LmselectError(f"--temperature must be > 0 for Gumbel-top-k, got {cfg.temperature}")
    scores_dir = Path(cfg.scores)
    man = read_manifest(scores_dir, kind="scores")
    if man.get("extra", {}).get("input") == "jsonl":
        out = _select_documents(cfg, scores_dir, man)
        _print_summary(out, cfg.method)
        return 0
    pool = _scores_pool(scores_dir, man, cfg.pool)
    cand, scores = read_scores(scores_dir)
    if len(cand) and (cand[0] < 0 or cand[-1] >= len(pool)):
        raise LmselectError(f"{scores_dir}: seq_id {int(cand[-1] if cand[-1] >= len(pool) else cand[0])} is not in {pool.path}")
    if cfg.pool_shard is not None:
        from lmselect.score import pool_ids

        keep = np.isin(cand, pool_ids(pool, cfg.pool_shard))
        cand, scores = cand[keep], scores[keep]
    if len(cand) == 0:
        raise LmselectError(f"{scores_dir}: no candidate sequences to select from")
    bad = ~np.isfinite(scores)
    if cfg.method != "random" and bad.any():
        raise LmselectError(f"{scores_dir}: {int(bad.sum())} scores are NaN/inf (e.g. seq_id {int(cand[bad][0])})")
    sel = select_ids(cfg.method, cand, scores, cfg.fraction, temperature=cfg.temperature, seed=cfg.seed,
                     largest=not cfg.lowest)
    extra: dict[str, Any] = {"lowest": cfg.lowest, "seed": cfg.seed, "scores": str(scores_dir)}
    if cfg.method == "gumbel":
        extra["temperature"] = cfg.temperature
    out = write_selection(cfg.out, pool, cand, scores, sel, cfg.method, cfg.fraction, extra=extra,
                          parents=[parent_ref(scores_dir), parent_ref(pool.path)], config=to_dict(cfg),
                          seed=cfg.seed, largest=not cfg.lowest)
    _print_summary(out, cfg.method)
    return 0


def _print_summary(out: Path, method: str) -> None:
    summary = json.loads((out / "summary.json").read_text())
    thr = summary["threshold"]
    rates = ", ".join(f"{k} {v['rate']:.2f}" for k, v in summary["per_source"].items())
    unit = "documents" if summary.get("unit") == "documents" else ""
    print(f"selected {summary['k']} of {summary['n_candidates']} {unit}".rstrip() + f" ({method}"
          + (f", threshold {thr:.6g}" if thr is not None else "") + f") -> {out}; rate per source: {rates}")


# ----------------------------------------------------------------------------------------------------------------
# document selections (scores of a .jsonl file)


class _DocumentSources:
    """What ``build_summary`` needs of a pool, for documents: the source label of each record number."""

    def __init__(self, path: Path, sources: list[str]):
        self.path = path
        self._sources = np.asarray(sources, dtype=object)

    def sources(self, ids: np.ndarray) -> np.ndarray:
        return self._sources[np.asarray(ids, dtype=np.int64)]


def _scored_files(scores_dir: Path, man: dict[str, Any]) -> list[tuple[Path, str]]:
    """The .jsonl files the scores were computed on (path, relative name), refused when one changed since (its lines
    would not match)."""
    from lmselect.score import JOB_FILE

    extra = man.get("extra", {})
    files = [(Path(f["path"]), f["file"]) for f in extra.get("jsonl_files", [])] or [
        (Path(extra.get("jsonl", "")), "")]
    keys = (read_json(scores_dir / JOB_FILE) if (scores_dir / JOB_FILE).is_file() else {}).get("jsonl", [])
    keys = keys if isinstance(keys, list) else [keys]
    for i, (jsonl, _) in enumerate(files):
        if not jsonl.is_file():
            raise LmselectError(f"{scores_dir}: the scored file {jsonl} is gone; select needs it to write the records")
        key = keys[i] if i < len(keys) else {}
        st = jsonl.stat()
        if key and (key.get("bytes") != st.st_size or key.get("mtime_ns") != st.st_mtime_ns):
            raise LmselectError(f"{jsonl}: changed since it was scored into {scores_dir} (size or mtime differ); "
                                "rescore it")
    return files


def _select_documents(cfg: SelectConfig, scores_dir: Path, man: dict[str, Any]) -> Path:
    """Select documents of a scored .jsonl file by their rolled-up scores; see the module docstring."""
    from lmselect.config import to_dict
    from lmselect.score import read_documents

    if cfg.pool is not None or cfg.pool_shard is not None:
        raise LmselectError(f"{scores_dir}: scores of a .jsonl file; --pool and --pool-shard apply to pool scores only")
    files = _scored_files(scores_dir, man)
    jsonl = files[0][0] if len(files) == 1 else Path(man.get("extra", {}).get("jsonl", ""))
    docs = read_documents(scores_dir)
    idx = docs.column("doc_index").to_numpy().astype(np.int64)
    scores = docs.column("score").to_numpy(zero_copy_only=False).astype(np.float32)
    scored = np.isfinite(scores)  # documents without a finite window score (empty text) cannot be ranked
    cand, cand_scores = idx[scored], scores[scored]
    if len(cand) == 0:
        raise LmselectError(f"{scores_dir}: no document has a score to select by")
    sel = select_ids(cfg.method, cand, cand_scores, cfg.fraction, temperature=cfg.temperature, seed=cfg.seed,
                     largest=not cfg.lowest)
    extra: dict[str, Any] = {"lowest": cfg.lowest, "seed": cfg.seed, "scores": str(scores_dir), "unit": "documents",
                             "jsonl": str(jsonl), "unscored_documents": int((~scored).sum()),
                             "records": SELECTED_RECORDS}
    if cfg.method == "gumbel":
        extra["temperature"] = cfg.temperature
    return write_selection(
        cfg.out, _DocumentSources(jsonl, docs.column("source").to_pylist()), cand, cand_scores, sel, cfg.method,
        cfg.fraction, extra=extra, parents=[parent_ref(scores_dir)], config=to_dict(cfg), seed=cfg.seed,
        largest=not cfg.lowest, extra_files=lambda tmp: write_selected_files(files, docs, sel, tmp / SELECTED_RECORDS),
    )
