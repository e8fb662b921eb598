"""Where things live in a run directory (DESIGN "Run directory"): the one room that both builds and parses its paths.

::

    RUN/pool/                                  (unless recipe pool.path)
    RUN/warmup/{target,proxy}/
    RUN/<method>/seed<k>/<seed stage>/         (e.g. the reference of rho1 and of reference)
    RUN/<method>/seed<k>/round<r>/<stage>/     (stage in STAGE_ORDER: bilevel, influence, scores, selection, ...)
    RUN/<method>/seed<k>/round<r>/selection/{selected.npy, summary.json}
    RUN/<method>/seed<k>/round<r>/eval/results.json
    RUN/{results.json, results.md, report.html, figures/, .lock}

Method seeds are 0..999 (the recipe refuses others), so a seed directory is ``seed`` + digits: one rule,
:data:`SEED_DIR`, for every reader (provenance, export, the report, stage identity). :meth:`RunLayout.path` builds a
:class:`RunPath` and :meth:`RunLayout.parse` reads one back; ``parse(path(x)) == x``. A layout rooted at ``"."``
gives the run-relative keys stage identity uses (``RUN/stages.json``: ``mates/seed0/round1/target``).

This module imports nothing of lmselect, so any room may use it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SEED_DIR = re.compile(r"^seed(\d+)$")
ROUND_DIR = re.compile(r"^round(\d+)$")
WARMUP = "warmup"
POOL = "pool"
WARMUP_MODELS = ("target", "proxy")
# files of a round's stages
SELECTED_FILE = "selected.npy"  # selection/: the selected sequence ids
SUMMARY_FILE = "summary.json"  # selection/: the selection's summary
EVAL_RESULTS_FILE = "results.json"  # eval/: the round's evaluation
TRAIN_LOG_FILE = "train_log.jsonl"  # a checkpoint's (warmup/*, target/) training log


@dataclass(frozen=True)
class RunPath:
    """A place in a run directory, as :meth:`RunLayout.parse` reads it: the pool, a warm-up model (``warmup`` =
    target / proxy), a method's directory, a seed's, a seed stage (``seed`` + ``stage``), a round's, or a round's
    stage (``round`` + ``stage``)."""

    method: str | None = None
    seed: int | None = None
    round: int | None = None
    stage: str | None = None
    warmup: str | None = None
    pool: bool = False


def seed_name(seed: int) -> str:
    """``seed<k>``; a seed outside 0..999 has no directory (the recipe refuses it first)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"a method seed is an integer >= 0, got {seed!r}")
    return f"seed{seed}"


def round_name(rnd: int) -> str:
    if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
        raise ValueError(f"a round is an integer >= 0, got {rnd!r}")
    return f"round{rnd}"


def parse_seed(name: str) -> int | None:
    """The seed of a ``seed<k>`` directory name, else None."""
    m = SEED_DIR.match(name)
    return int(m.group(1)) if m else None


def parse_round(name: str) -> int | None:
    """The round of a ``round<r>`` directory name, else None."""
    m = ROUND_DIR.match(name)
    return int(m.group(1)) if m else None


