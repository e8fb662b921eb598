"""Selection diagnostics: what a sequence scorer actually sorts by (issue 12 item 4).

A score model can look busy and still learn nothing useful: it may rank whole sources (domains) against each other,
prefer long or short documents, reward near-duplicates, or output a handful of distinct values. These functions turn
one round's candidates, scores and selection into numbers that show that at a glance. They are pure functions of
arrays and a :class:`~lmselect.data.pool.TokenPool` (only ``.sources``, ``.tokens``, ``.eos_id`` and, when present,
``.doc_spans()`` are used), so the report, ``lmselect check`` and users' notebooks compute them the same way.

Definitions (all on the candidates of one round):

* per-source score distribution: n, mean, sd (population), quantiles 5/25/50/75/95 (linear interpolation, numpy's
  default), and the selection rate of the source.
* ``source_variance_share`` (η²): between-source sum of squares / total sum of squares of the score. 1 = the score
  is a function of the source alone; 0 = every source has the same mean score.
* Spearman rank correlation (:func:`lmselect.stats.spearman`: ties get their average rank; None when either side
  is constant) of the score with
  - ``length``: real tokens of the sequence = the summed document-span lengths in ``docs.parquet`` (packed pools are
    full, so this is constant there and the correlation is None),
  - ``eos``: the number of EOS tokens in the row (documents ending in it, i.e. documents per sequence),
  - ``proxy_loss`` when given (e.g. the proxy's mean token CE of each candidate; NaN = not measured, the pair is
    dropped: the runner measures a seeded sample of 1,024 candidates, ``pipeline.PROXY_LOSS_SAMPLE``),
  - ``near_dup``: the fraction of a sequence's token 8-gram positions whose 8-gram also occurs in at least one
    *other* candidate sequence (8-grams hashed to 64 bits; collisions are negligible at these sizes). On shards
    larger than ``dup_sample`` candidates it is computed within a seeded sample of that many (duplicates are then
    counted within the sample).
* ``tie_fraction``: share of candidates whose score equals (exactly) another candidate's score.

:func:`rank_stability` (Spearman of two scorers on the same sequences, e.g. consecutive rounds' score models) and
:func:`topk_overlap` (Jaccard and overlap coefficient of two selections, e.g. across seeds) compare runs;
:func:`diagnostics_verdict` says in one line whether a scorer mostly sorts by source or by length.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lmselect.artifacts import LmselectError
from lmselect.stats import spearman  # also what BLISS's rank stability imports from here

QUANTILES = (5, 25, 50, 75, 95)
NGRAM = 8
DUP_SAMPLE = 20_000
# a scorer "mostly sorts by source" when source explains more than half the score variance; "by length" when the
# rank correlation with length (or documents per sequence) is at least this strong
SOURCE_SHARE_THRESHOLD = 0.5
LENGTH_RHO_THRESHOLD = 0.5


# ------------------------------------------------------------------------------------------------------------------
# statistics


def tie_fraction(scores: np.ndarray) -> float:
    """Share of values that equal at least one other value exactly."""
    s = np.asarray(scores, dtype=np.float64)
    if len(s) == 0:
        return 0.0
    _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    return float((counts[inv] > 1).mean())


def source_variance_share(scores: np.ndarray, sources: np.ndarray) -> float | None:
    """η² = between-group sum of squares / total sum of squares (None when the scores are constant)."""
    s = np.asarray(scores, dtype=np.float64)
    src = np.asarray(sources)
    ok = np.isfinite(s)
    s, src = s[ok], src[ok]
    total = float(((s - s.mean()) ** 2).sum()) if len(s) else 0.0
    if total == 0:
        return None
    _, inv = np.unique(src, return_inverse=True)
    n = np.bincount(inv)
    means = np.bincount(inv, weights=s) / n
    between = float((n * (means - s.mean()) ** 2).sum())
    return between / total


def _describe(v: np.ndarray) -> dict[str, Any]:
    v = v[np.isfinite(v)]
    out: dict[str, Any] = {"n": int(len(v)), "mean": None, "sd": None}
    out.update({f"q{q:02d}": None for q in QUANTILES})
    if len(v):
        out["mean"], out["sd"] = float(v.mean()), float(v.std())
        for q, x in zip(QUANTILES, np.percentile(v, QUANTILES)):
            out[f"q{q:02d}"] = float(x)
    return out


# ------------------------------------------------------------------------------------------------------------------
# sequence features


def ngram_hashes(tokens: np.ndarray, n: int = NGRAM) -> np.ndarray:
    """[N, L-n+1] uint64 polynomial hashes of every token n-gram of each row (wrapping uint64 arithmetic)."""
    t = np.asarray(tokens, dtype=np.uint64)
    if t.ndim != 2 or t.shape[1] < n:
        return np.zeros((t.shape[0] if t.ndim == 2 else 0, 0), dtype=np.uint64)
    m = t.shape[1] - n + 1
    h = np.zeros((t.shape[0], m), dtype=np.uint64)
    base = np.uint64(1_000_003)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * base + (t[:, j : j + m] + np.uint64(1))
    return h


def near_dup_fraction(tokens: np.ndarray, n: int = NGRAM) -> np.ndarray:
    """Per row: fraction of its n-gram positions whose n-gram also occurs in another row (0 for rows shorter than n)."""
    h = ngram_hashes(tokens, n)
    rows, m = h.shape
    if rows == 0 or m == 0:
        return np.zeros(rows, dtype=np.float64)
    flat = h.reshape(-1)
    row_of = np.repeat(np.arange(rows), m)
    # distinct (hash, row) pairs -> in how many rows each hash occurs
    pairs = np.unique(np.stack([flat, row_of.astype(np.uint64)], axis=1), axis=0)
    uh, n_rows = np.unique(pairs[:, 0], return_counts=True)
    shared = n_rows[np.searchsorted(uh, flat)] > 1
    return shared.reshape(rows, m).mean(axis=1)


def real_lengths(pool: Any, ids: np.ndarray) -> np.ndarray:
    """Real tokens per sequence: summed document-span lengths (``docs.parquet``); seq_len when the pool has none."""
    ids = np.asarray(ids, dtype=np.int64)
    try:
        spans = pool.doc_spans()
    except Exception:  # noqa: BLE001 - a pool view without spans: every row counts as full
        return np.full(len(ids), float(pool.tokens.shape[1]))
    sid = spans.column("seq_id").to_numpy()
    length = spans.column("length").to_numpy()
    per_seq = np.bincount(sid, weights=length, minlength=int(pool.tokens.shape[0]))
    return per_seq[ids].astype(np.float64)


def eos_counts(pool: Any, ids: np.ndarray) -> np.ndarray:
    rows = np.asarray(pool.tokens[np.asarray(ids, dtype=np.int64)])
    return (rows == pool.eos_id).sum(axis=1).astype(np.float64)


# ------------------------------------------------------------------------------------------------------------------
# the diagnostics


def selection_diagnostics(
    pool: Any,
    cand_ids: np.ndarray,
    scores: np.ndarray,
    selected: np.ndarray,
    *,
    proxy_loss: np.ndarray | None = None,
    dup_sample: int = DUP_SAMPLE,
    seed: int = 0,
) -> dict[str, Any]:
    """Diagnostics of one scored selection (see the module docstring for every definition).

    ``scores`` (and ``proxy_loss``) are aligned with ``cand_ids``; ``selected`` is a subset of ``cand_ids``.
    """
    cand_ids = np.asarray(cand_ids, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != cand_ids.shape:
        raise LmselectError(f"selection_diagnostics: {len(scores)} scores for {len(cand_ids)} candidates")
    if proxy_loss is not None:
        proxy_loss = np.asarray(proxy_loss, dtype=np.float64)
        if proxy_loss.shape != cand_ids.shape:
            raise LmselectError(f"selection_diagnostics: {len(proxy_loss)} proxy losses for {len(cand_ids)} candidates")
    is_sel = np.isin(cand_ids, np.asarray(selected, dtype=np.int64))
    sources = np.asarray(pool.sources(cand_ids), dtype=object).astype(str)

    per_source: dict[str, Any] = {}
    for name in sorted(set(sources.tolist())):
        m = sources == name
        d = _describe(scores[m])
        d["selected_rate"] = float(is_sel[m].mean())
        per_source[name] = d

    # near-duplication on (a seeded sample of) the candidates
    if len(cand_ids) > dup_sample:
        pos = np.sort(np.random.default_rng(seed).choice(len(cand_ids), size=dup_sample, replace=False))
    else:
        pos = np.arange(len(cand_ids))
    dup = near_dup_fraction(np.asarray(pool.tokens[cand_ids[pos]]))

    corr = {
        "length": spearman(scores, real_lengths(pool, cand_ids)),
        "eos": spearman(scores, eos_counts(pool, cand_ids)),
        "proxy_loss": spearman(scores, proxy_loss) if proxy_loss is not None else None,
        "near_dup": spearman(scores[pos], dup),
    }
    return {
        "n_candidates": int(len(cand_ids)),
        "n_selected": int(is_sel.sum()),
        "all": _describe(scores),
        "per_source": per_source,
        "source_variance_share": source_variance_share(scores, sources),
        "spearman": corr,
        "near_dup": {"ngram": NGRAM, "sampled": int(len(pos)), "mean": float(dup.mean()) if len(dup) else 0.0},
        "tie_fraction": tie_fraction(scores),
    }


def rank_stability(scores_a: np.ndarray, scores_b: np.ndarray) -> float | None:
    """Spearman ρ between two scorers' scores of the same sequences (aligned arrays), e.g. rounds r and r+1."""
    return spearman(scores_a, scores_b)


