"""Hooks through which token-level selection methods (RHO-1, BLADE) plug into the training loop.

The loop always feeds full sequences; a selector only decides which next-token predictions contribute to the loss.
METHODS §3–4 keep the top k % of the tokens *of the batch*, so the mask must not depend on how the global batch is
split into micro-batches or ranks. A selector therefore only *scores* tokens (per micro-batch, cheap); the loop takes
the top-k over the whole global batch. Per optimizer step the loop does, in order::

    selector.on_step_start(step, model, next_batch)          # BLADE: at episode starts, re-derive the reference
    for every micro-batch of every rank (no grad):           # the scoring pass
        s = selector.token_scores(input_ids, token_ce)       # [B, L-1]; token_ce is the target's CE (fp32)
    S = all-gather of s over ranks, in global-batch order    # [global_batch, L-1]
    M = topk_token_mask(S, selector.keep_fraction)           # ties broken by global position
    selector.on_mask(M)                                      # once per step (statistics)
    loss = Σ_j M_j · CE_j / Σ_j M_j  over the global batch   # the grad pass; = the one-process full-batch loss

``keep_fraction = None`` (the base class) is plain training: no scoring pass, every token counts. When one micro-batch
holds a rank's whole share of the step, the grad forward doubles as the scoring pass (no extra forward); a selector
that does not read the CE (``reads_ce = False``: the random mask) gets no scoring pass at all.

``next_batch()`` returns a fresh training micro-batch (LongTensor [B, L]) from the loop's own data stream without
disturbing the target's data order (it draws from a separate, seeded stream), for methods that need extra batches.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from lmselect.config import check_fraction


class TokenSelector:
    """Base class: keeps every token (plain training). Subclasses set ``keep_fraction`` and define ``token_scores``."""

    name = "all"
    keep_fraction: float | None = None  # fraction of the global batch's tokens kept; None = all (no scoring pass)
    #: False: token_scores ignores ``token_ce`` (a random mask), so the loop skips the scoring forward and passes
    #: zeros; the mask and the training are the same, and the step costs what plain training costs
    reads_ce: bool = True

    def setup(self, model: torch.nn.Module, device: torch.device) -> None:
        """Called once before the first step (and again after a resume)."""

    def on_step_start(self, step: int, model: torch.nn.Module, next_batch: Callable[[], torch.Tensor]) -> None:
        pass

    def token_scores(self, input_ids: torch.Tensor, token_ce: torch.Tensor) -> torch.Tensor:
        """Per-token scores [B, L-1] of one micro-batch (higher = more worth training on), from the detached CE."""
        raise NotImplementedError(f"{type(self).__name__} sets keep_fraction but defines no token_scores")

    def on_mask(self, mask: torch.Tensor) -> None:
        """The step's keep mask over the batch the top-k ran over ([global_batch, L-1]; a worker's slice under LoRDO)."""

    def keep_mask(self, input_ids: torch.Tensor, token_ce: torch.Tensor) -> torch.Tensor:
        """Top-k mask of this one batch on its own (for callers outside the loop; the loop uses the global batch)."""
        if self.keep_fraction is None:
            return torch.ones_like(token_ce, dtype=torch.bool)
        mask = topk_token_mask(self.token_scores(input_ids, token_ce), self.keep_fraction)
        self.on_mask(mask)
        return mask

    def stats(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def runs_scoring_forward(selector: TokenSelector, accum: int) -> bool:
    """Whether each step runs the no-grad scoring forward: a selector that keeps a fraction and reads the CE, with
    more than one micro-batch per rank (with one, the grad forward doubles as it). The loop follows this rule and
    records it in the checkpoint (``extra.scoring_forward``), from which the exposure ledger counts the FLOPs."""
    return selector.keep_fraction is not None and selector.reads_ce and accum > 1


def topk_token_mask(score: torch.Tensor, fraction: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the top ``fraction`` of entries of ``score`` (over the whole tensor = the batch).

    k = max(1, round(fraction · n_valid)) (round half to even, Python's ``round``). Ties are broken by position
    (lower flat index first) so the result is deterministic and equals a brute-force stable sort.
    """
    check_fraction(fraction, "token fraction")
    flat = score.reshape(-1).float()
    if valid is not None:
        v = valid.reshape(-1)
        flat = torch.where(v, flat, torch.full_like(flat, float("-inf")))
        n = int(v.sum())
    else:
        n = flat.numel()
    k = max(1, int(round(fraction * n))) if n > 0 else 0
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        # stable descending sort: equal scores keep positional order
        order = torch.sort(flat, descending=True, stable=True).indices[:k]
        mask[order] = True
    return mask.view(score.shape)
