"""Seeded, resumable orders of row ids: a stream's position is a counter, never iterator state.

* :class:`DataOrder` (the training loop's): epoch e is a permutation of the ids under seed + e, consumed in order and
  wrapping into the next epoch; its state is (epoch, offset).
* :class:`IndexStream` (the BLISS solver's): fixed-size global batches, the last partial batch of an epoch dropped,
  rank r taking its contiguous share of each; ``batch(k)`` is a pure function of k.
"""

from __future__ import annotations

import numpy as np

from lmselect.artifacts import LmselectError


class DataOrder:
    """Global batches of ids: epoch e is a permutation under seed + e, consumed in order, wrapping into the next."""

    def __init__(self, ids: np.ndarray, seed: int, epoch: int = 0, offset: int = 0) -> None:
        self.ids, self.seed, self.epoch, self.offset = ids, seed, epoch, offset
        self._perm_epoch, self._perm = -1, ids

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng(self.seed + self.epoch).permutation(self.ids)
            self._perm_epoch = self.epoch
        return self._perm

    def next(self, n: int) -> np.ndarray:
        out: list[np.ndarray] = []
        while n > 0:
            perm = self._permutation()
            take = perm[self.offset : self.offset + n]
            out.append(take)
            n -= len(take)
            self.offset += len(take)
            if self.offset >= len(perm):
                self.epoch, self.offset = self.epoch + 1, 0
        return np.concatenate(out)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}


class IndexStream:
    """Deterministic, resumable batches of rows: epoch e is ``default_rng(seed + e).permutation(n)`` cut into global
    batches (last partial batch dropped); rank r takes rows [r·b, (r+1)·b) of each global batch. ``batch(k)`` is a
    pure function of k, so a resumed run recomputes its position instead of storing iterator state."""

    def __init__(self, n: int, global_batch: int, seed: int, rank: int = 0, world: int = 1):
        if n < 1:
            raise LmselectError("batch stream: no rows to draw batches from")
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.global_batch = min(global_batch, n - n % world) if global_batch > n else global_batch
        if self.global_batch < world:
            raise LmselectError(f"batch stream: {n} rows cannot feed {world} ranks")
        self.local = self.global_batch // world
        self.per_epoch = n // self.global_batch
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def batch(self, k: int) -> np.ndarray:
        g = self.global_rows(k)
        return g[self.rank * self.local : (self.rank + 1) * self.local]

    def global_rows(self, k: int) -> np.ndarray:
        """Rows of global batch k, all ranks' shares in rank order (rank r's ``batch(k)`` is its r-th slice)."""
        epoch, j = divmod(int(k), self.per_epoch)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng(self.seed + epoch).permutation(self.n)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm[j * self.global_batch : j * self.global_batch + self.local * self.world]
