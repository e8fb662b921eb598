"""Headline results of a run: the one place its numbers are computed (results.md / results.json, the demo's table,
``compare`` and the report all use :func:`results`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lmselect.artifacts import atomic_write_json, atomic_write_text
from lmselect.data.decontam import overlap_report
from lmselect.data.prefilter import prefilter_report, source_rows
from lmselect.provenance import DONE, pool_dir
from lmselect.report.model import RunData, collect
from lmselect.score.sidecar import read_scores
from lmselect.select.base import (
    baseline_names,
    control_name,
    known_answer_controls,
    level_control_name,
    method_class,
    method_names,
)
from lmselect.select.diagnostics import topk_overlap
from lmselect.stats import (
    finite_mean,
    min_detectable_effect,
    noise_floor,
    paired_interval,
    ratio_interval,
    sample_sd,
    se_of_mean,
    spearman,
)

VAL_LOSS_ORDER: tuple[str, ...] = ("lambada", "clean")



def _downstream_score(task: dict[str, Any]) -> tuple[float | None, float | None, str]:
    """acc_norm where the task reports it, else acc (METHODS §6)."""
    for key in ("acc_norm", "acc"):
        if isinstance(task.get(key), (int, float)):
            se = task.get(key + "_stderr")
            return float(task[key]), (float(se) if isinstance(se, (int, float)) else None), key
    return None, None, ""


def _sum_or_none(vals: Sequence[Any]) -> float | None:
    v = [float(x) for x in vals if isinstance(x, (int, float))]
    return round(sum(v), 3) if v else None


def _control() -> str:
    return control_name()


#: the downstream figures of a row beside the report-set losses: (key, which direction is better). The continuous
#: ones (9-task P(correct), bits per byte of the correct answer) come first: they carry signal where accuracy is at
#: chance (DataDecide; eval/harness.py); accuracy stays beside them
DOWNSTREAM_METRICS: tuple[tuple[str, str], ...] = (
    ("downstream_prob", "higher"),
    ("downstream_bpb", "lower"),
    ("downstream_average", "higher"),
)
_DOWNSTREAM_BETTER = dict(DOWNSTREAM_METRICS)


def metric_value(row: dict[str, Any], key: str) -> float | None:
    """A row's final-round figure by metric key: ``val_loss.<set>``, ``val_bpb.<set>`` or a DOWNSTREAM_METRICS key."""
    if key.startswith("val_loss.") or key.startswith("val_bpb."):
        group, name = key.split(".", 1)
        v = (row.get(group) or {}).get(name)
    else:
        v = row.get(key)
    return float(v) if isinstance(v, (int, float)) else None


def metric_better(key: str) -> str:
    """"lower" or "higher": which direction of a metric is better."""
    return _DOWNSTREAM_BETTER.get(key, "lower")


def metric_order(key: str) -> tuple[int, tuple[int, str], int]:
    """Sort key of metric keys in reading order (see :func:`metric_keys`)."""
    if key in ("downstream_prob", "downstream_bpb"):
        return (0, (int(key == "downstream_bpb"), ""), 0)
    if key.startswith("val_"):
        return (1, val_key(key.split(".", 1)[1]), int(key.startswith("val_bpb.")))
    return (2, (0, key), 0)


def metric_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Every metric some row has, in reading order: the continuous downstream metrics, the report-set losses and
    bits per byte (set by set), then downstream accuracy."""
    sets = sorted({k for r in rows for k in (r.get("val_loss") or {})}, key=val_key)
    keys = [k for k, _ in DOWNSTREAM_METRICS[:2]]
    for k in sets:
        keys += [f"val_loss.{k}", f"val_bpb.{k}"]
    keys.append("downstream_average")
    return [k for k in keys if any(metric_value(r, k) is not None for r in rows)]


def paired_diffs(rows: Sequence[dict[str, Any]], method: str, base: str, key: str) -> dict[int, float]:
    """seed -> method − base of metric ``key`` on that seed (seeds where both have it)."""
    by = {(r["method"], r["seed"]): r for r in rows}
    out = {}
    for (m, s), r in sorted(by.items()):
        if m == method and (base, s) in by:
            a, b = metric_value(r, key), metric_value(by[(base, s)], key)
            if a is not None and b is not None:
                out[s] = a - b
    return out


def paired_differences(rows: Sequence[dict[str, Any]], base: str | None = None) -> dict[str, dict[str, Any]]:
    """Per method != base: metric -> paired (by seed) difference method − base of the final-round figures.

    Metrics (:func:`metric_keys`): the continuous downstream metrics (9-task probability of the correct choice,
    higher is better; bits per byte of the correct answer, lower is better), every report-set loss and bits per byte
    (lower is better, so a negative difference favours the method) and the 9-task accuracy (higher is better)."""
    base = base or _control()
    methods = sorted({r["method"] for r in rows if r["method"] != base})
    keys = metric_keys(rows)
    out: dict[str, dict[str, Any]] = {}
    for m in methods:
        seeds = sorted({r["seed"] for r in rows if r["method"] == m} & {r["seed"] for r in rows if r["method"] == base})
        if not seeds:
            continue
        res: dict[str, Any] = {}
        for k in keys:
            d = paired_diffs(rows, m, base, k)
            if d:
                res[k] = {**paired_interval(list(d.values())), "seeds": seeds, "better": metric_better(k)}
        out[m] = res
    return out


def noise_floors(rows: Sequence[dict[str, Any]], control: str | None = None) -> dict[str, dict[str, Any]]:
    """Per metric: what this comparison can detect, from the seeds of the control (random selection).

    ``sd_control`` = sd over random's seeds; ``noise`` = sd of an A/A difference (two random arms with different
    selections and data orders) = sd·√2 (:func:`lmselect.stats.noise_floor`); ``mde`` = the smallest true paired
    Δ a two-sided 5 % paired t test over the run's ``n_seeds`` detects with 80 % power
    (:func:`lmselect.stats.min_detectable_effect`)."""
    control = control or _control()
    ctrl = [r for r in rows if r["method"] == control]
    n = max((len({r["seed"] for r in rows if r["method"] == m}) for m in {r["method"] for r in rows}), default=0)
    out: dict[str, dict[str, Any]] = {}
    for k in metric_keys(rows):
        vals = [metric_value(r, k) for r in ctrl]
        vals = [v for v in vals if v is not None]
        nf = noise_floor(vals)
        out[k] = {"sd_control": sample_sd(vals), "noise": nf, "control_seeds": len(vals), "n_seeds": n,
                  "mde": min_detectable_effect(nf, n), "better": metric_better(k)}
    return out


def _with_power(paired: dict[str, dict[str, Any]], noise: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every paired Δ with its ratio to the metric's noise floor and the detectable effect at its number of seeds."""
    for per in paired.values():
        for k, v in per.items():
            nf = (noise.get(k) or {}).get("noise")
            v["noise"] = nf
            v["ratio_to_noise"] = (v["mean"] / nf) if (nf and v.get("mean") is not None) else None
            v["mde"] = min_detectable_effect(nf, int(v.get("n") or 0))
    return paired


