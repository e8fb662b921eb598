"""Harness around the released-BLISS oracle: run lmselect's solver and the oracle (``released_bliss``) on the same
models, batches and validation batches, and measure how far apart they are.

Used by the oracle test (``test_bliss_released.py``: ``profile: paper`` must equal the released loop to 1e-10) and by
``bench/bliss_released_diff.py`` (how far each of lmselect's own choices moves a solve away from the released one).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from released_bliss import RUN_SH_ARGS, released_outer_steps

from lmselect.data.valset import ValidationSet
from lmselect.models.presets import Preset, build_model
from lmselect.select.bliss import (
    BilevelSolver,
    BlissConfig,
    init_score_model,
    resolve_profile,
    step_batches,
    train_stream,
)

VOCAB, L, B, N = 96, 16, 4, 32
TINY = Preset("oracle-tiny", "gpt_neox", 32, 2, 4, 64, max_position_embeddings=64)

FAST = {**RUN_SH_ARGS, "learning_rate": 1e-3, "learning_rate_influence": 1e-3, "max_steps": 30, "warmup": False}
CASES: dict[str, dict[str, Any]] = {
    "run_sh_k1": {**RUN_SH_ARGS, "inner_steps": 1},  # γ 1e-2, λ 1e-7, lr 1e-5, warm-up over 600 of 6000 steps
    "fast_k1": {**FAST, "inner_steps": 1},
    "fast_k2": {**FAST, "inner_steps": 2},
}


class ArrayPool:
    """The part of a TokenPool the stream reads: ``batch(rows)``."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def batch(self, rows: np.ndarray) -> torch.Tensor:
        return self.ids[torch.as_tensor(np.asarray(rows))]


def tiny_models(head_init: str = "torch_default") -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """(proxy, KL teacher, score model) of the tiny float64 GPT-NeoX; the head as the released code gets it unless
    ``head_init`` says otherwise (same seed)."""
    proxy = build_model(TINY, VOCAB, seed=0).to(torch.float64)
    target = build_model(TINY, VOCAB, seed=1).to(torch.float64)
    scorer = init_score_model(proxy, seed=2, head_init=head_init)
    return proxy, target, scorer


def tiny_data() -> tuple[ArrayPool, ValidationSet]:
    ids = torch.randint(0, VOCAB, (N, L), generator=torch.Generator().manual_seed(3))
    vids = torch.randint(0, VOCAB, (8, L), generator=torch.Generator().manual_seed(4))
    vmask = torch.zeros(8, L - 1, dtype=torch.bool)
    vmask[:, -3:] = True  # a 3-token final word
    return ArrayPool(ids), ValidationSet(vids, vmask, "lambada", "tiny")


def config_for(a: dict[str, Any], batch_size: int = B, **kw) -> BlissConfig:
    """lmselect's config for the released args ``a`` (profile paper unless ``kw`` says otherwise)."""
    base = dict(profile="paper", batch_size=batch_size, val_batch_size=4, micro_batch=None, dtype="float64",
                outer_steps=a["max_steps"] * a["epochs"], inner_steps=a["inner_steps"], gamma=a["gamma"], lam=a["reg"],
                z_steps=a["z_loops"], z_lr=a["lr_z"], z_damping=a["lamb"], z_clip=a["grad_clip"],
                proxy_lr=a["learning_rate"], score_lr=a["learning_rate_influence"], weight_decay=a["weight_decay"],
                betas=(a["beta1"], a["beta2"]), proxy_clip=a["grad_clip"], score_clip=a["grad_clip"],
                warmup_ratio=0.1 if a["warmup"] else 0.0, log_every=10**9, diag_every=0, seed=0)
    base.update(kw)
    return BlissConfig(**base)


