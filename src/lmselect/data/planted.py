"""Names of the planted sources of a known-answer experiment (``lmselect check`` and ``compare --controls``).

Planted documents carry these ``source`` labels in the pool, so that per-source selection rates measure them and the
known-answer control arms (``select/control_positive.py``, ``select/control_negative.py``) can find them. A leaf
module: ``check`` (which makes the documents) and ``select/`` (which reads the labels) both import it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

#: held-out selection-set passages planted as documents (never report items)
TARGET = "planted_target"
#: junk made from corpus documents: words shuffled, one sentence repeated, random words
JUNK: tuple[str, ...] = ("planted_shuffled", "planted_repeated", "planted_random")
PLANTED: tuple[str, ...] = (TARGET,) + JUNK


def sequences_with_sources(pool: Any, ids: np.ndarray, sources: tuple[str, ...]) -> np.ndarray:
    """Sorted ids among ``ids`` whose sequence holds any part of a document with one of ``sources`` (from the pool's
    ``docs.parquet``: a planted passage packed across two sequences counts in both)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    ids = np.asarray(ids, dtype=np.int64)
    path = Path(pool.path) / "docs.parquet"
    if not path.is_file() or len(ids) == 0:
        return np.zeros(0, dtype=np.int64)
    t = pq.read_table(path, columns=["seq_id", "source"])
    mask = pc.is_in(t.column("source"), value_set=pa.array(list(sources)))
    seqs = np.unique(np.asarray(t.filter(mask).column("seq_id").to_numpy(), dtype=np.int64))
    return np.intersect1d(ids, seqs)
