"""Random selection baseline: a seeded, uniformly random fraction of the candidates (no scores)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lmselect.artifacts import LmselectError, parent_ref
from lmselect.context import STREAM_SELECT, RoundContext
from lmselect.select import selection as selection_format  # looked up per call: tests replace the writer
from lmselect.select.base import Selection, SelectionMethod, register
from lmselect.select.topk import random_fraction


def select_random(pool: Any, ids: np.ndarray | None, fraction: float, seed: int) -> np.ndarray:
    """Sorted int64 ids: ``fraction`` of ``ids`` (all training sequences of ``pool`` when None), drawn with ``seed``."""
    ids = pool.ids(None) if ids is None else np.unique(np.asarray(ids, dtype=np.int64))
    if len(ids) and (ids[0] < 0 or ids[-1] >= len(pool)):
        raise LmselectError(f"{pool.path}: candidate ids out of range (pool has {len(pool)} sequences)")
    return random_fraction(ids, fraction, seed)


def random_selection(
    out_dir: str | Path,
    pool: Any,
    ids: np.ndarray | None,
    fraction: float,
    seed: int,
    parents: list[dict[str, str]] | None = None,
) -> Path:
    """Select randomly and write the selection artifact (summary without histogram)."""
    cand = pool.ids(None) if ids is None else np.unique(np.asarray(ids, dtype=np.int64))
    sel = select_random(pool, cand, fraction, seed)
    return selection_format.write_selection(out_dir, pool, cand, None, sel, "random", fraction, extra={"seed": seed},
                           parents=parents if parents is not None else [parent_ref(pool.path)], seed=seed)


# ----------------------------------------------------------------------------------------------------------------
# the pipeline method


@register
class RandomSelection(SelectionMethod):
    """The control every comparison is paired with: a seeded uniform ``select_fraction`` of each round's shard."""

    name = "random"
    description = "seeded uniformly random fraction of each round's candidates (the control)"
    color = "#7f7f7f"
    control = True

    def select(self, ctx: RoundContext) -> Selection:
        # seed-determined and cheap: every rank computes the same ids
        return Selection(random_fraction(ctx.candidates, ctx.fraction, seed=ctx.derived_seed(STREAM_SELECT)))
