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

import numpy as np
import pytest
import torch
from released_bliss import released_head_init_, score_parameters
from released_harness import (
    CASES,
    TINY,
    VOCAB,
    errors,
    flat,
    run_lmselect,
    run_released,
    states,
    tiny_data,
    tiny_models,
    update,
)
from released_harness import config_for as _config

from lmselect.models.presets import build_model
from lmselect.select.bliss import (
    BilevelSolver,
    BlissConfig,
    init_score_model,
    resolve_profile,
    step_batches,
    train_batch_indices,
    train_stream,
)

N = 32
TOL = 1e-10


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny float64 models gain nothing from a second thread, and on a busy 2-core box two threads run them ~10x
    slower than one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("case,impls", [("run_sh_k1", ("per_sample", "batched")),
                                        ("fast_k1", ("per_sample", "batched", "double_backward")),
                                        ("fast_k2", ("per_sample", "batched"))])
def test_paper_profile_equals_the_released_loop(case, impls):
    a = CASES[case]
    models, (pool, valset) = tiny_models(), tiny_data()
    p0, s0 = states(models)
    ref = None
    for impl in impls:
        kw = {"hypergrad_impl": "batched", "batched_dots": "double_backward"} if impl == "double_backward" else \
            {"hypergrad_impl": impl}
        cfg = _config(a, **kw)
        got = run_lmselect(cfg, models, pool, valset, 2)
        if ref is None:
            ref = run_released(models, pool, cfg, a, [g["val"] for g in got], 2)
            # the case does what it is meant to: the stale normaliser is live at step 2, the run.sh warm-up's first
            # step moves nothing, and the fast cases move both models in both steps
            assert abs(float(ref[1]["inner_weights"][0].sum()) - 1.0) > 1e-9
            moved = flat(update(ref[0]["proxy_state"], p0)).norm()
            assert (float(moved) == 0.0) == (case == "run_sh_k1")
        assert got[0]["score_names"] == ref[0]["score_names"] == [n for n, _ in score_parameters(models[2])]
        errs = errors(ref, got, p0, s0)
        for t, row in enumerate(errs):
            for k, e in row.items():
                assert e == 1.0 if k == "hypergrad_signs" else e <= TOL, (case, impl, t, k, e, errs)


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
    models, (pool, valset) = tiny_models(), tiny_data()
    cfg = _config(a, profile="default", objective="final_word", c_normalize=False, hyper_batches=0, z_steps=3,
                  hypergrad_impl="batched")
    got = run_lmselect(cfg, models, pool, valset, 1)
    ref = run_released(models, pool, _config(a), a, [got[0]["val"]], 1)
    errs = errors(ref, got, *states(models))[0]
    assert errs["z"] > 1e-2 and errs["c"] > 1e-2 and errs["hypergrad"] > 1e-2, errs


def test_paper_profile_resumes_exactly():
    """A solve stopped after one outer step and resumed from the solver state (the stale normaliser, the released
    schedule, the fp32 z init of later steps, the stream position) takes the same second step as an uninterrupted
    one."""
    a = CASES["fast_k2"]
    models, (pool, valset) = tiny_models(), tiny_data()
    cfg = _config(a, hypergrad_impl="batched")
    whole = run_lmselect(cfg, models, pool, valset, 2)
    first = BilevelSolver(cfg, *(copy.deepcopy(m) for m in models), valset)
    stream, train_ids = train_stream(first.cfg, N), np.arange(N)
    first.outer_step(step_batches(pool, train_ids, stream, first.cfg, 0))
    state = copy.deepcopy(first.state_dict())
    assert state["norm_prev"] is not None
    resumed = BilevelSolver(cfg, *(copy.deepcopy(m) for m in tiny_models()), valset)
    resumed.load_state_dict(state)
    resumed.outer_step(step_batches(pool, train_ids, stream, resumed.cfg, resumed.step))
    assert torch.equal(flat(resumed.last.z), flat(whole[1]["z"])) and torch.equal(resumed.last.c, whole[1]["c"])
    assert torch.equal(flat(resumed.last.grads), flat(whole[1]["hypergrad"]))
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
