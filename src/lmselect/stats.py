"""The statistics every room uses, written once: summaries over seeds, the paired 95 % t interval, Spearman's ρ, the
noise floor and minimum detectable effect of a paired comparison, the interval of a ratio of paired means (headroom)
and the agreement of two rankings (decision accuracy).

Pure functions of numbers (numpy only; scipy is not a dependency). Callers: the report's headline numbers and
figures (``report.results``, ``report.figures``), ``compare``, the selection diagnostics (``select.diagnostics``),
methods (MATES's influence-model hold-out, BLISS's rank stability) and the benches.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from lmselect.errors import LmselectError

# ------------------------------------------------------------------------------------------------------------------
# summaries over seeds (None and NaN entries are skipped: a seed without the figure)


def _finite(vals: Sequence[float | None]) -> list[float]:
    return [x for x in vals if x is not None and not (isinstance(x, float) and math.isnan(x))]


def finite_mean(vals: Sequence[float | None]) -> float | None:
    """Mean of the values that are present and not NaN; None when there are none."""
    v = _finite(vals)
    return float(np.mean(v)) if v else None


def sample_sd(vals: Sequence[float | None]) -> float | None:
    """Sample standard deviation (n − 1) of the present values; None with fewer than two."""
    v = _finite(vals)
    return float(np.std(v, ddof=1)) if len(v) > 1 else None


def standard_error(vals: Sequence[float | None]) -> float | None:
    """Standard error of the mean, sd (n − 1) / √n; None with fewer than two values."""
    v = _finite(vals)
    return float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None


def se_of_mean(ses: Sequence[float | None]) -> float | None:
    """Standard error of the mean of independent estimates with standard errors ``ses``: √(Σ se²) / n."""
    v = [x for x in ses if x is not None]
    return float(math.sqrt(sum(x * x for x in v)) / len(v)) if v else None


# ------------------------------------------------------------------------------------------------------------------
# the paired 95 % t interval

# two-sided 95 % Student-t quantiles t_{0.975, df} for df = 1..30; beyond, the normal 1.96 (3.9 % narrower than t at
# df 31, 2 % at df 60: only runs of more than 31 seeds get there)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` >= 1 degrees of freedom (3 decimals; 1.96 beyond df 30)."""
    return _t_quantile(T975, 1.96, df, "t975")


def _t_quantile(table: Sequence[float], normal: float, df: int, name: str) -> float:
    """A quantile from a table for df = 1..len(table), the normal's value beyond."""
    if df < 1:
        raise LmselectError(f"{name}: degrees of freedom must be >= 1, got {df}")
    return table[df - 1] if df <= len(table) else normal


def paired_interval(diffs: Sequence[float | None]) -> dict[str, Any]:
    """Mean of paired differences with a 95 % t interval; ``within_noise`` when the interval contains 0 (or n < 2, or
    every difference is the same non-zero value: ``degenerate``, no interval)."""
    d = np.asarray([x for x in diffs if x is not None], dtype=np.float64)
    n = len(d)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "ci95": None, "within_noise": True}
    mean = float(d.mean())
    if n < 2:
        return {"n": 1, "mean": mean, "sd": None, "ci95": None, "within_noise": True}
    sd = float(d.std(ddof=1))
    if mean != 0.0 and sd <= 1e-9 * abs(mean):  # (up to float rounding of the per-seed means)
        # every seed gave the same Δ: a discrete metric on few items (accuracy on 45 questions moves in steps of one
        # answer). The t interval then has zero width and would call a one-answer difference certain; it is not
        # evidence of anything, so no interval and no verdict
        return {"n": n, "mean": mean, "sd": sd, "ci95": None, "within_noise": True, "degenerate": True}
    half = t975(n - 1) * sd / math.sqrt(n)
    lo, hi = mean - half, mean + half
    return {"n": n, "mean": mean, "sd": sd, "ci95": [lo, hi], "within_noise": bool(lo <= 0.0 <= hi)}


# ------------------------------------------------------------------------------------------------------------------
# what a paired comparison can detect

# one-sided 0.80 quantiles t_{0.80, df} for df = 1..30 (the power term of the detectable effect); beyond, the normal
# 0.8416 rounded to 0.842
T80 = (1.376, 1.061, 0.978, 0.941, 0.920, 0.906, 0.896, 0.889, 0.883, 0.879, 0.876, 0.873, 0.870, 0.868, 0.866,
       0.865, 0.863, 0.862, 0.861, 0.860, 0.859, 0.858, 0.858, 0.857, 0.856, 0.856, 0.855, 0.855, 0.854, 0.854)


def t80(df: int) -> float:
    """The 0.80 quantile of Student's t with ``df`` >= 1 degrees of freedom (3 decimals; 0.842 beyond df 30)."""
    return _t_quantile(T80, 0.842, df, "t80")


