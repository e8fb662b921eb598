"""Random token mask: the control of the token-level methods (RHO-1, BLADE).

Objective. Train on the whole shard, like RHO-1 and BLADE, with the loss averaged over a uniformly random
``keep_fraction`` of the global batch's next-token predictions::

    s_j ~ U(0, 1) i.i.d.,   L(θ) = 1 / (k% · N) · Σ_j I_{k%}(s_j) · CE_j(θ)      (RHO-1's SLM loss with random scores)

It goes through the same path as RHO-1 / BLADE (:mod:`lmselect.train.hooks`): the selector only scores tokens and
the training loop keeps the top ``keep_fraction`` of the scores over the **global** batch, so exactly the same
number of tokens is kept per step. A token-level method that does not beat this control is not selecting anything
a mask of the same size would not give: an independent replication at 370M parameters (edu-llm/edullm-p1,
experiments/token-selection; bits per byte, lower is better) measured full CE 1.6718, RHO-1 1.6824, a random 60 %
mask 1.6900 and BLADE 1.7090.

Determinism. The loop hands a selector micro-batches without their position in the global batch, and how the batch
is split over micro-batches and ranks must not change the mask. The score of token j of a row is therefore a
function of (seed, step, the row's tokens, j): a 64-bit key hashed from the seed, the step (``on_step_start``) and
the row's bytes seeds a generator that draws the row's L−1 uniforms. The same command gives the same masks; a
resumed run reproduces them (the step comes back with the checkpoint; ``state_dict`` holds the kept-token counters);
two identical rows in one step get identical scores (ties are broken by global position, as for any selector).
``keep_fraction`` defaults to RHO-1's and BLADE's (0.6) so that the pairs compare like with like.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from lmselect.config import check_fraction
from lmselect.context import STREAM_METHOD, FlopContext, RoundContext
from lmselect.select.base import SelectionMethod, register
from lmselect.train.hooks import TokenSelector


@dataclass
class RandomTokensConfig:
    keep_fraction: float = 0.6  # = rho1.keep_fraction / blade.keep_fraction defaults


class RandomTokenSelector(TokenSelector):
    """Seeded uniform token scores: the loop's global top-k keeps a random ``keep_fraction`` of the batch."""

    name = "random_tokens"
    reads_ce = False  # the mask is drawn from the tokens and the step alone: the loop needs no scoring forward

    def __init__(self, keep_fraction: float, seed: int):
        check_fraction(keep_fraction, "random_tokens.keep_fraction")
        self.keep_fraction = float(keep_fraction)
        self.seed = int(seed)
        self.step = 0
        self._kept = 0
        self._total = 0
        self._last = float("nan")

    def on_step_start(self, step: int, model: torch.nn.Module, next_batch: Callable[[], torch.Tensor]) -> None:
        self.step = int(step)

    def row_scores(self, row: np.ndarray) -> np.ndarray:
        """The L−1 uniforms of one token row at the current step."""
        h = hashlib.blake2b(digest_size=8)
        h.update(np.asarray([self.seed, self.step], dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(row, dtype=np.int64).tobytes())
        return np.random.default_rng(int.from_bytes(h.digest(), "little")).random(len(row) - 1)

    def token_scores(self, input_ids: torch.Tensor, token_ce: torch.Tensor) -> torch.Tensor:
        rows = input_ids.detach().cpu().numpy()
        s = np.stack([self.row_scores(r) for r in rows]) if len(rows) else np.zeros((0, rows.shape[1] - 1))
        return torch.from_numpy(s).to(device=token_ce.device, dtype=torch.float32)

    def on_mask(self, mask: torch.Tensor) -> None:
        k, n = int(mask.sum()), mask.numel()
        self._kept += k
        self._total += n
        self._last = k / max(n, 1)

    def stats(self) -> dict[str, Any]:
        return {"kept_fraction": self._last, "kept_fraction_total": self._kept / max(self._total, 1)}

    def state_dict(self) -> dict[str, Any]:
        return {"kept": self._kept, "total": self._total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._kept = int(state.get("kept", 0))
        self._total = int(state.get("total", 0))


@register
class RandomTokens(SelectionMethod):
    """The token-level control: the whole shard is fed and the loss keeps a seeded random ``keep_fraction`` of the
    global batch's tokens (the same path and fraction as RHO-1 and BLADE)."""

    name = "random_tokens"
    description = "token-level control: a seeded random token mask at RHO-1/BLADE's kept fraction"
    config_cls = RandomTokensConfig
    level = "token"
    stages = ("selection", "target", "eval")
    color = "#8c564b"
    level_control = True  # RHO-1 and BLADE are paired with it as well as with random

    def check_config(self) -> None:
        super().check_config()
        check_fraction(self.cfg.keep_fraction, "random_tokens.keep_fraction")

    def token_selector(self, ctx: RoundContext) -> TokenSelector:
        return RandomTokenSelector(self.cfg.keep_fraction, ctx.derived_seed(STREAM_METHOD))

    def selection_flops(self, f: FlopContext) -> float:
        return 0.0  # no model pass of its own (the loop's scoring forward is counted by the exposure ledger)
