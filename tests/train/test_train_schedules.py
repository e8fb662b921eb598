"""Learning-rate schedules at their key steps, and AdamW parameter grouping."""

from __future__ import annotations

import pytest

from lmselect.artifacts import LmselectError
from lmselect.train.schedules import OptimConfig, build_optimizer, lr_at, validate_schedule


def test_constant_with_warmup():
    c = OptimConfig(lr=1e-3, schedule="constant", warmup_steps=4)
    assert [lr_at(s, c, 100) for s in range(5)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    assert lr_at(99, c, 100) == pytest.approx(1e-3)
    assert lr_at(0, OptimConfig(lr=1e-3, schedule="constant"), 10) == pytest.approx(1e-3)  # no warm-up


def test_cosine_reaches_floor_at_last_step():
    c = OptimConfig(lr=1e-3, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    total = 111  # 100 decay steps after warm-up: span = 111 - 1 - 10 = 100
    assert lr_at(9, c, total) == pytest.approx(1e-3)  # end of warm-up
    assert lr_at(10, c, total) == pytest.approx(1e-3)  # cosine starts at the peak
    assert lr_at(60, c, total) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half way: mid point
    assert lr_at(110, c, total) == pytest.approx(1e-4)  # last step: the floor
    lrs = [lr_at(s, c, total) for s in range(10, total)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_wsd_linear_decay():
    c = OptimConfig(lr=1e-3, schedule="wsd", warmup_steps=2, decay_steps=4, min_lr_ratio=0.0)
    lrs = [lr_at(s, c, 10) for s in range(10)]
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 7.5e-4, 5e-4, 2.5e-4, 0.0])


def test_wsd_halving_is_the_evaluation_branch():
    # METHODS §1.3e: 200 steps, halving the LR every 50
    c = OptimConfig(lr=1e-3, schedule="wsd", decay_steps=200, decay_halving_every=50)
    assert [lr_at(s, c, 200) for s in (0, 49, 50, 99, 100, 150, 199)] == pytest.approx(
        [1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 1.25e-4, 1.25e-4]
    )


def test_schedule_validation_errors_are_one_line():
    with pytest.raises(LmselectError, match="decay_steps") as e:
        validate_schedule(OptimConfig(schedule="wsd", decay_steps=0), 10)
    assert "\n" not in str(e.value)
    with pytest.raises(LmselectError, match="exceed"):
        validate_schedule(OptimConfig(schedule="wsd", warmup_steps=5, decay_steps=6), 10)


def test_no_weight_decay_on_biases_and_norms():
    from lmselect.models.presets import build_model

    model = build_model("debug", 64, seed=0)
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"])
    nd = [names[id(p)] for p in no_decay["params"]]
    assert nd and all(n.endswith("bias") or "norm" in n for n in nd), nd
    assert any("layernorm.weight" in n or "layer_norm.weight" in n for n in nd)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
