"""Sequence selection primitives: deterministic top fraction, seeded Gumbel-top-k, a seeded random fraction and
first-then-fill (the known-answer control arms).

Both return sorted sequence ids. Ties in the deterministic top fraction are broken by sequence id (lower first), so
the result equals a brute-force stable sort on (-score, seq_id).
"""

from __future__ import annotations

import numpy as np

from lmselect.artifacts import LmselectError
from lmselect.config import check_fraction


def n_select(n: int, fraction: float) -> int:
    check_fraction(fraction, "selection fraction")
    return max(1, int(round(fraction * n))) if n > 0 else 0


def top_fraction(seq_ids: np.ndarray, scores: np.ndarray, fraction: float, largest: bool = True) -> np.ndarray:
    """Ids of the top ``fraction`` by score (highest when ``largest``), ties broken by lower sequence id."""
    seq_ids = np.asarray(seq_ids, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    if seq_ids.shape != scores.shape:
        raise LmselectError("seq_ids and scores must have the same length")
    k = n_select(len(seq_ids), fraction)
    key = -scores if largest else scores
    order = np.lexsort((seq_ids, key))  # primary: key ascending; secondary: seq id ascending
    return np.sort(seq_ids[order[:k]])


def gumbel_topk(
    seq_ids: np.ndarray, scores: np.ndarray, fraction: float, temperature: float, seed: int, largest: bool = True
) -> np.ndarray:
    """Gumbel-top-k: sample k without replacement with probabilities ∝ exp(score / τ) (largest) or exp(−score / τ).

    MATES (METHODS §2) keeps the *smallest* predicted post-step validation losses: call with ``largest=False``.
    As τ -> 0 the noise is negligible and this is plain top-k.
    """
    if temperature <= 0:
        raise LmselectError(f"Gumbel temperature must be > 0, got {temperature}")
    seq_ids = np.asarray(seq_ids, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    rng = np.random.default_rng(seed)
    g = rng.gumbel(size=len(scores))
    sign = 1.0 if largest else -1.0
    return top_fraction(seq_ids, sign * scores / temperature + g, fraction, largest=True)


def random_fraction(seq_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Uniformly random ``fraction`` of ``seq_ids`` (seeded), sorted."""
    seq_ids = np.asarray(seq_ids, dtype=np.int64)
    k = n_select(len(seq_ids), fraction)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(seq_ids, size=k, replace=False))


def first_then_fill(first: np.ndarray, fill_order: np.ndarray, k: int,
                    rng: np.random.Generator) -> np.ndarray:
    """Sorted k ids: all of ``first`` (a seeded random k of them when more), then ``fill_order``'s leading ids that
    are not in ``first`` (``fill_order``: every candidate, in the order the fill takes them)."""
    first = np.asarray(first, dtype=np.int64)
    if len(first) >= k:
        return np.sort(rng.choice(first, size=k, replace=False))
    rest = fill_order[~np.isin(fill_order, first)]
    return np.sort(np.concatenate([first, rest[: k - len(first)]]).astype(np.int64))
