"""``bliss.profile: paper`` against the released BLISS loop (METHODS §1.2).

The reference is ``released_bliss.released_outer_steps``: our per-sample transcription of the authors' ``train()``
(bilevel_selection.py at 420da66) on one process, causal, float64. lmselect's :class:`BilevelSolver` with
``profile: paper`` must equal it to 1e-10 (relative L2) in z, the c_i, the hypergradient (before the clip) and both
models' updates (state after − state before) over two outer steps, on both hypergradient paths. Batches come from
lmselect's own stream (``step_batches``), so the released two-cursor batch pattern is checked through the same
indexing a round uses; the oracle gets the stream's batches in stream order and the validation batches lmselect drew.

Cases: the scripts/run.sh settings at K = 1 (warm-up on: the first outer step moves nothing), lr 1e-3 without
warm-up at K = 1 (both models move in both steps) and at K = 2 (the outer batch is not an inner batch). The default
profile must differ from the released loop (so the comparison can fail).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from released_bliss import RUN_SH_ARGS, released_head_init_, released_outer_steps, score_parameters

from lmselect.data.valset import ValidationSet
from lmselect.models.presets import Preset, build_model
from lmselect.select.bliss import (
    BilevelSolver,
    BlissConfig,
    init_score_model,
    resolve_profile,
    step_batches,
    train_batch_indices,
    train_stream,
)

VOCAB, L, B, N = 96, 16, 4, 32
TINY = Preset("oracle-tiny", "gpt_neox", 32, 2, 4, 64, max_position_embeddings=64)
TOL = 1e-10

FAST = {**RUN_SH_ARGS, "learning_rate": 1e-3, "learning_rate_influence": 1e-3, "max_steps": 30, "warmup": False}
CASES = {
    "run_sh_k1": {**RUN_SH_ARGS, "inner_steps": 1},  # γ 1e-2, λ 1e-7, lr 1e-5, warm-up over 600 of 6000 steps
    "fast_k1": {**FAST, "inner_steps": 1},
    "fast_k2": {**FAST, "inner_steps": 2},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny float64 models gain nothing from a second thread, and on a busy 2-core box two threads run them ~10x
    slower than one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class _Pool:
    """The part of a TokenPool the stream reads: ``batch(rows)``."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def batch(self, rows: np.ndarray) -> torch.Tensor:
        return self.ids[torch.as_tensor(np.asarray(rows))]


def _models():
    proxy = build_model(TINY, VOCAB, seed=0).to(torch.float64)
    target = build_model(TINY, VOCAB, seed=1).to(torch.float64)
    scorer = init_score_model(proxy, seed=2, head_init="torch_default")
    return proxy, target, scorer


def _data():
    ids = torch.randint(0, VOCAB, (N, L), generator=torch.Generator().manual_seed(3))
    vids = torch.randint(0, VOCAB, (8, L), generator=torch.Generator().manual_seed(4))
    vmask = torch.zeros(8, L - 1, dtype=torch.bool)
    vmask[:, -3:] = True  # a 3-token final word
    return _Pool(ids), ValidationSet(vids, vmask, "lambada", "tiny")


def _config(a: dict[str, Any], **kw) -> BlissConfig:
    """lmselect's config for the released args ``a`` (profile paper unless ``kw`` says otherwise)."""
    base = dict(profile="paper", batch_size=B, val_batch_size=4, micro_batch=None, dtype="float64",
                outer_steps=a["max_steps"] * a["epochs"], inner_steps=a["inner_steps"], gamma=a["gamma"], lam=a["reg"],
                z_steps=a["z_loops"], z_lr=a["lr_z"], z_damping=a["lamb"], z_clip=a["grad_clip"],
                proxy_lr=a["learning_rate"], score_lr=a["learning_rate_influence"], weight_decay=a["weight_decay"],
                betas=(a["beta1"], a["beta2"]), proxy_clip=a["grad_clip"], score_clip=a["grad_clip"],
                warmup_ratio=0.1 if a["warmup"] else 0.0, log_every=10**9, diag_every=0, seed=0)
    base.update(kw)
    return BlissConfig(**base)


