"""What a stage of a run can see: the run layout, derived seeds, and the run / round contexts given to methods.

* :class:`~lmselect.layout.RunLayout` (``layout.py``) is the one place that builds and parses the paths of a run
  directory (DESIGN "Run directory"); a :class:`RunContext` carries one.
* :func:`derived_seed` is the one seed formula: every random stream of a run (warm-up, selection, training data
  order, evaluation branch, probes, score-model init, references) is ``derived_seed(run seed, method seed, round,
  stream)``. Method names are not part of it, so seed k of every method trains on the same data order — the
  comparison is paired by seed.
* :class:`RunContext` carries the pool, the validation sets, the training config and rank coordination;
  :class:`RoundContext` adds one (method, seed, round) and is what :meth:`SelectionMethod.select` receives.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import numpy as np

from lmselect.config import replace
from lmselect.data.pool import TokenPool
from lmselect.errors import LmselectError
from lmselect.layout import RunLayout
from lmselect.models.presets import matmul_params
from lmselect.select.topk import random_fraction

if TYPE_CHECKING:  # pragma: no cover
    from lmselect.data.valset import ValidationSet
    from lmselect.train.distributed import DistInfo

T = TypeVar("T")

# Non-zero ranks wait for rank-0-only work (lm-eval on a large model takes hours) on a gloo group with this timeout;
# the default collective timeout (10 min for NCCL) would kill them. torchrun tears the peers down if a rank dies.
RANK0_WAIT = datetime.timedelta(hours=24)

# Streams of derived_seed (never reuse a number for another purpose: seeds would correlate).
STREAM_WARMUP_TARGET, STREAM_WARMUP_PROXY, STREAM_WARMUP_DATA = 1, 2, 3
STREAM_SELECT, STREAM_TRAIN, STREAM_DECAY = 10, 11, 12
STREAM_PROBE, STREAM_SCORER_INIT, STREAM_REFERENCE, STREAM_METHOD = 20, 21, 22, 23
STREAM_DIAGNOSTICS = 30  # the candidates whose proxy loss the selection diagnostics correlate with


def derived_seed(run_seed: int, method_seed: int = 0, rnd: int = 0, stream: int = 0) -> int:
    """The seed of one random stream: distinct for every (run seed, method seed, round, stream) in range."""
    if not (0 <= stream < 100 and 0 <= rnd < 100 and 0 <= method_seed < 1000):
        raise LmselectError(f"derived_seed: stream {stream}, round {rnd} or method seed {method_seed} out of range")
    return int(run_seed) * 10_000_000 + int(method_seed) * 10_000 + int(rnd) * 100 + int(stream)


class RunContext:
    """Everything of a run that stages and methods share: recipe, layout, pool, validation sets, devices, ranks.

    Rank coordination (torchrun): :meth:`main_only` runs a function on rank 0 alone while the others wait and
    re-raises a rank-0 failure on every rank; :meth:`main_first` is for idempotent single-process stages (rank 0
    computes and writes, then the others run the same function and only read); :meth:`sync` is a barrier.
    """

    def __init__(self, recipe: Any, run_dir: str | Path):
        import torch.distributed as dist

        from lmselect.train.distributed import init_distributed  # torch: context is imported by torch-free rooms

        self.recipe = recipe
        self.layout = RunLayout(run_dir, recipe.pool.path)
        self._owns_group = not (dist.is_available() and dist.is_initialized())
        self.dist: DistInfo = init_distributed(recipe.train.device)  # no-op without torchrun's env
        self._owns_group = self._owns_group and self.dist.enabled
        self.device = self.dist.device
        # a CPU (gloo) group for waiting on rank 0: long timeout, and no NCCL watchdog while the GPU ranks idle
        self._wait_group = dist.new_group(backend="gloo", timeout=RANK0_WAIT) if self.dist.enabled else None
        self._pool: TokenPool | None = None
        self._valsets: dict[str, ValidationSet] = {}

    # ---- ranks ------------------------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def main_only(self, fn: Callable[[], T]) -> T | None:
        """Run ``fn`` on rank 0 alone (the other ranks get None); a rank-0 failure is raised on every rank."""
        if not self.dist.enabled:
            return fn()
        import torch.distributed as dist

        out: T | None = None
        err: BaseException | None = None
        if self.is_main:
            try:
                out = fn()
            except BaseException as e:  # noqa: BLE001 - re-raised below after telling the other ranks
                err = e
        box: list[Any] = [None if err is None else f"{type(err).__name__}: {err}"]
        dist.broadcast_object_list(box, src=0, group=self._wait_group)
        if err is not None:
            raise err
        if box[0] is not None:
            raise LmselectError(f"rank 0 failed: {box[0]}")
        return out

    def main_first(self, fn: Callable[[], T]) -> T:
        """Idempotent single-process stage: rank 0 computes and writes, then every other rank runs ``fn`` and reads."""
        out = self.main_only(fn)
        return out if self.is_main else fn()  # type: ignore[return-value]

    def sync(self) -> None:
        """Barrier on the long-timeout wait group: every rank sees the artifacts written before it."""
        if self.dist.enabled:
            import torch.distributed as dist

            dist.barrier(group=self._wait_group)

    def close(self) -> None:
        """Leave the process group if this context joined it (clean torchrun shutdown)."""
        if self._owns_group:
            from lmselect.train.distributed import cleanup  # torch, as in __init__

            cleanup()
            self._owns_group = False

    # ---- shared inputs ----------------------------------------------------------------------------------------
    @property
    def pool(self) -> TokenPool:
        if self._pool is None:
            self._pool = TokenPool(self.layout.pool)
        return self._pool

    def _valset(self, key: str, path: str | None, kind: str) -> ValidationSet | None:
        from lmselect.data.valset import load_validation  # torch, as in __init__

        if path is None:
            return None
        if key not in self._valsets:
            v = self.recipe.validation
            self._valsets[key] = load_validation(path, self.pool.load_tokenizer(), kind=kind, seq_len=v.seq_len,
                                                 max_items=v.max_items)
        return self._valsets[key]

    @property
    def selection_set(self) -> ValidationSet:
        """The only validation data any method may look at (BLISS's v, MATES probes, RHO-1/BLADE references)."""
        v = self.recipe.validation
        out = self._valset("selection", v.selection, v.selection_kind)
        assert out is not None  # validated at recipe load
        return out

    def report_sets(self) -> dict[str, ValidationSet]:
        """Held-out report sets (only ever evaluated), by name: ``lambada`` (final word), ``clean`` (all tokens)."""
        v = self.recipe.validation
        out = {}
        for name, kind in (("lambada", "lambada"), ("clean", "text")):
            vs = self._valset(name, getattr(v, name), kind)
            if vs is not None:
                out[name] = vs
        return out

    def warmup_ids(self) -> np.ndarray:
        """The part of shard 0 the warm-up trains on (a seeded random ``warmup.fraction``); the rest of shard 0 is in
        no candidate shard and never trained on: MATES draws its held-out probes there."""
        return random_fraction(self.pool.ids(0), self.recipe.warmup.fraction,
                               seed=derived_seed(self.recipe.seed, stream=STREAM_WARMUP_DATA))

    # ---- training configs -------------------------------------------------------------------------------------
    def lr_scale(self, rnd: int) -> float:
        """Learning-rate factor of round ``rnd`` (``lr_per_round: halving`` = 0.5^r, the BLISS code's schedule)."""
        return 0.5**rnd if self.recipe.lr_per_round == "halving" else 1.0

    def train_cfg(self, steps: int, *, rnd: int = 0, seed: int = 0, preset: str | None = None,
                  warmup: bool = False, stream: int = STREAM_TRAIN) -> Any:
        """The recipe's training config for one stage. Only the warm-up warms the LR up; rounds continue the target's
        weights *and* AdamW moments with the schedule's steady LR (× ``lr_scale(rnd)``)."""
        r = self.recipe
        changes: dict[str, Any] = {
            "preset": preset or r.target.preset, "steps": int(steps),
            "seed": derived_seed(r.seed, seed, rnd, stream),
            "optim.lr": r.train.optim.lr * (1.0 if warmup else self.lr_scale(rnd)), "continue_optimizer": not warmup,
        }
        if not warmup:
            changes.update({"optim.warmup_steps": 0, "optim.schedule": "constant"})
        return replace(r.train, **changes)


@dataclass
class RoundContext:
    """One (method, method seed, round) of a run: what :meth:`SelectionMethod.select` works with."""

    run: RunContext
    method: str
    seed: int  # the method seed (0..n-1), not the run seed
    round: int  # 1..R; round r draws its candidates from pool shard r
    candidates: np.ndarray

    @property
    def recipe(self) -> Any:
        return self.run.recipe

    @property
    def pool(self) -> TokenPool:
        return self.run.pool

    @property
    def device(self) -> Any:
        return self.run.device

    @property
    def fraction(self) -> float:
        return float(self.recipe.select_fraction)

    @property
    def dir(self) -> Path:
        return self.run.layout.round(self.method, self.seed, self.round)

    def stage_dir(self, stage: str) -> Path:
        return self.dir / stage

    @property
    def seed_dir(self) -> Path:
        """``RUN/<method>/seed<k>``: artifacts kept once per method seed (e.g. a reference model)."""
        return self.run.layout.seed(self.method, self.seed)

    @property
    def prev_target(self) -> Path:
        """The target checkpoint this round starts from (the warm-up target in round 1)."""
        return self.run.layout.target(self.method, self.seed, self.round - 1)

    def prev_stage_dir(self, stage: str) -> Path | None:
        """The same stage of the previous round (None in round 1)."""
        return None if self.round == 1 else self.run.layout.stage(self.method, self.seed, self.round - 1, stage)

    def derived_seed(self, stream: int, per_round: bool = True) -> int:
        return derived_seed(self.recipe.seed, self.seed, self.round if per_round else 0, stream)

    @cached_property
    def selection_set(self) -> ValidationSet:
        return self.run.selection_set


@dataclass
class FlopContext:
    """What a FLOP estimate may use: the recipe, the pool's vocabulary and sequence length, and a round's shard size."""

    recipe: Any
    vocab: int
    seq_len: int
    shard_size: int

    def params(self, preset: str) -> float:
        """N of the 2N / 6N rules: non-embedding parameters plus the output projection."""
        return float(matmul_params(preset, self.vocab))

    @property
    def target_tokens_per_round(self) -> int:
        r = self.recipe
        return int(r.round_steps * r.train.global_batch * self.seq_len)
