"""Token-level losses shared by training, selection methods and evaluation.

Convention: for ``input_ids`` [B, L] the model predicts tokens 1..L-1, so per-token quantities are [B, L-1] and
position t scores token t+1. Masks use the same [B, L-1] layout.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half / bf16 to float32 for the loss; float64 stays float64 (oracle checks in double precision)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def token_ce(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Per-token next-token cross-entropy [B, L-1] (float32 accumulation even for bf16 logits)."""
    logits = _at_least_fp32(logits[:, :-1])
    targets = input_ids[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    return ce.view(targets.shape)


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over ``mask`` (all positions when None); dim=None -> scalar, dim=1 -> per sequence."""
    if mask is None:
        return x.mean() if dim is None else x.mean(dim=dim)
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp_min(1)
    return (x * m).sum(dim=dim) / m.sum(dim=dim).clamp_min(1)


def sequence_ce(model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """CE_i: mean next-token cross-entropy of each sequence [B] (over ``mask`` positions when given)."""
    logits = model(input_ids=input_ids).logits
    return masked_mean(token_ce(logits, input_ids), mask, dim=1)


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) summed over the vocabulary, averaged over positions: Σ_v q (log q − log p).

    The teacher is the frozen target (METHODS §1.1): gradients flow only into the student.
    """
    q_log = F.log_softmax(_at_least_fp32(teacher_logits), dim=-1)
    p_log = F.log_softmax(_at_least_fp32(student_logits), dim=-1)
    kl = (q_log.exp() * (q_log - p_log)).sum(-1)
    return masked_mean(kl, mask)


def mean_token_ce(model: torch.nn.Module, pool: Any, ids: Any, batch_size: int, device: Any = None) -> Any:
    """Mean next-token CE of every pool row ``ids`` (packed rows: every position counts), no grad, eval mode; a
    float32 numpy array. The "proxy loss" of the selection diagnostics, the ``reference`` method and benches."""
    import numpy as np

    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(ids), batch_size):
            x = pool.batch(ids[i : i + batch_size])
            x = x.to(device) if device is not None else x
            out.append(token_ce(model(input_ids=x).logits, x).mean(dim=1).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