class RunLayout:
    """Paths inside a run directory (DESIGN "Run directory"), built and parsed here only."""

    def __init__(self, run_dir: str | Path, pool_path: str | Path | None = None):
        self.root = Path(run_dir)
        self._pool_path = Path(pool_path) if pool_path else None

    # ---- building ---------------------------------------------------------------------------------------------
    @property
    def pool(self) -> Path:
        return self._pool_path or self.root / POOL

    def warmup(self, which: str) -> Path:
        return self.root / WARMUP / which

    def method(self, method: str) -> Path:
        return self.root / method

    def seed(self, method: str, seed: int) -> Path:
        return self.root / method / seed_name(seed)

    def round(self, method: str, seed: int, rnd: int) -> Path:
        return self.seed(method, seed) / round_name(rnd)

    def stage(self, method: str, seed: int, rnd: int, stage: str) -> Path:
        return self.round(method, seed, rnd) / stage

    def target(self, method: str, seed: int, rnd: int) -> Path:
        """The target checkpoint a round *ends* with; round 0 is the warm-up target."""
        return self.warmup("target") if rnd == 0 else self.stage(method, seed, rnd, "target")

    def selected(self, method: str, seed: int, rnd: int) -> Path:
        return self.stage(method, seed, rnd, "selection") / SELECTED_FILE

    def selection_summary(self, method: str, seed: int, rnd: int) -> Path:
        return self.stage(method, seed, rnd, "selection") / SUMMARY_FILE

    def eval_results(self, method: str, seed: int, rnd: int) -> Path:
        return self.stage(method, seed, rnd, "eval") / EVAL_RESULTS_FILE

    def path(self, p: RunPath) -> Path:
        """The directory of ``p`` (the inverse of :meth:`parse`)."""
        if p.pool:
            return self.pool
        if p.warmup is not None:
            return self.warmup(p.warmup)
        if p.method is None:
            return self.root
        if p.seed is None:
            return self.method(p.method)
        d = self.seed(p.method, p.seed)
        if p.round is not None:
            d = d / round_name(p.round)
        return d / p.stage if p.stage is not None else d

    def key(self, p: RunPath) -> str:
        """``p`` relative to the run, with ``/`` (stage identity's keys)."""
        return self.path(p).relative_to(self.root).as_posix() if not (p.pool and self._pool_path) else POOL

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def results_json(self) -> Path:
        return self.root / "results.json"

    @property
    def results_md(self) -> Path:
        return self.root / "results.md"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    # ---- parsing ----------------------------------------------------------------------------------------------
    def parse(self, path: str | Path) -> RunPath | None:
        """What ``path`` (under the run directory, or relative to it) is, or None for anything else (the run dir
        itself, files, directories the layout does not know)."""
        p = Path(path)
        if p.is_absolute() or (self.root != Path(".") and p.parts[:len(self.root.parts)] == self.root.parts):
            try:
                p = p.relative_to(self.root)
            except ValueError:
                return None
        parts = p.parts
        if not parts or parts[0].startswith("."):
            return None
        if parts[0] == POOL:
            return RunPath(pool=True) if len(parts) == 1 else None
        if parts[0] == WARMUP:
            return RunPath(warmup=parts[1]) if len(parts) == 2 else None
        if len(parts) == 1:
            return RunPath(method=parts[0])
        seed = parse_seed(parts[1])
        if seed is None or len(parts) > 4:
            return None
        if len(parts) == 2:
            return RunPath(method=parts[0], seed=seed)
        rnd = parse_round(parts[2])
        if len(parts) == 3:
            return RunPath(parts[0], seed, rnd) if rnd is not None else RunPath(parts[0], seed, stage=parts[2])
        return RunPath(parts[0], seed, rnd, parts[3]) if rnd is not None else None

    # ---- what is on disk --------------------------------------------------------------------------------------
    def seeds(self, method: str) -> dict[int, Path]:
        """The seed directories of ``method`` on disk, by seed."""
        d = self.method(method)
        if not d.is_dir():
            return {}
        return {k: s for s in d.iterdir() if s.is_dir() and (k := parse_seed(s.name)) is not None}

    def rounds(self, method: str, seed: int) -> dict[int, Path]:
        """The round directories of ``method`` / ``seed`` on disk, by round."""
        d = self.seed(method, seed)
        if not d.is_dir():
            return {}
        return {r: x for x in d.iterdir() if x.is_dir() and (r := parse_round(x.name)) is not None}

    def round_paths(self) -> Iterator[RunPath]:
        """Every ``<method>/seed<k>/round<r>`` directory on disk (methods in name order, then seed, then round)."""
        if not self.root.is_dir():
            return
        for m in sorted(x.name for x in self.root.iterdir() if x.is_dir() and not x.name.startswith(".")):
            for k in sorted(self.seeds(m)):
                for r in sorted(self.rounds(m, k)):
                    yield RunPath(m, k, r)

    def has_seeds(self) -> bool:
        """Any ``<method>/seed<k>/`` directory on disk."""
        return self.root.is_dir() and any(self.seeds(x.name) for x in self.root.iterdir()
                                          if x.is_dir() and not x.name.startswith("."))
