"""Known-answer positive control (``compare --controls``): select the planted target-like documents, then random.

The pool of a controlled comparison holds held-out selection-set passages planted as documents (source
``planted_target``; the methods see only the other part of the selection set, and report items are never planted).
Training on them must lower the report-set LAMBADA loss, since they are the same kind of text, so this arm has a known
answer: a comparison that cannot tell it from random at its number of seeds cannot rank anything whose effect is
smaller. Per round: every candidate sequence holding part of a planted target-like document (all of them when they
fit in the budget k = ``select_fraction`` of the candidates, else a seeded random k of them), then a seeded uniform
sample of the other candidates to fill k. In a pool without planted documents it is random selection (logged).
"""

from __future__ import annotations

import logging

import numpy as np

from lmselect.context import STREAM_SELECT, RoundContext
from lmselect.data.planted import TARGET, sequences_with_sources
from lmselect.select.base import Selection, SelectionMethod, register
from lmselect.select.topk import n_select

log = logging.getLogger("lmselect.select")


def first_then_fill(cand: np.ndarray, first: np.ndarray, fill_order: np.ndarray, k: int,
                    rng: np.random.Generator) -> np.ndarray:
    """Sorted k ids: all of ``first`` (a seeded random k of them when more), then ``fill_order``'s leading ids that
    are not in ``first`` (``fill_order`` is a permutation of ``cand``)."""
    first = np.asarray(first, dtype=np.int64)
    if len(first) >= k:
        return np.sort(rng.choice(first, size=k, replace=False))
    rest = fill_order[~np.isin(fill_order, first)]
    return np.sort(np.concatenate([first, rest[: k - len(first)]]).astype(np.int64))


@register
class PositiveControl(SelectionMethod):
    """Selects the planted held-out target-like documents among the candidates, then random to fill."""

    name = "control_positive"
    description = ("known-answer positive control (compare --controls): the planted held-out target-like documents "
                   "among the candidates, then random to fill")
    color = "#2ca02c"
    known_answer = "positive"

    def select(self, ctx: RoundContext) -> Selection:
        cand = np.asarray(ctx.candidates, dtype=np.int64)
        k = n_select(len(cand), ctx.fraction)
        planted = sequences_with_sources(ctx.pool, cand, (TARGET,))
        if len(planted) == 0:
            log.warning("control_positive: no planted target-like documents among round %d's candidates (run it "
                        "through lmselect compare --controls); it selects at random", ctx.round)
        rng = np.random.default_rng(ctx.derived_seed(STREAM_SELECT))
        ids = first_then_fill(cand, planted, rng.permutation(cand), k, rng)
        scores = np.isin(cand, planted).astype(np.float64)  # 1 = planted target-like, the rest tie at 0
        return Selection(ids, scores=scores, extra={"planted_candidates": int(len(planted)),
                                                    "planted_selected": int(np.isin(ids, planted).sum()),
                                                    "fill": "seeded uniform"})
