"""Optimizer config, AdamW parameter groups and learning-rate schedules.

The learning rate is a pure function of the step (``lr_at``); the loop sets it on every param group before each
optimizer step, nanoGPT style. So a schedule has no state of its own and resumes exactly from the step counter.

Schedules (``warmup_steps`` of linear warm-up first in all of them; step s is 0-based, warm-up multiplier (s+1)/W):

* ``constant``: then the base LR (MATES: constant 1e-3 after a 2k-step warm-up).
* ``cosine``: cosine from the base LR to ``min_lr_ratio``·LR, reached exactly at the last step.
* ``wsd``: warm-up, stable, then the last ``decay_steps`` steps decay. Linearly to ``min_lr_ratio``·LR (reached at the
  last step), or, with ``decay_halving_every = N``, stepwise: LR·0.5^(t // N) for the t-th decay step. The evaluation
  branch of METHODS §1.3e is ``wsd`` with ``decay_steps = steps = 200``, ``decay_halving_every = 50``, no warm-up.

:func:`warmup_cosine` is a separate, ``LambdaLR``-style multiplier (the BLISS solver's two optimizers): warm-up over
a *fraction* of the steps, then cosine to 0 *one step after* the last (span total − W, not ``lr_at``'s total − 1 − W,
and no floor). It is kept apart from ``lr_at`` on purpose: folding it in would change BLISS's learning rates.
:func:`adamw` builds an AdamW over a plain parameter list with :func:`param_groups`' decay grouping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Literal

import torch

from lmselect.artifacts import LmselectError


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1  # applied to matrices (Linear / Embedding weights) only, never biases or norm scales
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    schedule: Literal["constant", "cosine", "wsd"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine / linear-wsd floor, as a fraction of lr
    decay_steps: int = 0  # wsd: length of the final decay phase
    decay_halving_every: int = 0  # wsd: > 0 -> halve the LR every N decay steps instead of decaying linearly


def validate_schedule(cfg: OptimConfig, total_steps: int) -> None:
    """One-line errors for schedules that cannot run ``total_steps`` steps."""
    if cfg.lr <= 0:
        raise LmselectError(f"optim.lr must be > 0, got {cfg.lr}")
    if cfg.warmup_steps < 0 or cfg.decay_steps < 0 or cfg.decay_halving_every < 0:
        raise LmselectError("optim.warmup_steps, optim.decay_steps and optim.decay_halving_every must be >= 0")
    if cfg.schedule == "wsd":
        if cfg.decay_steps <= 0:
            raise LmselectError("optim.schedule 'wsd' needs optim.decay_steps > 0")
        if cfg.warmup_steps + cfg.decay_steps > total_steps:
            raise LmselectError(
                f"optim.warmup_steps ({cfg.warmup_steps}) + optim.decay_steps ({cfg.decay_steps}) exceed the "
                f"{total_steps} training steps"
            )


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate for 0-based optimizer ``step`` of a run of ``total_steps`` steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        span = max(1, total_steps - 1 - cfg.warmup_steps)  # so the last step lands exactly on the floor
        p = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * p))
    if cfg.schedule == "wsd":
        decay_start = total_steps - cfg.decay_steps
        if step < decay_start:
            return cfg.lr
        t = step - decay_start
        if cfg.decay_halving_every > 0:
            return cfg.lr * 0.5 ** (t // cfg.decay_halving_every)
        return cfg.lr - (cfg.lr - floor) * min(1.0, (t + 1) / cfg.decay_steps)
    raise LmselectError(f"unknown optim.schedule '{cfg.schedule}' (constant, cosine, wsd)")


def param_groups(params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices decay; biases and norm scales (all < 2-D tensors) do not."""
    decay, no_decay = [], []
    for _, p in params:
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def adamw(
    params: Iterable[torch.nn.Parameter], lr: float, betas: tuple[float, float], weight_decay: float, *,
    eps: float = 1e-8, fused: bool | None = None, decay_1d: bool = False,
) -> torch.optim.AdamW:
    """AdamW over ``params`` (those with ``requires_grad``) in :func:`param_groups`' two groups: matrices decay by
    ``weight_decay``, biases and norm scales not; ``decay_1d``: one group that decays every tensor (the released
    BLISS code's optimizers, bilevel_selection.py:272-289)."""
    if decay_1d:
        groups = [{"params": [p for p in params if p.requires_grad], "weight_decay": weight_decay}]
    else:
        groups = param_groups(((str(i), p) for i, p in enumerate(params)), weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=fused)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over ``model`` with the grouping above; the fused CUDA kernel when the parameters live on a GPU."""
    on_cuda = any(p.is_cuda for p in model.parameters() if p.requires_grad)
    return adamw(model.parameters(), cfg.lr, cfg.betas, cfg.weight_decay, eps=cfg.eps, fused=on_cuda or None)


def warmup_cosine(total: int, warmup_ratio: float, released: bool = False) -> Callable[[int], float]:
    """LR multiplier of optimizer step s (0-based) for ``torch.optim.lr_scheduler.LambdaLR``: (s+1)/W during a
    warm-up of W = round(warmup_ratio · total) steps (at least 1 when warmup_ratio > 0), then cosine from 1 towards 0,
    reaching 0 at s = total (one step after the last).

    ``released``: transformers' ``get_cosine_schedule_with_warmup`` with the unrounded warm-up W = warmup_ratio·total
    of the released BLISS code (bilevel_selection.py:359-368, 657-660): s/max(1, W) while s < W, so step 0 runs at
    LR 0, then max(0, ½(1 + cos(π·(s − W)/max(1, total − W))))."""
    if released:
        warm_f, total_f = float(warmup_ratio) * int(total), int(total)

        def released_fn(s: int) -> float:
            if s < warm_f:
                return float(s) / max(1.0, warm_f)
            progress = float(s - warm_f) / max(1.0, total_f - warm_f)
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

        return released_fn
    total = max(1, int(total))
    warm = max(1, int(round(warmup_ratio * total))) if warmup_ratio > 0 else 0

    def fn(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (s - warm) / max(1, total - warm))))

    return fn


def apply_hparams(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> None:
    """Re-impose this run's betas / eps / decay after loading another run's optimizer state (continued pretraining)."""
    for i, g in enumerate(optimizer.param_groups):
        g["betas"] = tuple(cfg.betas)
        g["eps"] = cfg.eps
        g["weight_decay"] = cfg.weight_decay if i == 0 else 0.0
