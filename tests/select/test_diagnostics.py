"""Selection diagnostics against brute-force computations (plain Python loops; scipy is not a dependency)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmselect.select.diagnostics import (
    diagnostics_verdict,
    near_dup_fraction,
    rank_stability,
    selection_diagnostics,
    source_variance_share,
    tie_fraction,
    topk_overlap,
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


def _brute_quantile(v, q):
    s = sorted(v)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def test_rank_stability_is_spearman_of_two_scorers():
    x = np.arange(10.0)
    assert rank_stability(x, x[::-1]) == pytest.approx(-1.0)
    assert rank_stability(x, x**3) == pytest.approx(1.0)


def test_tie_fraction_and_source_share_match_brute_force():
    s = np.array([0.1, 0.2, 0.2, 0.3, 0.5, 0.5, 0.5, 0.9])
    brute = sum(1 for v in s if sum(w == v for w in s) > 1) / len(s)
    assert tie_fraction(s) == pytest.approx(brute) == pytest.approx(5 / 8)
    src = np.array(["a", "a", "b", "b", "b", "c", "c", "a"])
    mean = sum(s) / len(s)
    groups = {g: [v for v, h in zip(s, src) if h == g] for g in set(src)}
    between = sum(len(v) * (sum(v) / len(v) - mean) ** 2 for v in groups.values())
    total = sum((v - mean) ** 2 for v in s)
    assert source_variance_share(s, src) == pytest.approx(between / total)
    assert source_variance_share(np.array([1.0, 2.0, 3.0, 4.0]), np.array(["a", "a", "b", "b"])) == pytest.approx(0.8)


def test_near_dup_fraction_matches_brute_force():
    rng = np.random.default_rng(1)
    rows = rng.integers(0, 6, size=(7, 14))
    rows[3, 2:12] = rows[0, 0:10]  # a copied stretch
    rows[5] = rows[1]  # an exact duplicate
    n = 4
    got = near_dup_fraction(rows, n=n)
    grams = [[tuple(r[j : j + n]) for j in range(len(r) - n + 1)] for r in rows.tolist()]
    for i, g in enumerate(grams):
        others = set().union(*(set(x) for k, x in enumerate(grams) if k != i))
        assert got[i] == pytest.approx(sum(x in others for x in g) / len(g)), i
    assert got[5] == 1.0 and got[1] == 1.0


def test_topk_overlap():
    o = topk_overlap(np.array([1, 2, 3, 4]), np.array([3, 4, 5]))
    assert o["intersection"] == 2 and o["jaccard"] == pytest.approx(2 / 5) and o["overlap"] == pytest.approx(2 / 3)


def test_selection_diagnostics_on_a_pool(tmp_path, tiny_tokenizer):
    from lmselect.data.pool import TokenPool, write_pool

    rng = np.random.default_rng(2)
    n, L = 24, 16
    tokens = rng.integers(1, 200, size=(n, L))
    eos = tiny_tokenizer.eos_token_id
    n_eos = rng.integers(0, 4, n)
    for i in range(n):
        tokens[i, :n_eos[i]] = eos
    tokens[7] = tokens[3]  # a duplicate pair
    sources = ["a" if i % 3 else "b" for i in range(n)]
    lengths = rng.integers(4, L + 1, n)  # real tokens per row (the rest padding)
    spans = {"seq_id": np.arange(n), "doc_id": [str(i) for i in range(n)], "source": sources,
             "start": np.zeros(n, dtype=np.int64), "length": lengths}
    pool = TokenPool(write_pool(tmp_path / "p", tokens, np.zeros(n), sources, tiny_tokenizer, doc_spans=spans))
    cand = np.arange(n)
    scores = rng.normal(size=n)
    scores[5] = scores[6]
    proxy = rng.normal(size=n)
    sel = np.array([0, 3, 5, 9])
    d = selection_diagnostics(pool, cand, scores, sel, proxy_loss=proxy)

    assert d["n_candidates"] == n and d["n_selected"] == 4
    assert d["tie_fraction"] == pytest.approx(2 / n)
    for name in ("a", "b"):
        v = [s for s, src in zip(scores, sources) if src == name]
        ps = d["per_source"][name]
        assert ps["n"] == len(v)
        assert ps["mean"] == pytest.approx(sum(v) / len(v))
        assert ps["sd"] == pytest.approx(math.sqrt(sum((x - sum(v) / len(v)) ** 2 for x in v) / len(v)))
        for q in (5, 25, 50, 75, 95):
            assert ps[f"q{q:02d}"] == pytest.approx(_brute_quantile(v, q))
        chosen = [i for i in range(n) if sources[i] == name]
        assert ps["selected_rate"] == pytest.approx(sum(i in sel for i in chosen) / len(chosen))
    sp = d["spearman"]
    assert sp["length"] == pytest.approx(_brute_spearman(scores, lengths))
    assert sp["eos"] == pytest.approx(_brute_spearman(scores, [(r == eos).sum() for r in tokens]))
    assert sp["proxy_loss"] == pytest.approx(_brute_spearman(scores, proxy))
    # the runner measures the proxy loss on a seeded sample of the candidates (NaN elsewhere): the correlation is the
    # one of the sampled pairs alone
    sampled = np.array([1, 2, 4, 7, 8, 11])
    part = np.full(n, np.nan)
    part[sampled] = proxy[sampled]
    d_part = selection_diagnostics(pool, cand, scores, sel, proxy_loss=part)
    assert d_part["spearman"]["proxy_loss"] == pytest.approx(_brute_spearman(scores[sampled], proxy[sampled]))
    dup = near_dup_fraction(tokens)
    assert dup[3] == 1.0 and dup[7] == 1.0
    assert sp["near_dup"] == pytest.approx(_brute_spearman(scores, dup))
    assert "no dominant" in diagnostics_verdict(d) or "sorts by" in diagnostics_verdict(d)

    # a scorer that is a function of the source alone is called out as such
    by_source = np.array([1.0 if s == "b" else 0.0 for s in sources]) + 1e-3 * rng.normal(size=n)
    v = diagnostics_verdict(selection_diagnostics(pool, cand, by_source, sel))
    assert v.startswith("scorer mostly sorts by source") and "b > a" in v
    # ... and one that sorts by length
    v = diagnostics_verdict(selection_diagnostics(pool, cand, lengths + 1e-3 * rng.normal(size=n), sel))
    assert "sorts by length (Spearman +" in v


def test_packed_pool_length_is_constant_so_correlation_is_undefined(tiny_pool):
    cand = tiny_pool.ids(0)
    d = selection_diagnostics(tiny_pool, cand, np.linspace(0, 1, len(cand)), cand[:4])
    assert d["spearman"]["length"] is None  # every packed row is full: no length axis to sort by
    assert d["spearman"]["proxy_loss"] is None


def test_misaligned_inputs_raise(tiny_pool):
    from lmselect.artifacts import LmselectError

    cand = tiny_pool.ids(0)
    with pytest.raises(LmselectError, match="scores for"):
        selection_diagnostics(tiny_pool, cand, np.zeros(len(cand) - 1), cand[:2])