def _run_lmselect(cfg: BlissConfig, models, pool: _Pool, valset: ValidationSet, n_steps: int) -> list[dict]:
    proxy, target, scorer = (copy.deepcopy(m) for m in models)
    solver = BilevelSolver(cfg, proxy, target, scorer, valset)
    stream = train_stream(solver.cfg, N)
    train_ids = np.arange(N)
    out = []
    for _ in range(n_steps):
        val = solver.next_val_batch()  # the batch outer_step is about to draw (a pure function of the step)
        solver.outer_step(step_batches(pool, train_ids, stream, solver.cfg, solver.step))
        h = solver.last
        out.append(dict(z=h.z, c=h.c, hypergrad=h.grads, val=(val[0], val[1]), score_names=solver.s_names,
                        proxy_state={k: v.detach().clone() for k, v in solver.proxy.state_dict().items()},
                        score_state={k: v.detach().clone() for k, v in solver.scorer.state_dict().items()}))
    return out


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in (ts.values() if isinstance(ts, dict) else ts)])


def _rel(got, want) -> float:
    a, b = _flat(got), _flat(want)
    d, n = float((a - b).norm()), float(b.norm())
    return d / n if n > 0 else (0.0 if d == 0 else float("inf"))


def _update(after: dict, before: dict) -> dict:
    return {k: after[k].double() - before[k].double() for k in before if before[k].is_floating_point()}


def _errors(ref: list[dict], got: list[dict], p0: dict, s0: dict) -> list[dict[str, float]]:
    rows = []
    for t, (r, g) in enumerate(zip(ref, got)):
        rp, rs = (p0, s0) if t == 0 else (ref[t - 1]["proxy_state"], ref[t - 1]["score_state"])
        gp, gs = (p0, s0) if t == 0 else (got[t - 1]["proxy_state"], got[t - 1]["score_state"])
        rows.append({"z": _rel(g["z"], r["z"]), "c": _rel([g["c"]], [r["c"]]), "hypergrad": _rel(g["hypergrad"], r["hypergrad"]),
                     "proxy_update": _rel(_update(g["proxy_state"], gp), _update(r["proxy_state"], rp)),
                     "score_update": _rel(_update(g["score_state"], gs), _update(r["score_state"], rs))})
    return rows


def _oracle(models, pool: _Pool, cfg: BlissConfig, a: dict, vals: list, n_steps: int) -> list[dict]:
    """The released loop on the stream's batches in stream order (batch k = ``IndexStream.batch(k)``)."""
    stream = train_stream(resolve_profile(cfg), N)
    n_batches = max(n_steps, n_steps * a["inner_steps"])
    batches = [pool.batch(stream.batch(k)) for k in range(n_batches)]
    proxy, target, scorer = models
    return released_outer_steps(proxy, scorer, target, batches, vals, a, n_steps)


@pytest.mark.parametrize("case,impls", [("run_sh_k1", ("per_sample", "batched")),
                                        ("fast_k1", ("per_sample", "batched", "double_backward")),
                                        ("fast_k2", ("per_sample", "batched"))])
def test_paper_profile_equals_the_released_loop(case, impls):
    a = CASES[case]
    models, (pool, valset) = _models(), _data()
    p0 = {k: v.clone() for k, v in models[0].state_dict().items()}
    s0 = {k: v.clone() for k, v in models[2].state_dict().items()}
    ref = None
    for impl in impls:
        kw = {"hypergrad_impl": "batched", "batched_dots": "double_backward"} if impl == "double_backward" else \
            {"hypergrad_impl": impl}
        cfg = _config(a, **kw)
        got = _run_lmselect(cfg, models, pool, valset, 2)
        if ref is None:
            ref = _oracle(models, pool, cfg, a, [g["val"] for g in got], 2)
            # the case does what it is meant to: the stale normaliser is live at step 2, the run.sh warm-up's first
            # step moves nothing, and the fast cases move both models in both steps
            assert abs(float(ref[1]["inner_weights"][0].sum()) - 1.0) > 1e-9
            moved = _flat(_update(ref[0]["proxy_state"], p0)).norm()
            assert (float(moved) == 0.0) == (case == "run_sh_k1")
        assert got[0]["score_names"] == ref[0]["score_names"] == [n for n, _ in score_parameters(models[2])]
        errs = _errors(ref, got, p0, s0)
        for t, row in enumerate(errs):
            for k, e in row.items():
                assert e <= TOL, (case, impl, t, k, e, errs)


def test_released_batch_pattern_indices():
    """The released cursors (bilevel_selection.py:392-403): inner t·K + k, outer t; fresh: consecutive."""
    for k in (1, 2, 5):
        cfg = resolve_profile(BlissConfig(profile="paper", inner_steps=k))
        assert [train_batch_indices(cfg, t) for t in range(3)] == [
            [t * k + i for i in range(k)] + [t] for t in range(3)]
    fresh = resolve_profile(BlissConfig(profile="paper", inner_steps=2, outer_batch="fresh"))
    assert [train_batch_indices(fresh, t) for t in range(2)] == [[0, 1, 2], [3, 4, 5]]
    # hyper batches (not in the released code) continue the outer cursor
    hyper = resolve_profile(BlissConfig(profile="paper", inner_steps=1, hyper_batches=2))
    assert [train_batch_indices(hyper, t) for t in range(2)] == [[0, 0, 1, 2], [1, 3, 4, 5]]


