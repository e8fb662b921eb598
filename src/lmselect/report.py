"""Write report.html, figures and the results table of a run directory, from its artifacts alone.

``lmselect report RUN_DIR`` reads only files under the run directory (manifests, ``train_log.jsonl``,
``bilevel_log.jsonl``, scores parquet parts, ``selection/summary.json`` + ``selected.npy``, ``eval/results.json``, the
pool for decoding examples) -- never live state -- and writes::

    RUN/report.html      self-contained: inline CSS, figures embedded as base64 data URIs, no external requests
    RUN/figures/*.png    the same figures as files
    RUN/results.md       headline table per method and seed (+ per-task table)
    RUN/results.json     the same numbers, machine-readable (deterministic: no timestamps, no absolute paths)

Missing pieces (a run in progress, a method without scores, no downstream eval) are skipped with a note.
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lmselect.artifacts import (
    MANIFEST,
    ArtifactError,
    LmselectError,
    atomic_write_json,
    atomic_write_text,
    read_json,
    read_manifest,
)
from lmselect.log import read_jsonl
from lmselect.provenance import (
    DONE,
    METHODS,
    is_run_dir,
    pool_dir,
    read_run_config,
    round_dir,
    stage_status,
    stale_artifacts,
)

#: stages whose manifest ``timings`` count as selection wall time
SELECTION_STAGES: tuple[str, ...] = ("reference", "bilevel", "influence", "scores", "selection")
BILEVEL_KEYS: tuple[tuple[str, str], ...] = (
    ("upper_loss", "upper loss"),
    ("lower_loss", "lower loss"),
    ("kl", "KL(target || proxy)"),
    ("hypergrad_norm", "hypergradient norm"),
)
VAL_LOSS_ORDER: tuple[str, ...] = ("lambada", "clean")


# ----------------------------------------------------------------------------------------------------------------
# reading the run directory


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


def read_scores_dir(d: Path) -> tuple[np.ndarray, np.ndarray]:
    """(seq_ids, scores) of a complete scores sidecar, sorted by seq_id."""
    import pyarrow.parquet as pq

    parts = sorted(d.glob("part-*.parquet"))
    if not parts:
        raise LmselectError(f"{d}: no part-*.parquet files")
    ids, sc = [], []
    for p in parts:
        t = pq.read_table(p, columns=["seq_id", "score"])
        ids.append(t.column("seq_id").to_numpy().astype(np.int64))
        sc.append(t.column("score").to_numpy().astype(np.float64))
    seq_ids, scores = np.concatenate(ids), np.concatenate(sc)
    order = np.argsort(seq_ids, kind="stable")
    return seq_ids[order], scores[order]


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
        p = self.dir / "selection" / "selected.npy"
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
                for stage, fname, attr in (("selection", "summary.json", "summary"), ("eval", "results.json", "eval")):
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
                rd.train_log = read_jsonl(rdir / "target" / "train_log.jsonl")  # also while training
                rd.bilevel_log = read_jsonl(rdir / "bilevel" / "bilevel_log.jsonl")
                rounds.setdefault(method, {}).setdefault(seed, {})[r] = rd
    warm = {w: read_jsonl(run_dir / "warmup" / w / "train_log.jsonl") for w in ("target", "proxy")}
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


# ----------------------------------------------------------------------------------------------------------------
# results table


def _downstream_score(task: dict[str, Any]) -> tuple[float | None, float | None, str]:
    """acc_norm where the task reports it, else acc (METHODS §6)."""
    for key in ("acc_norm", "acc"):
        if isinstance(task.get(key), (int, float)):
            se = task.get(key + "_stderr")
            return float(task[key]), (float(se) if isinstance(se, (int, float)) else None), key
    return None, None, ""


def _mean(vals: Sequence[float | None]) -> float | None:
    v = [x for x in vals if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(v)) if v else None


def _sum_or_none(vals: Sequence[Any]) -> float | None:
    v = [float(x) for x in vals if isinstance(x, (int, float))]
    return round(sum(v), 3) if v else None


def _se_of_mean(ses: Sequence[float | None]) -> float | None:
    """Standard error of the mean of independent estimates with standard errors ``ses``."""
    v = [x for x in ses if x is not None]
    return float(math.sqrt(sum(x * x for x in v)) / len(v)) if v else None


def results(data: RunData) -> dict[str, Any]:
    """Headline numbers per method and seed (final = last round with a complete eval). Deterministic."""
    rows: list[dict[str, Any]] = []
    tasks: dict[str, dict[str, dict[str, Any]]] = {}
    methods: dict[str, dict[str, Any]] = {}
    for method, seeds in data.rounds.items():
        mrows = []
        task_vals: dict[str, list[tuple[float, float | None, str]]] = {}
        for seed, rounds in sorted(seeds.items()):
            all_rounds = data.status["rounds"][method][seed]
            done = sum(1 for info in all_rounds.values() if info["status"] == DONE)
            evals = [rd for _, rd in sorted(rounds.items()) if rd.eval is not None]
            final = evals[-1] if evals else None
            sel = [rd.selection_seconds() for _, rd in sorted(rounds.items())]
            sel_v = [s for s in sel if s is not None]
            last = rounds[max(rounds)] if rounds else None
            row: dict[str, Any] = {
                "method": method,
                "seed": seed,
                "rounds_done": done,
                "rounds_expected": len(all_rounds),
                "final_round": final.round if final else None,
                "tokens": None,
                "val_loss": {},
                "downstream_average": None,
                "downstream_stderr": None,
                "selection_seconds": round(sum(sel_v), 3) if sel_v else None,
                # target training wall time; for token-level methods it includes their online selection overhead
                "train_seconds": _sum_or_none([(rd.stage_manifests.get("target") or {}).get("extra", {}).get("train_seconds")
                                               for _, rd in sorted(rounds.items())]),
                "config_hash": (final or last).config_hash() if (final or last) else None,
            }
            if final is not None:
                ev = final.eval or {}
                tok = ev.get("tokens")
                if tok is None and "target" in final.stage_manifests:
                    tok = final.stage_manifests["target"].get("extra", {}).get("tokens_seen")
                row["tokens"] = int(tok) if isinstance(tok, (int, float)) else None
                vl = ev.get("val_loss") or {}
                row["val_loss"] = {k: float(v) for k, v in vl.items() if isinstance(v, (int, float))}
                ds = ev.get("downstream")
                if isinstance(ds, dict):
                    if isinstance(ds.get("average"), (int, float)):
                        row["downstream_average"] = float(ds["average"])
                    if isinstance(ds.get("average_stderr"), (int, float)):
                        row["downstream_stderr"] = float(ds["average_stderr"])
                    for t, tv in (ds.get("tasks") or {}).items():
                        if isinstance(tv, dict):
                            sc, se, metric = _downstream_score(tv)
                            if sc is not None:
                                task_vals.setdefault(t, []).append((sc, se, metric))
            rows.append(row)
            mrows.append(row)
        vl_keys = sorted({k for r in mrows for k in r["val_loss"]}, key=_val_key)
        rates: dict[str, list[float]] = {}
        for seed, rounds in sorted(seeds.items()):
            for _, rd in sorted(rounds.items()):
                for src, d in ((rd.summary or {}).get("per_source") or {}).items():
                    if isinstance(d, dict) and isinstance(d.get("rate"), (int, float)):
                        rates.setdefault(src, []).append(float(d["rate"]))
        methods[method] = {
            "rate_per_source": {k: _mean(v) for k, v in sorted(rates.items())},
            "n_seeds": len(mrows),
            "tokens": _mean([r["tokens"] for r in mrows]),
            "val_loss": {k: _mean([r["val_loss"].get(k) for r in mrows]) for k in vl_keys},
            "downstream_average": _mean([r["downstream_average"] for r in mrows]),
            "downstream_stderr": _se_of_mean([r["downstream_stderr"] for r in mrows if r["downstream_average"] is not None]),
            "selection_seconds": _mean([r["selection_seconds"] for r in mrows]),
            "train_seconds": _mean([r["train_seconds"] for r in mrows]),
        }
        if task_vals:
            tasks[method] = {
                t: {"score": _mean([v[0] for v in vals]), "stderr": _se_of_mean([v[1] for v in vals]),
                    "metric": vals[0][2], "n_seeds": len(vals)}
                for t, vals in sorted(task_vals.items())
            }
    run_m = data.manifest or {}
    return {
        "run": data.run_dir.resolve().name,
        "run_uuid": run_m.get("uuid"),
        "config_hash": run_m.get("config_hash"),
        "rows": rows,
        "curves": _eval_curves(data),
        "methods": methods,
        "tasks": tasks,
    }


def _eval_curves(data: RunData) -> list[dict[str, Any]]:
    """Every evaluated round (decay branch) of every method and seed: the eval-vs-tokens table."""
    out = []
    for method, seeds in data.rounds.items():
        for seed, rounds in sorted(seeds.items()):
            for rnd, rd in sorted(rounds.items()):
                ev = rd.eval
                if not ev:
                    continue
                ds = ev.get("downstream") if isinstance(ev.get("downstream"), dict) else {}
                out.append({
                    "method": method, "seed": seed, "round": rnd, "tokens": ev.get("tokens"),
                    "val_loss": {k: float(v) for k, v in (ev.get("val_loss") or {}).items() if isinstance(v, (int, float))},
                    "downstream_average": ds.get("average"), "downstream_stderr": ds.get("average_stderr"),
                })
    return out


def _val_key(k: str) -> tuple[int, str]:
    return (VAL_LOSS_ORDER.index(k) if k in VAL_LOSS_ORDER else len(VAL_LOSS_ORDER), k)


def fmt_tokens(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{int(n)}"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "–"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _fmt_loss(v: float | None) -> str:
    return "–" if v is None else f"{v:.4f}"


def _fmt_acc(avg: float | None, se: float | None) -> str:
    if avg is None:
        return "–"
    return f"{100 * avg:.2f} ± {100 * se:.2f}" if se is not None else f"{100 * avg:.2f}"


def _table_rows(res: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    vl_keys = sorted({k for r in res["rows"] for k in r["val_loss"]}, key=_val_key)
    header = ["method", "seed", "rounds", "tokens", *[f"val loss ({k})" for k in vl_keys], "9-task avg ± se (%)",
              "selection time", "config hash"]
    out = []
    for method, agg in res["methods"].items():
        mrows = [r for r in res["rows"] if r["method"] == method]
        for r in mrows:
            out.append([
                method, str(r["seed"]), f"{r['rounds_done']}/{r['rounds_expected']}", fmt_tokens(r["tokens"]),
                *[_fmt_loss(r["val_loss"].get(k)) for k in vl_keys],
                _fmt_acc(r["downstream_average"], r["downstream_stderr"]), fmt_seconds(r["selection_seconds"]),
                r["config_hash"] or "–",
            ])
        if len(mrows) > 1:
            out.append([
                method, f"mean of {len(mrows)}", "", fmt_tokens(agg["tokens"]),
                *[_fmt_loss(agg["val_loss"].get(k)) for k in vl_keys],
                _fmt_acc(agg["downstream_average"], agg["downstream_stderr"]), fmt_seconds(agg["selection_seconds"]),
                "",
            ])
    return header, out


def _task_table(res: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    methods = list(res["tasks"])
    names = sorted({t for m in methods for t in res["tasks"][m]})
    header = ["task", "metric", *methods]
    rows = []
    for t in names:
        metrics = sorted({res["tasks"][m][t]["metric"] for m in methods if t in res["tasks"][m]})
        row = [t, "/".join(metrics)]
        for m in methods:
            v = res["tasks"][m].get(t)
            row.append(_fmt_acc(v["score"], v["stderr"]) if v else "–")
        rows.append(row)
    return header, rows


def _rate_table(res: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    srcs = sorted({s for m in res["methods"].values() for s in m.get("rate_per_source", {})})
    if not srcs:
        return None
    rows = [[m, *[("–" if agg["rate_per_source"].get(s) is None else f"{agg['rate_per_source'][s]:.2f}") for s in srcs]]
            for m, agg in res["methods"].items()]
    return ["method", *srcs], rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in r] for r in [header, *rows]]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines)


def results_markdown(res: dict[str, Any]) -> str:
    """``results.md``: the headline table (per method and seed, plus a mean row per method) and per-task table."""
    out = [f"# Results: {res['run']}", ""]
    if res.get("config_hash"):
        out += [f"Run config hash: `{res['config_hash']}`", ""]
    header, rows = _table_rows(res)
    out += [_md_table(header, rows) if rows else "_no method rounds found_", ""]
    out += ["Final = last round with a complete evaluation. 9-task average: acc_norm where a task reports it, else "
            "acc; ± standard error (mean rows: standard error of the mean over seeds). Selection time: wall time "
            "of the selection stages (reference, bilevel, influence, scores, selection) summed over rounds.", ""]
    rate_table = _rate_table(res)
    if rate_table:
        out += ["## Selection rate per source (fraction of each source's candidates kept, mean over rounds and seeds)",
                "", _md_table(*rate_table), ""]
    if res["tasks"]:
        th, tr = _task_table(res)
        out += ["## Per-task accuracy (final round, %, mean over seeds)", "", _md_table(th, tr), ""]
    curves = res.get("curves") or []
    if curves:
        vl = sorted({k for c in curves for k in c["val_loss"]}, key=_val_key)
        header = ["method", "seed", "round", "tokens", *[f"val loss ({k})" for k in vl], "9-task avg ± se (%)"]
        rows = [[c["method"], str(c["seed"]), str(c["round"]), fmt_tokens(c["tokens"]),
                 *[_fmt_loss(c["val_loss"].get(k)) for k in vl], _fmt_acc(c["downstream_average"], c["downstream_stderr"])]
                for c in curves]
        out += ["## Evaluation vs tokens (each round's decay branch)", "", _md_table(header, rows), ""]
    return "\n".join(out)


def write_results(run_dir: str | Path, data: RunData | None = None) -> tuple[Path, Path]:
    """Write ``RUN/results.json`` and ``RUN/results.md``; returns their paths."""
    run_dir = Path(run_dir)
    data = data or collect(run_dir)
    res = results(data)
    atomic_write_json(run_dir / "results.json", res)
    atomic_write_text(run_dir / "results.md", results_markdown(res))
    return run_dir / "results.json", run_dir / "results.md"


# ----------------------------------------------------------------------------------------------------------------
# figures


@dataclass
class FigureEntry:
    name: str
    title: str
    caption: str
    path: Path


#: x-axis keys of a train log, in order of preference (the documented ``tokens``, the loop's ``tokens_seen``)
TOKEN_KEYS: tuple[str, ...] = ("tokens", "tokens_seen")
#: keys of the kept-token fraction in a target train log (``sel_`` = the loop's prefix for selector stats)
KEPT_KEYS: tuple[str, ...] = ("kept_fraction", "sel_kept_fraction")


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _metric_key(records: Sequence[dict[str, Any]], keys: Sequence[str]) -> str | None:
    """The first of ``keys`` that some record has as a number."""
    return next((k for k in keys if any(_num(r.get(k)) for r in records)), None)


def concat_logs(logs: Sequence[Sequence[dict[str, Any]]], key: str | Sequence[str], use_tokens: bool | None = None,
                ) -> tuple[list[tuple[list[float], list[float]]], list[float], str]:
    """Concatenate consecutive logs (warm-up, round 1, round 2, ...) on one x axis.

    Only records with a numeric ``key`` (or the first present of several keys) count; event records (``"event":
    "start"``) are ignored. x = tokens (``tokens`` or ``tokens_seen``) when every such record has it
    (``use_tokens=None``), else ``step``; a log whose x restarts below the previous log's end is shifted to
    continue from there. Returns one (xs, ys) segment per log (aligned with ``logs``), the x where each non-empty
    log starts, and the x label.
    """
    keys = [key] if isinstance(key, str) else list(key)
    recs_per_log = []
    for lg in logs:
        k = _metric_key(lg, keys)
        recs_per_log.append([(r, float(r[k])) for r in lg if k is not None and _num(r.get(k))])
    nonempty = [rs for rs in recs_per_log if rs]
    def tokens_of(r: dict[str, Any]) -> float | None:
        return next((float(r[tk]) for tk in TOKEN_KEYS if _num(r.get(tk))), None)

    by_tokens = bool(use_tokens is not False and nonempty
                     and all(tokens_of(r) is not None for rs in nonempty for r, _ in rs))
    segs: list[tuple[list[float], list[float]]] = []
    starts: list[float] = []
    offset, end = 0.0, None
    for rs in recs_per_log:
        xs: list[float] = []
        ys: list[float] = []
        if rs:
            raw = [tokens_of(r) if by_tokens else float(r.get("step") or 0) for r, _ in rs]
            if end is not None and raw[0] + offset < end:
                offset = end
            starts.append(raw[0] + offset)
            xs = [x + offset for x in raw]
            ys = [y for _, y in rs]
            end = xs[-1]
        segs.append((xs, ys))
    return segs, starts, "tokens" if by_tokens else "steps"


def _first(d: Any, keys: Sequence[str]) -> list[Any] | None:
    """The first of ``keys`` in dict ``d`` whose value is a non-empty list (summary histograms come as
    ``{edges, counts, selected_counts}`` or ``{edges, all, selected}``)."""
    if not isinstance(d, dict):
        return None
    return next((d[k] for k in keys if isinstance(d.get(k), list) and d[k]), None)


def make_figures(data: RunData, fig_dir: Path, notes: list[str]) -> list[FigureEntry]:
    """Draw every figure the run's artifacts allow; append a note for each one skipped."""
    from lmselect import figures as F

    out: list[FigureEntry] = []

    def attempt(what: str, fn: Any) -> None:
        try:
            fn()
        except (LmselectError, KeyError, ValueError, TypeError, OSError, IndexError) as e:
            notes.append(f"{what}: skipped ({type(e).__name__}: {' '.join(str(e).split())[:200]})")

    # 1. score histograms with threshold, per method, one panel per round
    for method in data.methods():
        def hist(method: str = method) -> None:
            panels: dict[int, list[dict[str, Any]]] = {}
            for rd in data.iter_rounds(method):
                h = (rd.summary or {}).get("histogram")
                entry = None
                counts = _first(h, ("counts", "all"))
                if counts is not None and isinstance(h.get("edges"), list) and len(h["edges"]) == len(counts) + 1:
                    entry = {"seed": rd.seed, "edges": h["edges"], "counts": counts,
                             "selected_counts": _first(h, ("selected_counts", "selected")),
                             "threshold": (rd.summary or {}).get("threshold")}
                elif rd.scores_dir is not None:
                    ids, sc = read_scores_dir(rd.scores_dir)
                    counts, edges = np.histogram(sc, bins=30)
                    selc = None
                    if rd.selected_path is not None:
                        selc, _ = np.histogram(sc[np.isin(ids, np.load(rd.selected_path))], bins=edges)
                    entry = {"seed": rd.seed, "edges": edges, "counts": counts, "selected_counts": selc,
                             "threshold": (rd.summary or {}).get("threshold")}
                if entry is not None:
                    panels.setdefault(rd.round, []).append(entry)
            if not panels:
                has_sel = any("selection" in rd.stage_manifests for rd in data.iter_rounds(method))
                why = "selection without scores" if has_sel else "no sequence scores (token-level or not scored yet)"
                notes.append(f"score histogram skipped for {method}: {why}")
                return
            p = F.score_histograms(method, [{"round": r, "seeds": panels[r]} for r in sorted(panels)],
                                   fig_dir / f"score_hist_{method}.png")
            out.append(FigureEntry(p.stem, f"Score histogram: {method}",
                                   "Scores of the round's candidates per round (one line per seed); filled: selected "
                                   "sequences of the first seed; dashed: selection threshold.", p))
        attempt(f"score histogram ({method})", hist)

    # 2. selection rate per source per round
    for method in data.methods():
        def rates(method: str = method) -> None:
            per: dict[int, dict[str, list[float]]] = {}
            fraction = None
            for rd in data.iter_rounds(method):
                ps = (rd.summary or {}).get("per_source")
                if not isinstance(ps, dict) or not ps:
                    continue
                fraction = (rd.summary or {}).get("fraction", fraction)
                for src, v in ps.items():
                    if isinstance(v, dict) and isinstance(v.get("rate"), (int, float)):
                        per.setdefault(rd.round, {}).setdefault(str(src), []).append(float(v["rate"]))
            if not per:
                notes.append(f"selection rate per source skipped for {method}: no selection summary")
                return
            p = F.source_rates(method, per, fraction, fig_dir / f"source_rates_{method}.png")
            out.append(FigureEntry(p.stem, f"Selection rate per source: {method}",
                                   "Fraction of each source's candidates that were selected, per round (mean over "
                                   "seeds, bar = std over seeds); dashed: overall fraction.", p))
        attempt(f"selection rates ({method})", rates)

    # 3. target training loss per method
    def train_loss() -> None:
        series = []
        bounds: list[float] = []
        wl = data.warmup_logs.get("target") or []
        xlabel = "tokens"
        n_methods = 0
        for method, seeds in data.rounds.items():
            for i, (seed, rounds) in enumerate(sorted(seeds.items())):
                logs = [rd.train_log for _, rd in sorted(rounds.items())]
                if not any(logs):
                    continue
                segs, starts, xlabel = concat_logs([wl, *logs], "loss")
                if not series and wl:
                    series.append({"label": "warm-up", "method": "warmup", "x": segs[0][0], "y": segs[0][1]})
                x = [v for sx, _ in segs[1:] for v in sx]
                y = [v for _, sy in segs[1:] for v in sy]
                series.append({"label": method, "method": method, "x": x, "y": y, "alpha": 1.0 if i == 0 else 0.5})
                n_methods += 1
                if not bounds:
                    bounds = starts[1:] if wl else starts
        if not n_methods:
            notes.append("training loss figure skipped: no target train_log.jsonl in any round")
            return
        n = max(len(s["y"]) for s in series)
        p = F.curves(series, fig_dir / "train_loss.png", title="Target training loss", xlabel=xlabel,
                     ylabel="loss (moving average)" if n >= 100 else "loss", vlines=bounds,
                     smooth_window=max(1, n // 50) if n >= 100 else 0)
        out.append(FigureEntry(p.stem, "Target training loss",
                               "Training loss of the target per method (one line per seed, later seeds lighter), rounds "
                               "concatenated after the warm-up; dotted: round starts.", p))
    attempt("training loss", train_loss)

    # 4. validation loss and 9-task average vs tokens
    def evals() -> None:
        points: dict[str, list[dict[str, Any]]] = {}
        vl_keys: set[str] = set()
        any_ds = False
        for method, seeds in data.rounds.items():
            by_round: dict[int, list[dict[str, Any]]] = {}
            for rd in data.iter_rounds(method):
                if rd.eval is not None:
                    by_round.setdefault(rd.round, []).append(rd.eval)
            pts = []
            for r, evs in sorted(by_round.items()):
                pt: dict[str, Any] = {"round": r, "tokens": _mean([e.get("tokens") for e in evs])}
                keys = {k for e in evs for k in (e.get("val_loss") or {})}
                for k in keys:
                    vals = [(e.get("val_loss") or {}).get(k) for e in evs]
                    vals = [float(v) for v in vals if isinstance(v, (int, float))]
                    pt[f"val_{k}"] = _mean(vals)
                    pt[f"val_{k}_se"] = float(np.std(vals, ddof=1) / math.sqrt(len(vals))) if len(vals) > 1 else None
                    vl_keys.add(k)
                ds = [e.get("downstream") for e in evs if isinstance(e.get("downstream"), dict)]
                avgs = [d.get("average") for d in ds if isinstance(d.get("average"), (int, float))]
                if avgs:
                    any_ds = True
                    pt["downstream"] = _mean(avgs)
                    pt["downstream_se"] = _se_of_mean([d.get("average_stderr") for d in ds])
                if pt["tokens"] is not None:
                    pts.append(pt)
            if pts:
                points[method] = pts
        if not points:
            notes.append("validation loss / downstream figure skipped: no complete eval results yet")
            return
        metrics = [(f"val_{k}", f"validation loss ({k})") for k in sorted(vl_keys, key=_val_key)]
        if any_ds:
            metrics.append(("downstream", "9-task average accuracy"))
        else:
            notes.append("downstream accuracy not plotted: no round has downstream results (downstream: null)")
        p = F.eval_vs_tokens(points, metrics, fig_dir / "eval_vs_tokens.png")
        out.append(FigureEntry(p.stem, "Validation loss and downstream accuracy vs tokens",
                               "Per method, mean over seeds at the end of each round; bars: standard error (validation "
                               "loss: over seeds; accuracy: harness stderr of the 9-task mean).", p))
    attempt("validation loss / downstream", evals)

    # 5. bilevel diagnostics
    bilevel_methods = [m for m in data.methods() if any(rd.bilevel_log for rd in data.iter_rounds(m))]
    for method in bilevel_methods:
        def bil(method: str = method) -> None:
            series = []
            bounds: list[float] = []
            present = set()
            for i, (seed, rounds) in enumerate(sorted(data.rounds[method].items())):
                s: dict[str, Any] = {"seed": seed, "x": [], **{k: [] for k, _ in BILEVEL_KEYS}}
                offset = 0.0
                for _, rd in sorted(rounds.items()):
                    if not rd.bilevel_log:
                        continue
                    if i == 0:
                        bounds.append(offset)
                    last = offset
                    for j, rec in enumerate(rd.bilevel_log):
                        x = offset + float(rec.get("step", j))
                        s["x"].append(x)
                        last = x
                        for k, _ in BILEVEL_KEYS:
                            v = rec.get(k)
                            s[k].append(float(v) if isinstance(v, (int, float)) else None)
                            if isinstance(v, (int, float)):
                                present.add(k)
                    offset = last
                if s["x"]:
                    series.append(s)
            keys = [kt for kt in BILEVEL_KEYS if kt[0] in present]
            if not keys:
                notes.append(f"bilevel diagnostics skipped for {method}: logs have none of "
                             + ", ".join(k for k, _ in BILEVEL_KEYS))
                return
            p = F.bilevel(method, series, keys, bounds[1:], fig_dir / f"bilevel_{method}.png")
            out.append(FigureEntry(p.stem, f"Bilevel diagnostics: {method}",
                                   "Upper (validation) loss, lower (proxy training) loss, KL to the target and "
                                   "hypergradient norm per outer step; rounds concatenated (dotted: round starts).", p))
        attempt(f"bilevel diagnostics ({method})", bil)
    if not bilevel_methods:
        notes.append("bilevel diagnostics skipped: no bilevel/bilevel_log.jsonl in the run")

    # 6. fraction of tokens kept (token-level methods)
    def kept() -> None:
        series = []
        for method, seeds in data.rounds.items():
            for i, (seed, rounds) in enumerate(sorted(seeds.items())):
                logs = [rd.train_log for _, rd in sorted(rounds.items())]
                if not any(_metric_key(lg, KEPT_KEYS) for lg in logs):
                    continue
                segs, _, _ = concat_logs(logs, KEPT_KEYS, use_tokens=False)
                x = [v for sx, _ in segs for v in sx]
                y = [v for _, sy in segs for v in sy]
                series.append({"label": method, "method": method, "x": x, "y": y, "alpha": 1.0 if i == 0 else 0.5})
        if not series:
            notes.append("kept-token fraction skipped: no token-level method logged kept_fraction")
            return
        p = F.curves(series, fig_dir / "kept_fraction.png", title="Fraction of tokens kept (token-level methods)",
                     xlabel="target step (rounds concatenated)", ylabel="kept fraction")
        out.append(FigureEntry(p.stem, "Fraction of tokens kept",
                               "Share of next-token predictions that contribute to the loss per training step.", p))
    attempt("kept-token fraction", kept)
    return out


# ----------------------------------------------------------------------------------------------------------------
# examples


@dataclass
class Example:
    seq_id: int
    score: float
    selected: bool | None
    text: str


def examples(data: RunData, n: int = 3, max_chars: int = 400, notes: list[str] | None = None,
             ) -> list[dict[str, Any]]:
    """Highest- and lowest-scored sequences of each (method, round) (first seed with scores), decoded with the
    pool's tokenizer. Returns ``[{"method", "seed", "round", "keeps": "highest"/"lowest"/None, "top": [Example],
    "bottom": [Example]}]``."""
    notes = notes if notes is not None else []
    if n <= 0:
        return []
    want = []
    for method in data.methods():
        by_round: dict[int, RoundData] = {}
        for rd in data.iter_rounds(method):
            if rd.scores_dir is not None and rd.round not in by_round:
                by_round[rd.round] = rd
        want += [by_round[r] for r in sorted(by_round)]
    if not want:
        notes.append("examples skipped: no complete scores in the run")
        return []
    if data.pool is None:
        notes.append("examples skipped: the run has no pool (RUN/pool or config.yaml pool.path)")
        return []
    from lmselect.data.pool import TokenPool

    try:
        pool = TokenPool(data.pool)
    except LmselectError as e:
        notes.append(f"examples skipped: pool not readable ({' '.join(str(e).split())})")
        return []
    try:  # TokenPool.decode loads the tokenizer on every call: load it once for this pool object
        tok = pool.load_tokenizer()
        pool.load_tokenizer = lambda: tok  # type: ignore[method-assign]
    except LmselectError as e:
        notes.append(f"examples skipped: the pool's tokenizer does not load ({' '.join(str(e).split())})")
        return []
    out = []
    for rd in want:
        assert rd.scores_dir is not None
        try:
            ids, sc = read_scores_dir(rd.scores_dir)
        except (LmselectError, ValueError, OSError) as e:
            notes.append(f"examples skipped for {rd.method}/seed{rd.seed}/round{rd.round}: scores not readable "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:200]})")
            continue
        sel = set(np.load(rd.selected_path).tolist()) if rd.selected_path is not None else None
        order = np.lexsort((ids, -sc))  # highest first, ties by seq_id
        top = order[:n]
        bottom = order[::-1][: min(n, max(0, len(order) - len(top)))]

        def ex(i: int) -> Example:
            sid = int(ids[i])
            try:
                text = pool.decode(sid)
            except (LmselectError, IndexError) as e:
                text = f"<could not decode: {e}>"
            if len(text) > max_chars:
                text = text[:max_chars] + " …"
            return Example(sid, float(sc[i]), (sid in sel) if sel is not None else None, text)

        keeps = None  # which end the selection keeps: summary.largest, else where the selected scores lie
        largest = (rd.summary or {}).get("largest")
        if isinstance(largest, bool):
            keeps = "highest" if largest else "lowest"
        elif sel:
            in_sel = np.isin(ids, np.fromiter(sel, dtype=np.int64))
            if 0 < in_sel.sum() < len(ids):
                keeps = "highest" if sc[in_sel].mean() >= sc[~in_sel].mean() else "lowest"
        out.append({"method": rd.method, "seed": rd.seed, "round": rd.round, "keeps": keeps,
                    "top": [ex(i) for i in top], "bottom": [ex(i) for i in bottom]})
    return out