def run_lmselect(cfg: BlissConfig, models, pool: Any, valset: ValidationSet, n_steps: int,
                 train_ids: np.ndarray | None = None) -> list[dict]:
    """``n_steps`` outer steps of lmselect's :class:`BilevelSolver` on copies of ``models`` = (proxy, teacher,
    scorer), reading ``pool`` rows ``train_ids`` (default: all ``N``) through the round's stream."""
    proxy, target, scorer = (copy.deepcopy(m) for m in models)
    solver = BilevelSolver(cfg, proxy, target, scorer, valset)
    train_ids = np.arange(N) if train_ids is None else train_ids
    stream = train_stream(solver.cfg, len(train_ids))
    out = []
    for _ in range(n_steps):
        val = solver.next_val_batch()  # the batch outer_step is about to draw (a pure function of the step)
        solver.outer_step(step_batches(pool, train_ids, stream, solver.cfg, solver.step))
        h = solver.last
        out.append(dict(z=h.z, c=h.c, hypergrad=h.grads, val=(val[0], val[1]), score_names=solver.s_names,
                        proxy_state={k: v.detach().clone() for k, v in solver.proxy.state_dict().items()},
                        score_state={k: v.detach().clone() for k, v in solver.scorer.state_dict().items()}))
    return out


def run_released(models, pool: Any, cfg: BlissConfig, a: dict, vals: list, n_steps: int,
                 train_ids: np.ndarray | None = None) -> list[dict]:
    """The released loop on the stream's batches in stream order (batch k = ``IndexStream.batch(k)``)."""
    train_ids = np.arange(N) if train_ids is None else train_ids
    stream = train_stream(resolve_profile(cfg), len(train_ids))
    n_batches = max(n_steps, n_steps * a["inner_steps"])
    batches = [pool.batch(train_ids[stream.batch(k)]) for k in range(n_batches)]
    proxy, target, scorer = models
    return released_outer_steps(proxy, scorer, target, batches, vals, a, n_steps)


def flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in (ts.values() if isinstance(ts, dict) else ts)])


def rel(got, want) -> float:
    """Relative L2 distance ‖got − want‖ / ‖want‖ over all tensors."""
    a, b = flat(got), flat(want)
    d, n = float((a - b).norm()), float(b.norm())
    return d / n if n > 0 else (0.0 if d == 0 else float("inf"))


def sign_agreement(got, want, floor: float = 1e-6) -> float:
    """Share of the coordinates of ``want`` above ``floor``·max|want| (below that a sign is round-off) where ``got``
    has the same sign."""
    a, b = flat(got), flat(want)
    nz = b.abs() > floor * b.abs().max()
    return float((torch.sign(a[nz]) == torch.sign(b[nz])).double().mean()) if bool(nz.any()) else 1.0


def update(after: dict, before: dict) -> dict:
    return {k: after[k].double() - before[k].double() for k in before if before[k].is_floating_point()}


def errors(ref: list[dict], got: list[dict], p0: dict, s0: dict) -> list[dict[str, float]]:
    """Per outer step: relative distance of lmselect's z, c, hypergradient and both models' updates from the
    released loop's (``ref``), and the share of hypergradient signs that agree."""
    rows = []
    for t, (r, g) in enumerate(zip(ref, got)):
        rp, rs = (p0, s0) if t == 0 else (ref[t - 1]["proxy_state"], ref[t - 1]["score_state"])
        gp, gs = (p0, s0) if t == 0 else (got[t - 1]["proxy_state"], got[t - 1]["score_state"])
        rows.append({"z": rel(g["z"], r["z"]), "c": rel([g["c"]], [r["c"]]), "hypergrad": rel(g["hypergrad"], r["hypergrad"]),
                     "proxy_update": rel(update(g["proxy_state"], gp), update(r["proxy_state"], rp)),
                     "score_update": rel(update(g["score_state"], gs), update(r["score_state"], rs)),
                     "hypergrad_signs": sign_agreement(g["hypergrad"], r["hypergrad"])})
    return rows


def states(models) -> tuple[dict, dict]:
    """Copies of the proxy's and the score model's starting states (for the update comparisons)."""
    return ({k: v.clone() for k, v in models[0].state_dict().items()},
            {k: v.clone() for k, v in models[2].state_dict().items()})
