"""Hooks through which token-level selection methods (RHO-1, BLADE) plug into the training loop.

The loop always feeds full sequences; a selector only decides which next-token predictions contribute to the loss.
Per step the loop calls, in order::

    selector.on_step_start(step, model, next_batch)      # BLADE: at episode starts, re-derive the reference
    mask = selector.keep_mask(input_ids, token_ce)       # per micro-batch; token_ce is the target's detached CE
    loss = (token_ce_with_grad * mask).sum() / mask.sum()

``next_batch()`` returns a fresh training micro-batch (LongTensor [B, L]) from the loop's own data stream without
disturbing the target's data order (it draws from a separate, seeded stream), for methods that need extra batches.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


class TokenSelector:
    """Base class: keeps every token (plain training)."""

    name = "all"

    def setup(self, model: torch.nn.Module, device: torch.device) -> None:
        """Called once before the first step (and again after a resume)."""

    def on_step_start(self, step: int, model: torch.nn.Module, next_batch: Callable[[], torch.Tensor]) -> None:
        pass

    def keep_mask(self, input_ids: torch.Tensor, token_ce: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(token_ce, dtype=torch.bool)

    def stats(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def topk_token_mask(score: torch.Tensor, fraction: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the top ``fraction`` of entries of ``score`` (over the whole tensor = the batch).

    k = max(1, round(fraction · n_valid)) (round half to even, Python's ``round``). Ties are broken by position
    (lower flat index first) so the result is deterministic and equals a brute-force stable sort.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"token fraction must be in (0, 1], got {fraction}")
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
