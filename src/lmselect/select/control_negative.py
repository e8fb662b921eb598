"""Known-answer negative control (``compare --controls``): select the planted junk, then the most repetitive sequences.

The arm of known harm in a controlled comparison: every candidate sequence holding part of a planted junk document
(``planted_shuffled`` / ``planted_repeated`` / ``planted_random``: words shuffled, one sentence repeated, random words;
most of it is removed by the demo's prefilter), then the candidates by a fixed rule that needs no model: fewest
distinct tokens per sequence first (the most repetitive text of the shard: lists, tables, repeated lines), ties by
sequence id. Training on the most repetitive fifth of the pool must raise the report-set losses; a comparison that
cannot tell that from random cannot rank anything subtler.
"""

from __future__ import annotations

import numpy as np

from lmselect.context import STREAM_SELECT, RoundContext
from lmselect.data.planted import JUNK, sequences_with_sources
from lmselect.select.base import Selection, SelectionMethod, register
from lmselect.select.topk import first_then_fill, n_select


def distinct_token_share(tokens: np.ndarray) -> np.ndarray:
    """Per row of a [n, L] token array: distinct tokens / L (low = repetitive)."""
    t = np.sort(np.asarray(tokens), axis=1)
    distinct = 1 + (t[:, 1:] != t[:, :-1]).sum(axis=1)
    return distinct / t.shape[1]


@register
class NegativeControl(SelectionMethod):
    """Selects the planted junk among the candidates, then the most repetitive candidates (fewest distinct tokens)."""

    name = "control_negative"
    description = ("known-answer negative control (compare --controls): the planted junk among the candidates, then "
                   "the most repetitive sequences (fewest distinct tokens)")
    color = "#d62728"
    known_answer = "negative"

    def select(self, ctx: RoundContext) -> Selection:
        cand = np.asarray(ctx.candidates, dtype=np.int64)
        k = n_select(len(cand), ctx.fraction)
        junk = sequences_with_sources(ctx.pool, cand, JUNK)
        share = distinct_token_share(ctx.pool.tokens[cand])
        order = cand[np.lexsort((cand, share))]  # fewest distinct tokens first, ties by id
        rng = np.random.default_rng(ctx.derived_seed(STREAM_SELECT))  # only when the junk alone exceeds k
        ids = first_then_fill(junk, order, k, rng)
        scores = -share + 2.0 * np.isin(cand, junk)  # higher = preferred: junk first, then the most repetitive
        return Selection(ids, scores=scores, extra={"planted_candidates": int(len(junk)),
                                                    "planted_selected": int(np.isin(ids, junk).sum()),
                                                    "fill": "fewest distinct tokens"})