def noise_floor(control_values: Sequence[float | None]) -> float | None:
    """Seed-to-seed noise of a paired difference, from the seeds of the control (random selection).

    Two arms that both select at random but with different seeds (different selections and data orders) differ by
    noise alone (an A/A pair). With per-seed sd σ of the control, their difference has sd σ·√2: the yardstick every
    paired Δ of the metric is divided by. None with fewer than two control seeds."""
    sd = sample_sd(control_values)
    return None if sd is None else float(sd * math.sqrt(2.0))


def min_detectable_effect(sd_diff: float | None, n: int) -> float | None:
    """Smallest true mean paired difference a two-sided 5 % paired t test over ``n`` pairs detects with 80 % power.

    MDE = (t_{0.975, n−1} + t_{0.80, n−1}) · sd_d / √n, the usual normal-theory formula with t quantiles (it
    approximates the noncentral-t power calculation, slightly conservatively at tiny n). ``sd_diff`` is the sd of
    one paired difference (:func:`noise_floor`). None when n < 2 or ``sd_diff`` is unknown."""
    if sd_diff is None or n < 2:
        return None
    return float((t975(n - 1) + t80(n - 1)) * sd_diff / math.sqrt(n))


def ratio_interval(num: Sequence[float], den: Sequence[float]) -> dict[str, Any]:
    """Ratio of two paired means, mean(num) / mean(den), with Fieller's 95 % interval (the seeds are the pairs).

    With a = mean(num), b = mean(den), their variances and covariance over n seeds divided by n, and t =
    t_{0.975, n−1}, the interval is the set of ρ with (a − ρb)² <= t² (V_aa − 2ρV_ab + ρ²V_bb). It is bounded only
    when the denominator is itself distinguishable from 0 (b² > t²V_bb); otherwise ``ci95`` is None and
    ``bounded`` False (the ratio can be anything). Used for headroom: a method's Δ to random as a share of the
    positive control's Δ."""
    pairs = [(float(x), float(y)) for x, y in zip(num, den)
             if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
    n = len(pairs)
    if n == 0:
        return {"n": 0, "ratio": None, "ci95": None, "bounded": False}
    a = float(np.mean([p[0] for p in pairs]))
    b = float(np.mean([p[1] for p in pairs]))
    ratio = a / b if b != 0 else None
    if n < 2:
        return {"n": n, "ratio": ratio, "ci95": None, "bounded": False}
    cov = np.cov(np.array(pairs).T, ddof=1) / n
    vaa, vbb, vab = float(cov[0, 0]), float(cov[1, 1]), float(cov[0, 1])
    t2 = t975(n - 1) ** 2
    qa = b * b - t2 * vbb
    qb = -2.0 * (a * b - t2 * vab)
    qc = a * a - t2 * vaa
    disc = qb * qb - 4.0 * qa * qc
    if qa <= 0 or disc < 0:
        return {"n": n, "ratio": ratio, "ci95": None, "bounded": False}
    r = math.sqrt(disc)
    lo, hi = sorted(((-qb - r) / (2 * qa), (-qb + r) / (2 * qa)))
    return {"n": n, "ratio": ratio, "ci95": [lo, hi], "bounded": True}


def decision_accuracy(a: dict[str, float | None], b: dict[str, float | None]) -> dict[str, Any]:
    """Share of pairs of arms ordered the same way by two sets of scores (DataDecide's decision accuracy).

    Over the arms present (not None) in both, every unordered pair counts once; it agrees when sign(a_i − a_j) ==
    sign(b_i − b_j) (a tie on one side and not the other disagrees). Also Spearman's ρ of the two rankings."""
    arms = sorted(k for k in a if k in b and a[k] is not None and b[k] is not None)
    agree = pairs = 0
    for i, x in enumerate(arms):
        for y in arms[i + 1:]:
            pairs += 1
            agree += int(np.sign(a[x] - a[y]) == np.sign(b[x] - b[y]))  # type: ignore[operator]
    rho = spearman(np.array([a[k] for k in arms]), np.array([b[k] for k in arms])) if len(arms) > 1 else None
    return {"arms": arms, "pairs": pairs, "agree": agree, "accuracy": agree / pairs if pairs else None,
            "spearman": rho}


# ------------------------------------------------------------------------------------------------------------------
# rank correlation


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x`` with ties given their average rank (scipy's ``rankdata(method="average")``)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    # boundaries of runs of equal values in sorted order
    new = np.concatenate([[True], xs[1:] != xs[:-1]])
    run_id = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    ends = np.concatenate([starts[1:], [len(xs)]])
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = avg[run_id]
    return ranks


def spearman(a: np.ndarray, b: np.ndarray, undefined: float | None = None) -> float | None:
    """Spearman's ρ: the Pearson correlation of average ranks (:func:`rankdata`).

    Pairs with a non-finite value are dropped. ``undefined`` (default None) is returned when fewer than two pairs
    remain or either side is constant; a caller that keeps running maxima passes ``float("nan")``."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise LmselectError(f"spearman: arrays must be 1-D of one length (got {a.shape} and {b.shape})")
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if len(a) < 2:
        return undefined
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    if den == 0:
        return undefined
    return float((ra * rb).sum() / den)