EXPOSURE_SUMS = ("tokens_fed", "tokens_backprop", "distinct_sequences", "selection_flops", "selection_seconds",
                 "target_flops", "scoring_flops")


def flops_multiple(e: dict[str, Any]) -> float | None:
    """Total FLOPs as a multiple of plain training: (target training + the loop's scoring passes + selection) /
    target training (6·N per token fed). 1.0 = no selection cost; None without a target estimate."""
    t = e.get("target_flops")
    if not t:
        return None
    return float((t + (e.get("scoring_flops") or 0.0) + (e.get("selection_flops") or 0.0)) / t)


def _paired_vs_level_controls(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """control -> its level's methods -> metric -> paired difference, for every registered level control in the
    run (random_tokens: RHO-1 and BLADE against a random mask of the same kept fraction)."""
    known = set(method_names())
    out: dict[str, dict[str, Any]] = {}
    for level in ("sequence", "token"):
        ctrl = level_control_name(level)
        if ctrl is None or not any(r["method"] == ctrl for r in rows):
            continue
        mine = [r for r in rows if r["method"] in known and method_class(r["method"]).level == level]
        if any(r["method"] != ctrl for r in mine):
            out[ctrl] = paired_differences(mine, ctrl)
    return out


def _paired_vs_best_baseline(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Every other method paired with the best cheap baseline of the run (``baseline = True``: fastText, DSIR):
    ``{"baseline", "metric", "means", "paired"}``, or {} when none ran. Best = the lowest mean final loss on the
    first report set (LAMBADA in the demo), over the seeds it has; which baseline that is and every baseline's mean
    are recorded, so the choice is visible rather than silent."""
    present = [b for b in baseline_names() if any(r["method"] == b for r in rows)]
    keys = sorted({k for r in rows if r["method"] in present for k in r["val_loss"]}, key=val_key)
    if not present or not keys:
        return {}
    metric = keys[0]
    means = {b: finite_mean([r["val_loss"].get(metric) for r in rows if r["method"] == b]) for b in present}
    ranked = sorted((m, b) for b, m in means.items() if m is not None)
    if not ranked:
        return {}
    best = ranked[0][1]
    paired = paired_differences(rows, best)
    return {"baseline": best, "metric": f"val_loss.{metric}", "means": means, "paired": paired} if paired else {}


def _best_with_power(best: dict[str, Any], noise: dict[str, dict[str, Any]]) -> dict[str, Any]:
    if best.get("paired"):
        _with_power(best["paired"], noise)
    return best


def _known_answer() -> dict[str, str]:
    return known_answer_controls()


def _planted_shares(data: RunData) -> dict[str, float | None]:
    """Per known-answer arm: the mean share of its selection budget that was planted documents (the summary's
    ``planted_selected`` / ``k`` over rounds and seeds): the dose of target-like text (or junk) the arm adds to
    random's selection."""
    out = {}
    for m in _known_answer():
        vals = [rd.summary["planted_selected"] / rd.summary["k"] for seeds in [data.rounds.get(m) or {}]
                for rounds in seeds.values() for rd in rounds.values()
                if isinstance(rd.summary, dict) and rd.summary.get("k") and "planted_selected" in rd.summary]
        if vals:
            out[m] = finite_mean(vals)
    return out


def known_answer_verdicts(paired: dict[str, dict[str, Any]],
                          planted_share: dict[str, float | None] | None = None) -> dict[str, Any]:
    """Whether the comparison detects each known-answer control arm beyond its noise, per metric.

    A control is *detected* on a metric when its paired 95 % interval against random excludes 0 on the side its
    answer is known to lie (positive control: better; negative control: worse). ``can_rank`` is False when neither
    control is detected on any metric: then nothing at this scale can be ranked."""
    ctrls = {m: kind for m, kind in _known_answer().items() if m in paired}
    if not ctrls:
        return {}
    out: dict[str, Any] = {"arms": {}}
    for m, kind in ctrls.items():
        per = {}
        for k, v in paired[m].items():
            if v.get("mean") is None:
                continue
            better = (v["mean"] < 0) == (v["better"] == "lower")
            per[k] = {"detected": bool(not v["within_noise"] and better == (kind == "positive")),
                      "wrong_side": bool(not v["within_noise"] and better != (kind == "positive"))}
        out["arms"][m] = {"kind": kind, "metrics": per, "detected_on": [k for k, d in per.items() if d["detected"]],
                          "planted_share": (planted_share or {}).get(m)}
    out["can_rank"] = any(a["detected_on"] for a in out["arms"].values())
    return out


def headroom(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Every other method's paired Δ to random as a share of the positive control's Δ, per metric, with Fieller's
    95 % interval over the shared seeds (:func:`lmselect.stats.ratio_interval`): 1 = all the gain the planted
    target-like documents give, 0 = none, < 0 = the other way. {} without a positive control arm."""
    pos = [m for m, kind in _known_answer().items() if kind == "positive" and any(r["method"] == m for r in rows)]
    if not pos or not any(r["method"] == _control() for r in rows):
        return {}
    p = pos[0]
    ctrl = set(_known_answer()) | {_control()}
    out: dict[str, Any] = {"positive_control": p, "shares": {}}
    for m in sorted({r["method"] for r in rows} - ctrl):
        per = {}
        for k in metric_keys(rows):
            dm, dp = paired_diffs(rows, m, _control(), k), paired_diffs(rows, p, _control(), k)
            seeds = sorted(set(dm) & set(dp))
            if seeds:
                per[k] = {**ratio_interval([dm[s] for s in seeds], [dp[s] for s in seeds]), "seeds": seeds}
        out["shares"][m] = per
    return out


def _exposure(rounds: dict[int, Any]) -> dict[str, Any] | None:
    """A seed's exposure over its rounds: sums of the EXPOSURE_SUMS fields, mean epochs and kept-token fraction."""
    ex = [((rd.eval or {}).get("exposure")) for _, rd in sorted(rounds.items())]
    ex = [e for e in ex if isinstance(e, dict)]
    if not ex:
        return None
    out: dict[str, Any] = {k: _sum_or_none([e.get(k) for e in ex]) for k in EXPOSURE_SUMS}
    out["epochs"] = finite_mean([e.get("epochs") for e in ex])
    out["kept_token_fraction"] = finite_mean([e.get("kept_token_fraction") for e in ex])
    out["rounds"] = len(ex)
    out["flops_multiple"] = flops_multiple(out)
    return out


def results(data: RunData) -> dict[str, Any]:
    """Headline numbers per method and seed (final = last round with a complete eval). Deterministic."""
    rows: list[dict[str, Any]] = []
    tasks: dict[str, dict[str, dict[str, Any]]] = {}
    methods: dict[str, dict[str, Any]] = {}
    for method, seeds in data.rounds.items():
        mrows = []
        task_vals: dict[str, list[tuple[float, float | None, str]]] = {}
        task_cont: dict[str, dict[str, list[tuple[float, float | None]]]] = {}
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
                "val_bpb": {},
                "downstream_average": None,
                "downstream_stderr": None,
                "downstream_prob": None,
                "downstream_prob_stderr": None,
                "downstream_bpb": None,
                "downstream_bpb_stderr": None,
                "selection_seconds": round(sum(sel_v), 3) if sel_v else None,
                # target training wall time; for token-level methods it includes their online selection overhead
                "train_seconds": _sum_or_none([(rd.stage_manifests.get("target") or {}).get("extra", {}).get("train_seconds")
                                               for _, rd in sorted(rounds.items())]),
                "config_hash": (final or last).config_hash() if (final or last) else None,
                "exposure": _exposure(rounds),
                "val_split": None,
            }
            if final is not None:
                ev = final.eval or {}
                tok = ev.get("tokens")
                if tok is None and "target" in final.stage_manifests:
                    tok = final.stage_manifests["target"].get("extra", {}).get("tokens_seen")
                row["tokens"] = int(tok) if isinstance(tok, (int, float)) else None
                row["val_split"] = ev.get("val_split")  # "report" (held out from every method) since lmselect 0.2
                vl = ev.get("val_loss") or {}
                row["val_loss"] = {k: float(v) for k, v in vl.items() if isinstance(v, (int, float))}
                row["val_bpb"] = {k: float(v) for k, v in (ev.get("val_bpb") or {}).items() if isinstance(v, (int, float))}
                ds = ev.get("downstream")
                if isinstance(ds, dict):
                    if isinstance(ds.get("average"), (int, float)):
                        row["downstream_average"] = float(ds["average"])
                    if isinstance(ds.get("average_stderr"), (int, float)):
                        row["downstream_stderr"] = float(ds["average_stderr"])
                    for key, src in (("downstream_prob", "average_prob_correct"), ("downstream_bpb", "average_bpb")):
                        if isinstance(ds.get(src), (int, float)):
                            row[key] = float(ds[src])
                        if isinstance(ds.get(src + "_stderr"), (int, float)):
                            row[key + "_stderr"] = float(ds[src + "_stderr"])
                    for t, tv in (ds.get("tasks") or {}).items():
                        if isinstance(tv, dict):
                            sc, se, metric = _downstream_score(tv)
                            if sc is not None:
                                task_vals.setdefault(t, []).append((sc, se, metric))
                            for ck in ("prob_correct", "bpb"):
                                if isinstance(tv.get(ck), (int, float)):
                                    task_cont.setdefault(t, {}).setdefault(ck, []).append(
                                        (float(tv[ck]), tv.get(ck + "_stderr")))
            rows.append(row)
            mrows.append(row)
        vl_keys = sorted({k for r in mrows for k in r["val_loss"]}, key=val_key)
        rates: dict[str, list[float]] = {}
        for _seed, rounds in sorted(seeds.items()):
            for _, rd in sorted(rounds.items()):
                for src, d in ((rd.summary or {}).get("per_source") or {}).items():
                    if isinstance(d, dict) and isinstance(d.get("rate"), (int, float)):
                        rates.setdefault(src, []).append(float(d["rate"]))
        methods[method] = {
            "rate_per_source": {k: finite_mean(v) for k, v in sorted(rates.items())},
            "n_seeds": len(mrows),
            "tokens": finite_mean([r["tokens"] for r in mrows]),
            "val_loss": {k: finite_mean([r["val_loss"].get(k) for r in mrows]) for k in vl_keys},
            "val_loss_sd": {k: sample_sd([r["val_loss"].get(k) for r in mrows]) for k in vl_keys},
            "val_bpb": {k: finite_mean([r["val_bpb"].get(k) for r in mrows]) for k in vl_keys},
            "val_bpb_sd": {k: sample_sd([r["val_bpb"].get(k) for r in mrows]) for k in vl_keys},
            "downstream_average_sd": sample_sd([r["downstream_average"] for r in mrows]),
            "exposure": {k: finite_mean([(r["exposure"] or {}).get(k) for r in mrows])
                         for k in (*EXPOSURE_SUMS, "epochs", "kept_token_fraction", "flops_multiple")}
            if any(r["exposure"] for r in mrows) else None,
            "downstream_average": finite_mean([r["downstream_average"] for r in mrows]),
            "downstream_stderr": se_of_mean([r["downstream_stderr"] for r in mrows if r["downstream_average"] is not None]),
            **{k: finite_mean([r[k] for r in mrows]) for k in ("downstream_prob", "downstream_bpb")},
            **{f"{k}_sd": sample_sd([r[k] for r in mrows]) for k in ("downstream_prob", "downstream_bpb")},
            "selection_seconds": finite_mean([r["selection_seconds"] for r in mrows]),
            "train_seconds": finite_mean([r["train_seconds"] for r in mrows]),
        }
        if task_vals:
            tasks[method] = {
                t: {"score": finite_mean([v[0] for v in vals]), "stderr": se_of_mean([v[1] for v in vals]),
                    "metric": vals[0][2], "n_seeds": len(vals),
                    **{ck: {"mean": finite_mean([v[0] for v in cv]), "stderr": se_of_mean([v[1] for v in cv])}
                       for ck, cv in (task_cont.get(t) or {}).items()}}
                for t, vals in sorted(task_vals.items())
            }
    run_m = data.manifest or {}
    has_control = any(r["method"] == _control() for r in rows)
    noise = noise_floors(rows) if has_control else {}
    paired = paired_differences(rows, _control()) if has_control else {}
    return {
        "diagnostics": _diagnostics(data),
        "decontamination": _decontamination(data),
        "prefilter": _prefilter(data),
        "run": data.run_dir.resolve().name,
        "run_uuid": run_m.get("uuid"),
        "config_hash": run_m.get("config_hash"),
        "rows": rows,
        "curves": _eval_curves(data),
        "methods": methods,
        "noise_floor": noise,
        "paired_vs_random": _with_power(paired, noise),
        "paired_vs_level_control": {c: _with_power(p, noise) for c, p in _paired_vs_level_controls(rows).items()},
        "paired_vs_best_baseline": _best_with_power(_paired_vs_best_baseline(rows), noise),
        "known_answer_controls": known_answer_verdicts(paired, _planted_shares(data)),
        "headroom": headroom(rows),
        "tasks": tasks,
    }


def _read_diag(path: Path) -> dict[str, Any] | None:
    import json

    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _diagnostics(data: RunData) -> dict[str, Any]:
    """Per method and round: what the scorer sorts by (selection/diagnostics.json, first seed; plus top-k overlap and
    score rank correlation across seeds) and the solver's own diagnostics (any other stage's diagnostics.json, e.g.
    BLISS's bilevel/, averaged over seeds), with their warnings."""
    out: dict[str, Any] = {}
    for method, seeds in data.rounds.items():
        per_round: dict[str, Any] = {}
        rounds = sorted({r for rs in seeds.values() for r in rs})
        for rnd in rounds:
            rds = [seeds[s][rnd] for s in sorted(seeds) if rnd in seeds[s]]
            entry: dict[str, Any] = {}
            sel = [_read_diag(rd.dir / "selection" / "diagnostics.json") for rd in rds]
            first = next((d for d in sel if d), None)
            if first:
                entry["selection"] = {k: first.get(k) for k in ("verdict", "source_variance_share", "spearman",
                                                                "tie_fraction", "proxy_loss_model", "rank_stability")}
                entry["selection"]["per_source_mean"] = {k: v.get("mean") for k, v in (first.get("per_source") or {}).items()}
            if len(rds) > 1:
                sels = [np.load(rd.selected_path) for rd in rds if rd.selected_path is not None]
                jac = [topk_overlap(a, b)["jaccard"] for i, a in enumerate(sels) for b in sels[i + 1:]]
                rho = []
                scored = [rd for rd in rds if rd.scores_dir is not None]
                for i, a in enumerate(scored):
                    for b in scored[i + 1:]:
                        try:
                            (ia, sa), (ib, sb) = read_scores(a.scores_dir), read_scores(b.scores_dir)
                        except Exception:  # noqa: BLE001 - a damaged sidecar is reported elsewhere
                            continue
                        if np.array_equal(ia, ib):
                            rho.append(spearman(sa, sb))
                if jac and first:
                    entry["across_seeds"] = {"topk_jaccard": finite_mean(jac),
                                             "score_spearman": finite_mean([r for r in rho if r is not None])}
            solver: dict[str, list[float]] = {}
            warnings: list[str] = []
            for rd in rds:
                for st in rd.stages:
                    d = _read_diag(rd.dir / st / "diagnostics.json") if st != "selection" else None
                    if not d:
                        continue
                    for k, v in (d.get("summary") or {}).items():
                        if isinstance(v, dict) and isinstance(v.get("mean"), (int, float)):
                            solver.setdefault(k, []).append(float(v["mean"]))
                    warnings += [w for w in d.get("warnings") or [] if w not in warnings]
            if solver:
                entry["solver"] = {k: finite_mean(v) for k, v in sorted(solver.items())}
                entry["solver_warnings"] = warnings
            if entry:
                per_round[str(rnd)] = entry
        if per_round:
            out[method] = per_round
    return out


def _decontamination(data: RunData) -> dict[str, Any] | None:
    """The pool's n-gram overlap with the protected sets (selection, report, eval tasks), without the per-doc list."""
    p = pool_dir(data.run_dir)
    if p is None or not (p / "manifest.json").is_file():
        return None
    try:
        info = overlap_report(p, top=5)
    except Exception:  # noqa: BLE001 - the report never fails on a pool it cannot read
        return None
    if not info.get("enabled"):
        return {"enabled": False}
    keep = ("enabled", "n", "mode", "documents", "contaminated", "dropped", "per_source", "per_set", "summary")
    out = {k: info.get(k) for k in keep}
    out["top"] = [{k: r.get(k) for k in ("doc_id", "source", "matched", "fraction")} for r in info.get("top", [])]
    return out


def _prefilter(data: RunData) -> dict[str, Any] | None:
    """What the pool's heuristic prefilter removed (manifest ``extra.prefilter``), or None without one."""
    p = pool_dir(data.run_dir)
    if p is None or not (p / "manifest.json").is_file():
        return None
    try:
        info = prefilter_report(p)
    except Exception:  # noqa: BLE001 - the report never fails on a pool it cannot read
        return None
    return info if info.get("enabled") else None


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


def val_key(k: str) -> tuple[int, str]:
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


def per_seed_table(res: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    vl_keys = sorted({k for r in res["rows"] for k in r["val_loss"]}, key=val_key)
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


def _pm(mean: float | None, sd: float | None, fmt: str = "{:.4f}") -> str:
    if mean is None:
        return "–"
    return fmt.format(mean) + (f" ± {fmt.format(sd)}" if sd is not None else "")


def _summary_table(res: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Mean ± sd over seeds of the final-round figures, one row per method: the continuous downstream metrics first
    (where evaluated), then the report-set losses and bits per byte, then 9-task accuracy."""
    vl_keys = sorted({k for m in res["methods"].values() for k in m["val_loss"]}, key=val_key)
    bpb = any(v is not None for m in res["methods"].values() for v in (m.get("val_bpb") or {}).values())
    cont = [k for k in ("downstream_prob", "downstream_bpb")
            if any(m.get(k) is not None for m in res["methods"].values())]
    labels = {"downstream_prob": "9-task P(correct)", "downstream_bpb": "9-task bits/byte (correct answer)"}
    header = ["method", "seeds", *[labels[k] for k in cont],
              *[h for k in vl_keys for h in ([f"{k} loss (report set)"] + ([f"{k} bits/byte"] if bpb else []))],
              "9-task avg (%)"]
    rows = []
    for m, agg in res["methods"].items():
        avg, sd = agg.get("downstream_average"), agg.get("downstream_average_sd")
        cells = [_pm(agg.get(k), agg.get(f"{k}_sd")) for k in cont]
        for k in vl_keys:
            cells.append(_pm(agg["val_loss"].get(k), agg.get("val_loss_sd", {}).get(k)))
            if bpb:
                cells.append(_pm((agg.get("val_bpb") or {}).get(k), (agg.get("val_bpb_sd") or {}).get(k)))
        rows.append([m, str(agg["n_seeds"]), *cells,
                     _pm(None if avg is None else 100 * avg, None if sd is None else 100 * sd, "{:.2f}")])
    return header, rows


def paired_label(k: str) -> str:
    if k.startswith("val_loss."):
        return f"Δ {k[len('val_loss.'):]} loss"
    if k.startswith("val_bpb."):
        return f"Δ {k[len('val_bpb.'):]} bits/byte"
    return {"downstream_prob": "Δ 9-task P(correct)", "downstream_bpb": "Δ 9-task bits/byte (correct answer)"}.get(
        k, "Δ 9-task avg (pp)")


def _scale(k: str) -> tuple[float, str]:
    return (100.0, "{:+.2f}") if k == "downstream_average" else (1.0, "{:+.4f}")


def _unsigned(x: float | None, k: str) -> str:
    scale, fmt = _scale(k)
    return "–" if x is None else fmt.format(scale * x).lstrip("+")


def _detectable(v: dict[str, Any], k: str) -> str:
    """"(could detect ≥ X)": the detectable effect at this Δ's number of seeds, in the metric's unit."""
    scale, fmt = _scale(k)
    mde = v.get("mde")
    if mde is None:
        return "(detectable effect unknown: fewer than 2 seeds of random)"
    return f"(could detect ≥ {fmt.format(scale * mde).lstrip('+')})"


def paired_cell(v: dict[str, Any] | None, k: str) -> str:
    """One paired Δ as a table cell: mean [95 % interval], its ratio to the noise floor, and the verdict; "within
    noise" always says what the comparison could have detected."""
    if not v or v.get("mean") is None:
        return "–"
    scale, fmt = _scale(k)
    cell = fmt.format(scale * v["mean"])
    if v.get("ci95") is not None:
        lo, hi = (scale * x for x in v["ci95"])
        cell += f" [{fmt.format(lo)}, {fmt.format(hi)}]"
    if v.get("degenerate"):
        cell += " (every seed the same Δ: no interval)"
    if v.get("ratio_to_noise") is not None:
        cell += f" {v['ratio_to_noise']:+.1f}σ"
    better = (v["mean"] < 0) == (v["better"] == "lower")
    if v["within_noise"]:
        cell += " within noise"
        if "mde" in v:
            cell += " " + _detectable(v, k)
    else:
        cell += " better" if better else " worse"
    return cell


def _paired_table(res: dict[str, Any], paired: dict[str, Any] | None = None) -> tuple[list[str], list[list[str]]] | None:
    paired = (res.get("paired_vs_random") or {}) if paired is None else paired
    if not paired:
        return None
    keys = sorted({k for v in paired.values() for k in v}, key=metric_order)
    header = ["method", *[paired_label(k) for k in keys]]
    rows = [[m, *[paired_cell(d.get(k), k) for k in keys]] for m, d in paired.items()]
    return header, rows


def _noise_table(res: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    noise = res.get("noise_floor") or {}
    rows = []
    for k, v in noise.items():
        rows.append([paired_label(k)[2:], str(v["control_seeds"]), _unsigned(v["sd_control"], k),
                     _unsigned(v["noise"], k), str(v["n_seeds"]), _unsigned(v["mde"], k)])
    if not rows:
        return None
    return ["metric", "seeds of random", "sd over random's seeds", "noise floor σ (A/A Δ sd = sd·√2)",
            "seeds per arm", "detectable effect (80 % power, 5 % two-sided)"], rows


def _controls_table(res: dict[str, Any]) -> tuple[tuple[list[str], list[list[str]]] | None, list[str]]:
    ka = res.get("known_answer_controls") or {}
    if not ka.get("arms"):
        return None, []
    paired = res.get("paired_vs_random") or {}
    keys = [k for k in metric_keys(res.get("rows") or []) if any(k in (paired.get(m) or {}) for m in ka["arms"])]
    rows, bullets = [], []
    for m, a in ka["arms"].items():
        share = a.get("planted_share")
        dose = "" if share is None else f"; {100 * share:.1f} % of its selection planted"
        row = [m, ("positive (planted target-like documents: must help" if a["kind"] == "positive"
                   else "negative (planted junk, then the most repetitive: must hurt") + dose + ")"]
        for k in keys:
            v = (paired.get(m) or {}).get(k)
            d = a["metrics"].get(k)
            if not v or d is None:
                row.append("–")
                continue
            verdict = "**detected**" if d["detected"] else ("wrong side" if d["wrong_side"] else "not detected")
            row.append(f"{verdict}: {paired_cell(v, k)}")
        rows.append(row)
        bullets.append(f"{m}: " + (f"detected beyond noise on {', '.join(paired_label(k)[2:] for k in a['detected_on'])}"
                                   if a["detected_on"] else "not detected on any metric"))
    pos = [a for a in ka["arms"].values() if a["kind"] == "positive" and a.get("planted_share") is not None]
    if pos and pos[0]["planted_share"] < 0.1:
        bullets.append(f"The positive control differs from random in only {100 * pos[0]['planted_share']:.1f} % of its "
                       "selection (the planted target-like sequences that reach the candidates): a weak control; "
                       "not detecting it bounds only effects of that size.")
    if not ka["can_rank"]:
        bullets.append("Neither control is detected beyond noise: nothing at this scale can be ranked (a method's "
                       "\"within noise\" says nothing about whether it helps).")
    return (["control", "known answer", *[paired_label(k) for k in keys]], rows), bullets


def _headroom_table(res: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    hr = res.get("headroom") or {}
    if not hr.get("shares"):
        return None
    keys = [k for k in metric_keys(res.get("rows") or []) if any(k in v for v in hr["shares"].values())]
    rows = []
    for m, per in hr["shares"].items():
        row = [m]
        for k in keys:
            v = per.get(k)
            if not v or v.get("ratio") is None:
                row.append("–")
            elif v.get("ci95"):
                row.append(f"{v['ratio']:+.2f} [{v['ci95'][0]:+.2f}, {v['ci95'][1]:+.2f}]")
            else:
                row.append(f"{v['ratio']:+.2f} [unbounded]")
        rows.append(row)
    return ["method", *[f"share of {hr['positive_control']}'s {paired_label(k)}" for k in keys]], rows


def fmt_flops(x: float | None) -> str:
    return "–" if x is None else ("0" if x == 0 else f"{x:.2e}")


def _exposure_table(res: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    rows = []
    for m, agg in res["methods"].items():
        e = agg.get("exposure")
        if not e:
            continue
        kept = e.get("kept_token_fraction")
        rows.append([m, fmt_tokens(e.get("tokens_fed")), fmt_tokens(e.get("tokens_backprop")),
                     "–" if kept is None else f"{kept:.2f}", fmt_tokens(e.get("distinct_sequences")),
                     "–" if e.get("epochs") is None else f"{e['epochs']:.2f}", fmt_flops(e.get("selection_flops")),
                     "–" if e.get("flops_multiple") is None else f"{e['flops_multiple']:.2f}×",
                     fmt_seconds(e.get("selection_seconds"))])
    if not rows:
        return None
    return ["method", "tokens fed", "tokens backpropagated", "kept token fraction", "distinct sequences",
            "epochs over selection", "selection FLOPs (est.)", "FLOPs × plain training", "selection time"], rows


def task_table(res: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    methods = list(res["tasks"])
    names = sorted({t for m in methods for t in res["tasks"][m]})
    header = ["task", "metric", *methods]
    rows = []
    for t in names:
        metrics = sorted({res["tasks"][m][t]["metric"] for m in methods if t in res["tasks"][m]})
        row = [t, "/".join(metrics)]
        for m in methods:
            v = res["tasks"][m].get(t)
            cell = _fmt_acc(v["score"], v["stderr"]) if v else "–"
            for ck, label in (("prob_correct", "P(correct)"), ("bpb", "bits/byte")):
                c = (v or {}).get(ck) or {}
                if c.get("mean") is not None:
                    cell += f"; {label} {_pm(c['mean'], c.get('stderr'))}"
            row.append(cell)
        rows.append(row)
    return header, rows


def selection_rate_table(res: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    srcs = sorted({s for m in res["methods"].values() for s in m.get("rate_per_source", {})})
    if not srcs:
        return None
    rows = [[m, *[("–" if agg["rate_per_source"].get(s) is None else f"{agg['rate_per_source'][s]:.2f}") for s in srcs]]
            for m, agg in res["methods"].items()]
    return ["method", *srcs], rows


def md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in r] for r in [header, *rows]]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines)


def headline_sections(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The headline tables of a run, in reading order, each ``{title, note, header, rows, bullets}``: report-set
    figures, paired differences to random, exposure, what each scorer sorts by, solver diagnostics (+ warnings),
    decontamination. results.md and report.html render the same list."""
    out: list[dict[str, Any]] = []

    def add(title: str, note: str, table: tuple[list[str], list[list[str]]] | None, bullets: list[str] | None = None) -> None:
        if table is not None and table[1] or bullets:
            out.append({"title": title, "note": note, "header": table[0] if table else None,
                        "rows": table[1] if table else None, "bullets": bullets or []})

    if res["methods"]:
        add("Final round, report sets (mean ± sd over seeds)",
            "Report sets are held out from every method, reference and probe (checked by item content when the recipe "
            "loads). Lower loss is better.", _summary_table(res))
    add("What this comparison can detect (noise floor from random's seeds)",
        "Seed-to-seed noise of every metric: the sd over random's seeds, and σ = sd·√2, the sd of the difference "
        "between two random arms with different selections and data orders (an A/A pair). Detectable effect: the "
        "smallest true paired Δ a two-sided 5 % paired t test over this many seeds finds with 80 % power, "
        "(t_0.975 + t_0.80) · σ / √n. A Δ smaller than this can be real and still read 'within noise'.",
        _noise_table(res))
    add("Paired difference to random (by seed; mean [95 % t interval], Δ/σ)",
        "Δ = method − random on the same seed (same pool, warm-up, schedule and token budget). P(correct) is the "
        "probability of the correct choice normalised over the choices (higher is better); bits/byte of the correct "
        "answer, losses and bits per byte of the report sets are lower-is-better. Δ/σ: the Δ in units of the noise "
        "floor; 'within noise' = the interval contains 0, with the effect this comparison could have detected.",
        _paired_table(res))
    ctable, cbullets = _controls_table(res)
    add("Known-answer controls (paired with random; detected = interval excludes 0 on the known side)",
        "The positive control selects the held-out target-like documents planted in the pool (then random to "
        "fill); the negative control selects the planted junk, then the most repetitive sequences. A comparison "
        "that detects neither cannot rank methods at this scale.", ctable, cbullets)
    add("Headroom: each method's Δ to random as a share of the positive control's Δ (Fieller 95 % interval)",
        "1 = the whole gain that selecting the planted target-like documents gives; 0 = none; below 0 = the other "
        "way. [unbounded]: the positive control's own Δ is within its noise, so the share can be anything.",
        _headroom_table(res))
    for ctrl, paired in (res.get("paired_vs_level_control") or {}).items():
        add(f"Paired difference to {ctrl} (methods of its level; by seed; mean [95 % t interval])",
            f"Δ = method − {ctrl} on the same seed: the same tokens fed and the same kept fraction, chosen at random. "
            "A method that is not below 0 here selects nothing a random mask of the same size would not give.",
            _paired_table(res, paired))
    best = res.get("paired_vs_best_baseline") or {}
    if best.get("paired"):
        b, metric = best["baseline"], best["metric"].split(".", 1)[1]
        others = ", ".join(f"{m} {v:.4f}" for m, v in sorted(best["means"].items()) if v is not None)
        add(f"Paired difference to the best cheap baseline, {b} (by seed; mean [95 % t interval])",
            f"Δ = method − {b} on the same seed. {b} is the cheap baseline (a method a practitioner would run instead) "
            f"with the lowest mean final {metric} loss in this run ({others}). A method that is not below 0 here is "
            "not worth its cost over that baseline on this evidence.", _paired_table(res, best["paired"]))
    add("Exposure (per seed, summed over rounds; mean over seeds)",
        "What each method was given: tokens fed to the target, next-token predictions backpropagated (token-level "
        "methods mask the rest), distinct sequences trained on, epochs over the selection, the estimated FLOPs "
        "of selection, total FLOPs as a multiple of plain training (target training 6·N per token fed, plus the "
        "scoring forward a token selector costs the loop, plus selection: reference / proxy passes and reference "
        "training) and measured wall time of selection.", _exposure_table(res))
    diag = res.get("diagnostics") or {}
    rows_d = []
    for m, per in diag.items():
        for rnd, e in per.items():
            sd = e.get("selection")
            if not sd:
                continue
            sp = sd.get("spearman") or {}
            share = sd.get("source_variance_share")
            xs = e.get("across_seeds") or {}
            rs = (sd.get("rank_stability") or {}).get("spearman_prev_round")
            rows_d.append([m, rnd, "–" if share is None else f"{share:.2f}",
                           *[("–" if sp.get(k) is None else f"{sp[k]:+.2f}") for k in ("proxy_loss", "eos", "near_dup")],
                           f"{sd.get('tie_fraction', 0):.2f}",
                           "–" if xs.get("topk_jaccard") is None else f"{xs['topk_jaccard']:.2f}",
                           "–" if rs is None else f"{rs:+.2f}", sd.get("verdict", "")])
    add("What each scorer sorts by (selection diagnostics, first seed)",
        "Source share: fraction of score variance between sources. ρ: Spearman of the score with the warm-up model's "
        "loss, documents per sequence and near-duplication (8-gram). Jaccard: top-k overlap across seeds. ρ previous "
        "round: Spearman of the previous round's and this round's scorer on the same candidates (where the method "
        "reports it).",
        (["method", "round", "source share", "ρ proxy loss", "ρ docs/seq", "ρ near-dup", "ties",
          "top-k Jaccard across seeds", "ρ previous round", "verdict"], rows_d))
    rows_s, warns = [], []
    for m, per in diag.items():
        for rnd, e in per.items():
            sv = e.get("solver")
            if not sv:
                continue
            rows_s.append([m, rnd, *[("–" if sv.get(k) is None else f"{sv[k]:.3f}")
                                     for k in ("cos_zv", "hz_ratio", "z_residual", "v_agreement", "c_source_share")]])
            warns += [f"{m} round {rnd}: {w}" for w in e.get("solver_warnings") or []]
    add("Solver diagnostics (mean over outer steps and seeds)",
        "cos(z, v) near 1 with a small ‖Hz‖/‖v‖: the solve is effectively first-order. v agreement: cosine between v "
        "of two independent validation batches (low = noise-dominated). c source share: fraction of var(c) between "
        "sources.", (["method", "round", "cos(z, v)", "‖Hz‖/‖v‖", "residual", "v agreement", "c source share"], rows_s),
        [f"warning: {w}" for w in warns])
    pre = res.get("prefilter")
    if pre:
        add("What the prefilter removed (datatrove heuristic filters, before tokenizing)", pre["summary"] + ".",
            (["source", "documents", "removed", "by filter", "characters kept"], source_rows(pre)),
            [f"{n}: {v['dropped']} removed ({', '.join(f'{k} {c}' for k, c in v['reasons'].items()) or '–'})"
             for n, v in pre.get("by_filter", {}).items()])
    dec = res.get("decontamination")
    if dec:
        rows_ = ([[k, str(v.get("n_texts", "–")), str(v.get("docs_matched", "–"))] for k, v in (dec.get("per_set") or {}).items()]
                 if dec.get("enabled") else [])
        add("Decontamination of the pool", dec["summary"] + "." if dec.get("enabled") else
            "The pool was prepared without decontamination (pool.prepare.decontaminate).",
            (["protected set", "texts", "pool documents overlapping"], rows_), [] if rows_ else ["no protected sets"])
    return out


def results_markdown(res: dict[str, Any]) -> str:
    """``results.md``: the headline sections, then per-seed, per-source, per-task and eval-vs-tokens tables."""
    out = [f"# Results: {res['run']}", ""]
    if res.get("config_hash"):
        out += [f"Run config hash: `{res['config_hash']}`", ""]
    for sec in headline_sections(res):
        out += [f"## {sec['title']}", "", sec["note"], ""]
        if sec["rows"]:
            out += [md_table(sec["header"], sec["rows"]), ""]
        if sec["bullets"]:
            out += [*[f"- {b}" for b in sec["bullets"]], ""]
    header, rows = per_seed_table(res)
    out += ["## Per seed", "", md_table(header, rows) if rows else "_no method rounds found_", ""]
    out += ["Final = last round with a complete evaluation. 9-task average: acc_norm where a task reports it, else "
            "acc; ± standard error (mean rows: standard error of the mean over seeds). Selection time: wall time "
            "of the selection stages (reference, bilevel, influence, scores, selection) summed over rounds.", ""]
    rate_table = selection_rate_table(res)
    if rate_table:
        out += ["## Selection rate per source (fraction of each source's candidates kept, mean over rounds and seeds)",
                "", md_table(*rate_table), ""]
    if res["tasks"]:
        th, tr = task_table(res)
        out += ["## Per task (final round, mean over seeds): accuracy (%) ± se; P(correct); bits/byte of the correct "
                "answer", "", md_table(th, tr), ""]
    curves = res.get("curves") or []
    if curves:
        vl = sorted({k for c in curves for k in c["val_loss"]}, key=val_key)
        header = ["method", "seed", "round", "tokens", *[f"val loss ({k})" for k in vl], "9-task avg ± se (%)"]
        rows = [[c["method"], str(c["seed"]), str(c["round"]), fmt_tokens(c["tokens"]),
                 *[_fmt_loss(c["val_loss"].get(k)) for k in vl], _fmt_acc(c["downstream_average"], c["downstream_stderr"])]
                for c in curves]
        out += ["## Evaluation vs tokens (each round's decay branch)", "", md_table(header, rows), ""]
    return "\n".join(out)


def write_results(run_dir: str | Path, data: RunData | None = None) -> tuple[Path, Path]:
    """Write ``RUN/results.json`` and ``RUN/results.md``; returns their paths."""
    run_dir = Path(run_dir)
    data = data or collect(run_dir)
    res = results(data)
    atomic_write_json(run_dir / "results.json", res)
    atomic_write_text(run_dir / "results.md", results_markdown(res))
    return run_dir / "results.json", run_dir / "results.md"