def test_torch_default_head_is_the_released_one():
    proxy = build_model(TINY, VOCAB, seed=0).to(torch.float64)
    ours = init_score_model(proxy, seed=7, head_init="torch_default")
    ref = copy.deepcopy(ours)
    released_head_init_(ref, torch.Generator().manual_seed(7))  # the oracle's restatement of nn.Linear's default
    assert torch.equal(ours.head.weight, ref.head.weight) and torch.equal(ours.head.bias, ref.head.bias)
    bound = 1 / 32**0.5
    assert float(ours.head.bias.detach().abs()) > 0 and float(ours.head.weight.detach().abs().max()) <= bound
    normal = init_score_model(proxy, seed=7)
    assert float(normal.head.bias.detach().abs()) == 0.0 and float(normal.head.weight.detach().std()) < 0.05


def test_default_profile_differs_from_the_released_loop():
    """The comparison can fail: lmselect's own choices (z from 0, step clip, fresh outer batch, (s+1)/W warm-up, …)
    give a different solve on the same models and stream."""
    a = CASES["fast_k1"]
    models, (pool, valset) = _models(), _data()
    cfg = _config(a, profile="default", objective="final_word", c_normalize=False, hyper_batches=0, z_steps=3,
                  hypergrad_impl="batched")
    got = _run_lmselect(cfg, models, pool, valset, 1)
    ref = _oracle(models, pool, _config(a), a, [got[0]["val"]], 1)
    errs = _errors(ref, got, {k: v.clone() for k, v in models[0].state_dict().items()},
                   {k: v.clone() for k, v in models[2].state_dict().items()})[0]
    assert errs["z"] > 1e-2 and errs["c"] > 1e-2 and errs["hypergrad"] > 1e-2, errs


def test_paper_profile_resumes_exactly():
    """A solve stopped after one outer step and resumed from the solver state (the stale normaliser, the released
    schedule, the fp32 z init of later steps, the stream position) takes the same second step as an uninterrupted
    one."""
    a = CASES["fast_k2"]
    models, (pool, valset) = _models(), _data()
    cfg = _config(a, hypergrad_impl="batched")
    whole = _run_lmselect(cfg, models, pool, valset, 2)
    first = BilevelSolver(cfg, *(copy.deepcopy(m) for m in models), valset)
    stream, train_ids = train_stream(first.cfg, N), np.arange(N)
    first.outer_step(step_batches(pool, train_ids, stream, first.cfg, 0))
    state = copy.deepcopy(first.state_dict())
    assert state["norm_prev"] is not None
    resumed = BilevelSolver(cfg, *(copy.deepcopy(m) for m in _models()), valset)
    resumed.load_state_dict(state)
    resumed.outer_step(step_batches(pool, train_ids, stream, resumed.cfg, resumed.step))
    assert torch.equal(_flat(resumed.last.z), _flat(whole[1]["z"])) and torch.equal(resumed.last.c, whole[1]["c"])
    assert torch.equal(_flat(resumed.last.grads), _flat(whole[1]["hypergrad"]))
    assert all(torch.equal(resumed.proxy.state_dict()[k], v) for k, v in whole[1]["proxy_state"].items())


def test_released_schedule_is_transformers_cosine_with_warmup():
    """``schedule: released`` = transformers' get_cosine_schedule_with_warmup with the unrounded warm-up
    ratio·outer_steps (bilevel_selection.py:359-368), step 0 at multiplier 0; lmselect's own starts at 1/W."""
    from transformers import get_cosine_schedule_with_warmup

    from lmselect.train.schedules import warmup_cosine

    for ratio, total in ((0.1, 6000), (0.0, 30), (0.1, 25), (0.05, 7)):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        hf = get_cosine_schedule_with_warmup(opt, num_warmup_steps=ratio * total, num_training_steps=total).lr_lambdas[0]
        ours = warmup_cosine(total, ratio, released=True)
        for s in sorted({0, 1, 2, 3, int(ratio * total), int(ratio * total) + 1, total // 2, total - 1}):
            assert ours(s) == pytest.approx(hf(s), abs=1e-15), (ratio, total, s)
    assert warmup_cosine(6000, 0.1, released=True)(0) == 0.0 and warmup_cosine(6000, 0.1)(0) == 1 / 600
