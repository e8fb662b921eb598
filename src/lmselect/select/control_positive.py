"""Known-answer positive control (``compare --controls``): select the planted target-like documents, then random.

The pool of a controlled comparison holds held-out selection-set passages planted as documents (source
``planted_target``; the methods see only the other part of the selection set, and report items are never planted).
Training on them must lower the report-set LAMBADA loss, since they are the same kind of text, so this arm has a known
answer: a comparison that cannot tell it from random at its number of seeds cannot rank anything whose effect is
smaller. Per round: every candidate sequence holding part of a planted target-like document (all of them when they
fit in the budget k = ``select_fraction`` of the candidates, else a seeded random k of them), then random to fill k:
the fill is taken from *random's own selection at the same seed* (in a seeded order), and only past it from the
other candidates. So the arm is random's selection with a few sequences swapped for the planted ones, and its
paired Δ to random measures those documents rather than a second random draw. In a pool without planted documents
it is exactly random selection (logged).
"""

from __future__ import annotations

import logging

import numpy as np

from lmselect.context import STREAM_SELECT, RoundContext
from lmselect.data.planted import TARGET, sequences_with_sources
from lmselect.select.base import Selection, SelectionMethod, register
from lmselect.select.topk import first_then_fill, n_select, random_fraction

log = logging.getLogger("lmselect.select")


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
        seed = ctx.derived_seed(STREAM_SELECT)
        rand = random_fraction(cand, ctx.fraction, seed)  # what random selects at this seed and round
        rng = np.random.default_rng([seed, 1])  # the order in which random's picks give way to the planted ones
        fill = np.concatenate([rng.permutation(rand), rng.permutation(np.setdiff1d(cand, rand))])
        ids = first_then_fill(planted, fill, k, rng)
        scores = np.isin(cand, planted).astype(np.float64)  # 1 = planted target-like, the rest tie at 0
        return Selection(ids, scores=scores, extra={"planted_candidates": int(len(planted)),
                                                    "planted_selected": int(np.isin(ids, planted).sum()),
                                                    "fill": "random's selection at this seed"})