# ----------------------------------------------------------------------------------------------------------------
# html

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;color:#222;
padding:0 1em;line-height:1.4}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;
text-align:left}th{background:#f3f3f3}tr.mean td{font-weight:bold;background:#fafafa}
.meta{color:#555;font-size:.9em}.s-done{color:#1a7f37}.s-partial{color:#b35900}.s-missing{color:#c62828}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:.9em}
.ex{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.85em;white-space:pre-wrap;background:#f7f7f7;
padding:.4em;margin:.2em 0;border-left:3px solid #bbb}.ex.sel{border-left-color:#1a7f37}
.notes li{color:#7a5200}.stale{color:#c62828}pre.md{background:#f7f7f7;padding:.6em;overflow-x:auto}
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _html_table(header: list[str], rows: list[list[str]], mean_rows: bool = False) -> str:
    h = "".join(f"<th>{_e(c)}</th>" for c in header)
    body = []
    for r in rows:
        cls = ' class="mean"' if mean_rows and r[1].startswith("mean of") else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>")
    return f"<table><thead><tr>{h}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _status_html(status: dict[str, Any]) -> str:
    def s(v: str) -> str:
        return f'<span class="s-{_e(v)}">{_e(v)}</span>'

    parts = [f"<p>run: {s(status['run'])} &middot; pool: {s(status['pool'])} &middot; warm-up target: "
             f"{s(status['warmup']['target'])} &middot; warm-up proxy: {s(status['warmup']['proxy'])}</p>"]
    rows = []
    for method, seeds in status["rounds"].items():
        for seed, rounds in seeds.items():
            for r, info in rounds.items():
                stages = " ".join(f"{_e(k)}={s(v)}" for k, v in info["stages"].items())
                rows.append(f"<tr><td>{_e(method)}</td><td>{_e(seed)}</td><td>{_e(r)}</td><td>{s(info['status'])}</td>"
                            f"<td>{stages}</td></tr>")
    if rows:
        parts.append("<table><thead><tr><th>method</th><th>seed</th><th>round</th><th>status</th><th>stages</th>"
                     f"</tr></thead><tbody>{''.join(rows)}</tbody></table>")
    c = status["counts"]
    parts.append(f"<p>rounds: {c['done']} done, {c['partial']} partial, {c['missing']} missing</p>")
    return "\n".join(parts)


def _data_uri(p: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode("ascii")


def render_html(data: RunData, res: dict[str, Any], figs: list[FigureEntry], exs: list[dict[str, Any]],
                stale: list[str], notes: list[str]) -> str:
    """The self-contained report page."""
    m = data.manifest or {}
    name = data.run_dir.resolve().name
    meta = [f"directory: {_e(data.run_dir.resolve())}"]
    for label, key in (("run uuid", "uuid"), ("config hash", "config_hash"), ("git commit", "git_commit"),
                       ("created", "created")):
        if m.get(key):
            meta.append(f"{label}: <code>{_e(m[key])}</code>")
    if data.manifest is None:
        meta.append('<span class="s-partial">run manifest absent: run in progress or interrupted</span>')
    meta.append(f"report generated: {_e(_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds'))}")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>lmselect report: {_e(name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>lmselect report: {_e(name)}</h1>",
        f'<p class="meta">{" &middot; ".join(meta)}</p>',
        "<h2>Results</h2>",
    ]
    header, rows = _table_rows(res)
    if rows:
        parts.append(_html_table(header, rows, mean_rows=True))
    else:
        parts.append("<p>No method rounds found.</p>")
    parts.append("<p class=\"meta\">Final = last round with a complete evaluation; 9-task average uses acc_norm where "
                 "a task reports it, else acc; selection time sums the selection stages over rounds.</p>")
    rate_table = _rate_table(res)
    if rate_table:
        parts += ["<h3>Selection rate per source (fraction of each source's candidates kept, mean over rounds and "
                  "seeds)</h3>", _html_table(*rate_table)]
    if res["tasks"]:
        th, tr = _task_table(res)
        parts += ["<h3>Per-task accuracy (final round, %, mean over seeds)</h3>", _html_table(th, tr)]
    parts.append(f'<details><summary>results.md</summary><pre class="md">{_e(results_markdown(res))}</pre></details>')

    parts += ["<h2>Stage status</h2>", _status_html(data.status)]
    parts.append("<h2>Provenance</h2>")
    if stale:
        parts.append('<p class="stale">Artifacts whose parents changed since they were made (rerun them):</p><ul>')
        parts += [f'<li class="stale">{_e(s)}</li>' for s in stale]
        parts.append("</ul>")
    else:
        parts.append("<p>All recorded parents match their current manifests.</p>")

    parts.append("<h2>Figures</h2>")
    if not figs:
        parts.append("<p>No figures could be drawn from this run directory yet.</p>")
    for f in figs:
        parts.append(f'<figure id="fig-{_e(f.name)}"><img alt="{_e(f.title)}" src="{_data_uri(f.path)}">'
                     f"<figcaption><b>{_e(f.title)}.</b> {_e(f.caption)} <code>figures/{_e(f.path.name)}</code>"
                     "</figcaption></figure>")

    parts.append("<h2>Examples: what the score model prefers</h2>")
    if not exs:
        parts.append("<p>No examples (no scored rounds, or the pool is not available).</p>")
    for ex in exs:
        keeps = f" · selection keeps the {ex['keeps']} scores" if ex.get("keeps") else ""
        parts.append(f"<h3>{_e(ex['method'])}, round {_e(ex['round'])} (seed {_e(ex['seed'])}){_e(keeps)}</h3>")
        for label, key in (("Highest scores", "top"), ("Lowest scores", "bottom")):
            parts.append(f"<h4>{label}</h4>")
            for e in ex[key]:
                sel = "" if e.selected is None else (" · selected" if e.selected else " · not selected")
                cls = "ex sel" if e.selected else "ex"
                parts.append(f'<div class="{cls}"><b>seq {e.seq_id} · score {e.score:.4g}{_e(sel)}</b>\n'
                             f"{_e(e.text)}</div>")
    parts.append("<h2>Notes</h2>")
    if notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    else:
        parts.append("<p>Nothing was skipped.</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(run_dir: str | Path, *, n_examples: int = 3, max_chars: int = 400) -> Path:
    """Write ``report.html``, ``figures/*.png``, ``results.json`` and ``results.md`` for a run directory.

    Reads only the run directory. Returns the path of ``report.html``.
    """
    run_dir = Path(run_dir)
    data = collect(run_dir)
    notes: list[str] = list(data.notes)
    for method, seeds in data.status["rounds"].items():
        for seed, rounds in seeds.items():
            for r, info in rounds.items():
                if info["status"] != DONE:
                    notes.append(f"{method}/seed{seed}/round{r} is {info['status']}: its numbers are left out or partial")
    fig_dir = run_dir / "figures"
    figs = make_figures(data, fig_dir, notes)
    keep = {f.path.name for f in figs}
    for old in fig_dir.glob("*.png"):  # figures of pieces that no longer exist
        if old.name not in keep:
            old.unlink()
    exs = examples(data, n_examples, max_chars, notes)
    stale = [f"{n.rel}: {p.describe()}" for n, p in stale_artifacts(run_dir)]
    res = results(data)
    atomic_write_json(run_dir / "results.json", res)
    atomic_write_text(run_dir / "results.md", results_markdown(res))
    out = run_dir / "report.html"
    atomic_write_text(out, render_html(data, res, figs, exs, stale, notes))
    return out


# ----------------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory written by `lmselect run`")
    parser.add_argument("--examples", type=int, default=3,
                        help="highest- and lowest-scored sequences shown per method and round (0: none)")
    parser.add_argument("--max-chars", type=int, default=400, help="truncate decoded examples to this many characters")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "overrides", None):
        raise LmselectError(f"lmselect report takes no config overrides (got {' '.join(args.overrides)})")
    path = write_report(args.run_dir, n_examples=args.examples, max_chars=args.max_chars)
    print(f"wrote {path}")
    print(f"wrote {path.parent / 'results.md'}, {path.parent / 'results.json'} and {path.parent / 'figures'}/")
    return 0


__all__ = [
    "collect",
    "results",
    "results_markdown",
    "write_results",
    "make_figures",
    "examples",
    "render_html",
    "write_report",
    "add_arguments",
    "run",
    "RunData",
    "RoundData",
    "METHODS",
]