def topk_overlap(sel_a: np.ndarray, sel_b: np.ndarray) -> dict[str, float | int]:
    """Agreement of two selections (sets of sequence ids): Jaccard |A∩B|/|A∪B| and overlap |A∩B|/min(|A|,|B|)."""
    a = set(np.asarray(sel_a, dtype=np.int64).tolist())
    b = set(np.asarray(sel_b, dtype=np.int64).tolist())
    inter, union = len(a & b), len(a | b)
    return {
        "n_a": len(a), "n_b": len(b), "intersection": inter,
        "jaccard": inter / union if union else 1.0,
        "overlap": inter / min(len(a), len(b)) if a and b else 0.0,
    }


def diagnostics_verdict(
    diag: dict[str, Any], *, source_threshold: float = SOURCE_SHARE_THRESHOLD, length_threshold: float = LENGTH_RHO_THRESHOLD
) -> str:
    """One line: does the scorer mostly sort by source, by length / documents per sequence, or neither?"""
    notes = []
    share = diag.get("source_variance_share")
    if share is not None and share > source_threshold:
        ps = diag.get("per_source", {})
        ranked = sorted((v["mean"], k) for k, v in ps.items() if v.get("mean") is not None)
        order = " > ".join(k for _, k in reversed(ranked))
        notes.append(f"mostly sorts by source ({share:.0%} of score variance is between sources: {order})")
    for key, what in (("length", "length"), ("eos", "documents per sequence")):
        rho = (diag.get("spearman") or {}).get(key)
        if rho is not None and abs(rho) >= length_threshold:
            notes.append(f"sorts by {what} (Spearman {rho:+.2f})")
    ties = diag.get("tie_fraction", 0.0)
    if ties > 0.5:
        notes.append(f"{ties:.0%} of candidates tie with another")
    if not notes:
        share_txt = "n/a" if share is None else f"{share:.0%}"
        return f"scorer: no dominant source or length axis (source explains {share_txt} of score variance)"
    return "scorer " + "; ".join(notes)
