"""The report's figures: :func:`make_figures` reads the run's numbers and draws each one with ``lmselect.report.plots``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lmselect.artifacts import LmselectError
from lmselect.report import plots as F
from lmselect.report.model import RunData
from lmselect.report.results import val_key
from lmselect.score.sidecar import read_scores
from lmselect.stats import finite_mean, se_of_mean, standard_error

BILEVEL_KEYS: tuple[tuple[str, str], ...] = (
    ("upper_loss", "upper loss"),
    ("lower_loss", "lower loss"),
    ("kl", "KL(target || proxy)"),
    ("hypergrad_norm", "hypergradient norm"),
)



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
                    ids, sc = read_scores(rd.scores_dir)
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
                if (rd.summary or {}).get("fraction") == 1.0:  # a token-level method keeps the whole shard
                    continue
                fraction = (rd.summary or {}).get("fraction", fraction)
                for src, v in ps.items():
                    if isinstance(v, dict) and isinstance(v.get("rate"), (int, float)):
                        per.setdefault(rd.round, {}).setdefault(str(src), []).append(float(v["rate"]))
            if not per:
                notes.append(f"selection rate per source skipped for {method}: no sequence selection (token-level "
                             "methods train on the whole shard)")
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
            for i, (_seed, rounds) in enumerate(sorted(seeds.items())):
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
        cont: set[str] = set()
        any_ds = False
        for method, _seeds in data.rounds.items():
            by_round: dict[int, list[dict[str, Any]]] = {}
            for rd in data.iter_rounds(method):
                if rd.eval is not None:
                    by_round.setdefault(rd.round, []).append(rd.eval)
            pts = []
            for r, evs in sorted(by_round.items()):
                pt: dict[str, Any] = {"round": r, "tokens": finite_mean([e.get("tokens") for e in evs])}
                keys = {k for e in evs for k in (e.get("val_loss") or {})}
                for k in keys:
                    vals = [(e.get("val_loss") or {}).get(k) for e in evs]
                    vals = [float(v) for v in vals if isinstance(v, (int, float))]
                    pt[f"val_{k}"] = finite_mean(vals)
                    pt[f"val_{k}_se"] = standard_error(vals)
                    vl_keys.add(k)
                ds = [e.get("downstream") for e in evs if isinstance(e.get("downstream"), dict)]
                avgs = [d.get("average") for d in ds if isinstance(d.get("average"), (int, float))]
                if avgs:
                    any_ds = True
                    pt["downstream"] = finite_mean(avgs)
                    pt["downstream_se"] = se_of_mean([d.get("average_stderr") for d in ds])
                for key, src in (("downstream_prob", "average_prob_correct"), ("downstream_bpb", "average_bpb")):
                    got = [d for d in ds if isinstance(d.get(src), (int, float))]
                    if got:  # the continuous metrics (eval/harness.py); absent in results written before them
                        cont.add(key)
                        pt[key] = finite_mean([d[src] for d in got])
                        pt[key + "_se"] = se_of_mean([d.get(src + "_stderr") for d in got])
                if pt["tokens"] is not None:
                    pts.append(pt)
            if pts:
                points[method] = pts
        if not points:
            notes.append("validation loss / downstream figure skipped: no complete eval results yet")
            return
        metrics = [(k, t) for k, t in (("downstream_prob", "9-task P(correct choice)"),
                                        ("downstream_bpb", "9-task bits/byte of the correct answer")) if k in cont]
        metrics += [(f"val_{k}", f"validation loss ({k})") for k in sorted(vl_keys, key=val_key)]
        if any_ds:
            metrics.append(("downstream", "9-task average accuracy"))
        else:
            notes.append("downstream accuracy not plotted: no round has downstream results (downstream: null)")
        p = F.eval_vs_tokens(points, metrics, fig_dir / "eval_vs_tokens.png")
        out.append(FigureEntry(p.stem, "Downstream P(correct), bits per byte, validation loss and accuracy vs tokens",
                               "Per method, mean over seeds at the end of each round; bars: standard error (validation "
                               "loss: over seeds; downstream: the item standard error of the 9-task mean). P(correct) = "
                               "probability of the correct choice normalised over the choices; bits/byte of the "
                               "correct answer: lower is better.", p))
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
            for i, (_seed, rounds) in enumerate(sorted(seeds.items())):
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


