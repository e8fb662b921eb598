"""The statistics every room uses, written once: summaries over seeds, the paired 95 % t interval, Spearman's ρ.

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
    if df < 1:
        raise LmselectError(f"t975: degrees of freedom must be >= 1, got {df}")
    return T975[df - 1] if df <= len(T975) else 1.96


def paired_interval(diffs: Sequence[float | None]) -> dict[str, Any]:
    """Mean of paired differences with a 95 % t interval; ``within_noise`` when the interval contains 0 (or n < 2)."""
    d = np.asarray([x for x in diffs if x is not None], dtype=np.float64)
    n = len(d)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "ci95": None, "within_noise": True}
    mean = float(d.mean())
    if n < 2:
        return {"n": 1, "mean": mean, "sd": None, "ci95": None, "within_noise": True}
    sd = float(d.std(ddof=1))
    half = t975(n - 1) * sd / math.sqrt(n)
    lo, hi = mean - half, mean + half
    return {"n": n, "mean": mean, "sd": sd, "ci95": [lo, hi], "within_noise": bool(lo <= 0.0 <= hi)}


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
