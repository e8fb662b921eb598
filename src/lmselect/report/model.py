"""The report's read model: everything a report, ``results.json`` or ``compare`` uses, read from the run directory
alone (manifests, logs, sidecars, selections, eval results) -- never live state."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmselect.artifacts import MANIFEST, ArtifactError, LmselectError, read_json, read_manifest
from lmselect.layout import EVAL_RESULTS_FILE, SELECTED_FILE, SUMMARY_FILE, TRAIN_LOG_FILE, WARMUP_MODELS, RunLayout
from lmselect.log import read_jsonl
from lmselect.provenance import DONE, is_run_dir, pool_dir, read_run_config, round_dir, stage_status

#: stages whose manifest ``timings`` count as selection wall time
SELECTION_STAGES: tuple[str, ...] = ("reference", "bilevel", "influence", "scores", "selection")



def _complete_manifest(d: Path) -> dict[str, Any] | None:
    try:
        return read_manifest(d)
    except ArtifactError:
        return None


def stage_seconds(timings: dict[str, Any] | None) -> float | None:
    """Wall seconds of a stage from its manifest ``timings``: ``total`` when present, else the sum of the values."""
    if not isinstance(timings, dict) or not timings:
        return None
    if isinstance(timings.get("total"), (int, float)):
        return float(timings["total"])
    vals = [float(v) for v in timings.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return sum(vals) if vals else None


@dataclass
class RoundData:
    """Everything the report uses from one ``RUN/<method>/seed<k>/round<r>/``."""

    method: str
    seed: int
    round: int
    dir: Path
    status: str
    stages: dict[str, str]
    manifest: dict[str, Any] | None = None
    stage_manifests: dict[str, dict[str, Any]] = field(default_factory=dict)  # complete ones only
    summary: dict[str, Any] | None = None
    train_log: list[dict[str, Any]] = field(default_factory=list)
    bilevel_log: list[dict[str, Any]] = field(default_factory=list)
    eval: dict[str, Any] | None = None

    @property
    def scores_dir(self) -> Path | None:
        return self.dir / "scores" if "scores" in self.stage_manifests else None

    @property
    def selected_path(self) -> Path | None:
        p = self.dir / "selection" / SELECTED_FILE
        return p if "selection" in self.stage_manifests and p.is_file() else None

    def selection_seconds(self) -> float | None:
        # The pipeline measures the whole selection wall time of a round (bilevel + scoring + select, or MATES
        # probes + influence model) in the round manifest; stage manifests are the fallback for partial rounds.
        t = (self.manifest or {}).get("timings", {}).get("selection")
        if isinstance(t, (int, float)):
            return float(t)
        vals = [stage_seconds(self.stage_manifests[s].get("timings")) for s in SELECTION_STAGES
                if s in self.stage_manifests]
        vals = [v for v in vals if v is not None]
        return sum(vals) if vals else None

    def config_hash(self) -> str | None:
        for m in (self.manifest, self.stage_manifests.get("target"), self.stage_manifests.get("eval")):
            if m and m.get("config_hash"):
                return str(m["config_hash"])
        return None


@dataclass
class RunData:
    run_dir: Path
    manifest: dict[str, Any] | None
    config: dict[str, Any]
    status: dict[str, Any]
    rounds: dict[str, dict[int, dict[int, RoundData]]]  # method -> seed -> round -> data
    warmup_logs: dict[str, list[dict[str, Any]]]
    pool: Path | None
    notes: list[str] = field(default_factory=list)  # files that could not be read

    def methods(self) -> list[str]:
        return list(self.rounds)

    def iter_rounds(self, method: str | None = None) -> list[RoundData]:
        out = []
        for m, seeds in self.rounds.items():
            if method is not None and m != method:
                continue
            for _, rounds in sorted(seeds.items()):
                out += [rd for _, rd in sorted(rounds.items())]
        return out


def collect(run_dir: str | Path) -> RunData:
    """Read everything the report needs from a run directory (incomplete artifacts are left out, logs kept)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LmselectError(f"{run_dir}: no such run directory")
    if not is_run_dir(run_dir):
        raise LmselectError(f"{run_dir}: not a run directory (no run manifest, config.yaml with methods, or <method>/seed*/)")
    status = stage_status(run_dir)
    notes: list[str] = []
    rounds: dict[str, dict[int, dict[int, RoundData]]] = {}
    for method, seeds in status["rounds"].items():
        for seed, per_round in seeds.items():
            for r, info in per_round.items():
                rdir = round_dir(run_dir, method, seed, r)
                if not rdir.is_dir():
                    continue
                rd = RoundData(method, seed, r, rdir, info["status"], dict(info["stages"]))
                rd.manifest = _complete_manifest(rdir)
                for stage, st in info["stages"].items():
                    if st == DONE:
                        m = _complete_manifest(rdir / stage)
                        if m is not None:
                            rd.stage_manifests[stage] = m
                for stage, fname, attr in (("selection", SUMMARY_FILE, "summary"), ("eval", EVAL_RESULTS_FILE, "eval")):
                    f = rdir / stage / fname
                    if stage in rd.stage_manifests and f.is_file():
                        try:
                            obj = read_json(f)
                        except ArtifactError as e:
                            notes.append(f"ignored unreadable {e}")
                            continue
                        if isinstance(obj, dict):
                            setattr(rd, attr, obj)
                        else:
                            notes.append(f"ignored {f}: not a JSON object")
                rd.train_log = read_jsonl(rdir / "target" / TRAIN_LOG_FILE)  # also while training
                rd.bilevel_log = read_jsonl(rdir / "bilevel" / "bilevel_log.jsonl")
                rounds.setdefault(method, {}).setdefault(seed, {})[r] = rd
    warm = {w: read_jsonl(RunLayout(run_dir).warmup(w) / TRAIN_LOG_FILE) for w in WARMUP_MODELS}
    return RunData(
        run_dir=run_dir,
        manifest=_complete_manifest(run_dir) if (run_dir / MANIFEST).is_file() else None,
        config=read_run_config(run_dir),
        status=status,
        rounds=rounds,
        warmup_logs=warm,
        pool=pool_dir(run_dir),
        notes=notes,
    )


