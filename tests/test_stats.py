"""lmselect.stats against scipy-free oracles: ranks and Spearman's ρ by hand and by brute force (with ties), the t
quantiles against a numerical integral of Student's t density, the paired interval against its formula."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmselect.errors import LmselectError
from lmselect.stats import (
    T975,
    finite_mean,
    paired_interval,
    rankdata,
    sample_sd,
    se_of_mean,
    spearman,
    standard_error,
    t975,
)


def _brute_ranks(x):
    # rank = 1 + (number smaller) + (number of *other* equal values) / 2  -> the average rank of a tie group
    return [1 + sum(y < v for y in x) + (sum(y == v for y in x) - 1) / 2 for v in x]


def _brute_spearman(a, b):
    ra, rb = _brute_ranks(list(a)), _brute_ranks(list(b))
    n = len(ra)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb)


def test_rankdata_and_spearman_match_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(3, 15))
        a = rng.integers(0, 5, n).astype(float) if trial % 2 else rng.normal(size=n)  # with and without ties
        b = rng.integers(0, 4, n).astype(float) if trial % 3 else rng.normal(size=n)
        assert rankdata(a).tolist() == pytest.approx(_brute_ranks(list(a)))
        if len(set(a)) > 1 and len(set(b)) > 1:
            assert spearman(a, b) == pytest.approx(_brute_spearman(a, b), abs=1e-12)
    x = np.arange(10.0)
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(x, np.ones(10)) is None  # constant side: undefined, not 0


def test_spearman_matches_a_hand_rank_computation_with_ties():
    a = np.array([1.0, 2.0, 2.0, 5.0, 3.0])
    b = np.array([10.0, 30.0, 20.0, 50.0, 40.0])
    # average ranks a: [0, 1.5, 1.5, 4, 3], b: [0, 2, 1, 4, 3] -> Pearson of the ranks
    ra, rb = np.array([0, 1.5, 1.5, 4, 3]), np.array([0, 2, 1, 4, 3.0])
    assert rankdata(a).tolist() == (ra + 1).tolist()
    assert spearman(a, b) == pytest.approx(np.corrcoef(ra, rb)[0, 1])
    # by hand: centred ranks a (-2, -0.5, -0.5, 2, 1), b (-2, 0, -1, 2, 1): cov 9.5, var 9.5 and 10
    assert spearman(a, b) == pytest.approx(9.5 / math.sqrt(9.5 * 10.0), abs=1e-15)
    assert spearman(a, -a) == pytest.approx(-1.0)
    # undefined (a constant side): None by default; MATES keeps running maxima and asks for nan
    assert spearman(np.ones(4), np.arange(4.0)) is None
    assert np.isnan(spearman(np.ones(4), np.arange(4.0), undefined=float("nan")))


def test_spearman_drops_non_finite_pairs_and_refuses_mismatched_shapes():
    a = np.array([1.0, np.nan, 3.0, 2.0, np.inf])
    b = np.array([1.0, 5.0, 2.0, 3.0, 4.0])
    assert spearman(a, b) == pytest.approx(_brute_spearman([1.0, 3.0, 2.0], [1.0, 2.0, 3.0]))
    assert spearman(np.array([1.0, np.nan]), np.array([1.0, 2.0])) is None  # one pair left
    with pytest.raises(LmselectError, match="spearman"):
        spearman(np.arange(3.0), np.arange(4.0))


def _t_cdf(t: float, df: int, n: int = 4000) -> float:
    """P(T <= t) for t >= 0: 1/2 + the integral of Student's t density from 0 to t (composite Simpson)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    h = t / n
    f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
    return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))


def _t_pdf(t: float, df: int) -> float:
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    return c * (1 + t * t / df) ** (-(df + 1) / 2)


def test_t975_table_is_the_quantile_rounded_to_three_decimals():
    """Each tabled value q has P(T_df <= q) = 0.975 up to its rounding: |F(q) − 0.975| <= f(q) · 0.0005."""
    for df, q in enumerate(T975, start=1):
        assert t975(df) == q
        assert abs(_t_cdf(q, df) - 0.975) <= _t_pdf(q, df) * 0.0005 + 1e-9, (df, q)
    assert (t975(1), t975(2), t975(4), t975(30)) == (12.706, 4.303, 2.776, 2.042)  # the textbook values
    # beyond df 30 the normal quantile: 1.96 is itself the rounded normal 0.975 quantile, and narrower than t's
    assert 0.5 * (1 + math.erf(1.96 / math.sqrt(2))) == pytest.approx(0.975, abs=1e-4)
    assert t975(31) == t975(1000) == 1.96 and _t_cdf(1.96, 31) < 0.975
    with pytest.raises(LmselectError):
        t975(0)


def test_paired_interval_is_mean_plus_minus_t_times_standard_error():
    d = [0.3, -0.1, 0.5, 0.2]
    n, m = len(d), sum(d) / len(d)
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1))
    half = 3.182 * sd / math.sqrt(n)  # t_{0.975, 3}
    res = paired_interval(d)
    assert res["n"] == 4 and res["mean"] == pytest.approx(m) and res["sd"] == pytest.approx(sd)
    assert res["ci95"] == pytest.approx([m - half, m + half])
    assert res["within_noise"] is True  # the interval contains 0
    assert paired_interval([1.0, 1.1, 0.9])["within_noise"] is False
    assert paired_interval([None, 0.5]) == {"n": 1, "mean": 0.5, "sd": None, "ci95": None, "within_noise": True}
    assert paired_interval([])["n"] == 0


def test_summaries_skip_missing_values():
    assert finite_mean([1.0, None, float("nan"), 3.0]) == 2.0 and finite_mean([None]) is None
    assert sample_sd([1.0, 3.0, None]) == pytest.approx(math.sqrt(2.0)) and sample_sd([1.0]) is None
    assert standard_error([1.0, 3.0]) == pytest.approx(1.0) and standard_error([2.0]) is None
    assert se_of_mean([0.3, 0.4, None]) == pytest.approx(0.25) and se_of_mean([]) is None
