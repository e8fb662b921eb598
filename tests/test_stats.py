"""lmselect.stats against scipy-free oracles: ranks and Spearman's ρ by hand and by brute force (with ties), the t
quantiles against a numerical integral of Student's t density, the paired interval against its formula."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmselect.errors import LmselectError
from lmselect.stats import (
    T80,
    T975,
    decision_accuracy,
    finite_mean,
    min_detectable_effect,
    noise_floor,
    paired_interval,
    rankdata,
    ratio_interval,
    sample_sd,
    se_of_mean,
    spearman,
    standard_error,
    t80,
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


def test_paired_interval_of_identical_differences_is_no_evidence():
    """Three seeds that each gain exactly one answer of 45 (accuracy's step) give sd 0: the t interval would have zero
    width and call the gain certain. It is reported without an interval and within noise (seen in the demo's
    two-scale comparison, 9-task accuracy +2.22 pp at every seed)."""
    res = paired_interval([1 / 45, 1 / 45, 1 / 45])
    assert res["degenerate"] is True and res["ci95"] is None and res["within_noise"] is True
    assert abs(res["mean"] - 1 / 45) < 1e-15 and res["sd"] < 1e-15
    assert "degenerate" not in paired_interval([0.0, 0.0, 0.0])  # no difference at all is simply no difference
    assert paired_interval([0.0, 0.0, 0.0])["within_noise"] is True


def test_summaries_skip_missing_values():
    assert finite_mean([1.0, None, float("nan"), 3.0]) == 2.0 and finite_mean([None]) is None
    assert sample_sd([1.0, 3.0, None]) == pytest.approx(math.sqrt(2.0)) and sample_sd([1.0]) is None
    assert standard_error([1.0, 3.0]) == pytest.approx(1.0) and standard_error([2.0]) is None
    assert se_of_mean([0.3, 0.4, None]) == pytest.approx(0.25) and se_of_mean([]) is None


def test_t80_table_is_the_quantile_rounded_to_three_decimals():
    for df, q in enumerate(T80, start=1):
        assert t80(df) == q
        assert abs(_t_cdf(q, df) - 0.80) <= _t_pdf(q, df) * 0.0005 + 1e-9, (df, q)
    assert t80(31) == 0.842 and 0.5 * (1 + math.erf(0.842 / math.sqrt(2))) == pytest.approx(0.80, abs=2e-4)
    with pytest.raises(LmselectError):
        t80(0)


def test_noise_floor_and_minimum_detectable_effect_by_hand():
    # random's metric over 3 seeds: sd = 0.1 exactly, so an A/A difference has sd 0.1·√2
    vals = [1.0, 1.1, 1.2]
    nf = noise_floor(vals)
    assert nf == pytest.approx(0.1 * math.sqrt(2))
    # paired t, n = 3 pairs: (t_{0.975,2} + t_{0.80,2}) · sd / √3 = (4.303 + 1.061) · 0.1414 / 1.732
    assert min_detectable_effect(nf, 3) == pytest.approx((4.303 + 1.061) * 0.1 * math.sqrt(2) / math.sqrt(3))
    assert min_detectable_effect(1.0, 2) == pytest.approx((12.706 + 1.376) / math.sqrt(2))  # 9.96 sd at 2 seeds
    # more seeds, smaller detectable effect; the normal limit (1.96 + 0.842) · sd / √n beyond df 30
    assert min_detectable_effect(1.0, 3) < min_detectable_effect(1.0, 2)
    assert min_detectable_effect(1.0, 100) == pytest.approx((1.96 + 0.842) / 10)
    assert min_detectable_effect(1.0, 1) is None and min_detectable_effect(None, 5) is None
    assert noise_floor([1.0]) is None and noise_floor([1.0, None]) is None


def test_minimum_detectable_effect_has_80_percent_power_by_simulation():
    """A paired t test at the MDE rejects in about 80 % of simulated comparisons (normal differences, n = 4)."""
    rng = np.random.default_rng(0)
    n, sd = 4, 1.0
    mde = min_detectable_effect(sd, n)
    d = rng.normal(mde, sd, size=(20000, n))
    tstat = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
    power = float((np.abs(tstat) > t975(n - 1)).mean())
    assert 0.77 <= power <= 0.86, power  # the t-quantile formula is slightly conservative at small n


def test_ratio_interval_matches_fieller_by_hand():
    num = [0.1, 0.3, 0.2]  # method − random per seed
    den = [1.0, 1.2, 0.8]  # positive control − random per seed
    res = ratio_interval(num, den)
    a, b = 0.2, 1.0
    vaa, vbb, vab = 0.01 / 3, 0.04 / 3, 0.01 / 3  # sample (co)variances / n
    t2 = 4.303 ** 2
    qa, qb, qc = b * b - t2 * vbb, -2 * (a * b - t2 * vab), a * a - t2 * vaa
    r = math.sqrt(qb * qb - 4 * qa * qc)
    assert res["ratio"] == pytest.approx(0.2) and res["bounded"]
    assert res["ci95"] == pytest.approx(sorted([(-qb - r) / (2 * qa), (-qb + r) / (2 * qa)]))
    lo, hi = res["ci95"]
    assert lo < 0.2 < hi
    # every ρ inside satisfies Fieller's inequality, the end points with equality
    for rho in (lo, hi):
        assert (a - rho * b) ** 2 == pytest.approx(t2 * (vaa - 2 * rho * vab + rho * rho * vbb))
    # a denominator within its own noise: unbounded
    res0 = ratio_interval([0.1, 0.2], [1.0, -0.9])
    assert res0["ci95"] is None and res0["bounded"] is False and res0["ratio"] == pytest.approx(0.15 / 0.05)
    assert ratio_interval([0.1], [0.5])["ci95"] is None and ratio_interval([], [])["n"] == 0


def test_decision_accuracy_counts_pairs_ordered_the_same_way():
    a = {"random": 1.0, "bliss": 2.0, "pos": 3.0, "neg": 0.0}
    b = {"random": 1.5, "bliss": 1.0, "pos": 3.0, "neg": 0.5, "only_b": 9.0}
    res = decision_accuracy(a, b)
    # 6 pairs of the 4 shared arms; only (random, bliss) is swapped
    assert res["arms"] == ["bliss", "neg", "pos", "random"] and res["pairs"] == 6 and res["agree"] == 5
    assert res["accuracy"] == pytest.approx(5 / 6)
    # ranks over (bliss, neg, pos, random): (3, 1, 4, 2) and (2, 1, 4, 3); ρ = 1 − 6·Σd² / (n(n² − 1)) = 1 − 12/60
    assert res["spearman"] == pytest.approx(0.8)
    assert decision_accuracy({"x": 1.0}, {"x": 2.0})["accuracy"] is None
