"""The transcription of the released BLISS loop (released_bliss.py) on its own: the z initialisation and clip
semantics, the schedule's first step, the stale normaliser and the batch pattern, the per-sample hypergradient
against autograd through the softmax, and determinism. (Its agreement with lmselect's ``profile: paper``:
test_bliss_released.py.)"""

from __future__ import annotations

import pytest
import torch
from released_bliss import (
    RUN_SH_ARGS,
    released_head_init_,
    released_lr_lambda,
    released_outer_steps,
    z_init,
    z_init_value,
    z_update,
)

from lmselect.models.presets import Preset, build_model
from lmselect.select.bliss import init_score_model

VOCAB, L, B = 96, 16, 4
TINY = Preset("oracle-tiny", "gpt_neox", 32, 2, 4, 64, max_position_embeddings=64)


def _models():
    proxy = build_model(TINY, VOCAB, seed=0).to(torch.float64)
    target = build_model(TINY, VOCAB, seed=1).to(torch.float64)
    scorer = init_score_model(proxy, seed=2)
    released_head_init_(scorer, torch.Generator().manual_seed(2))
    return proxy, target, scorer


def _data(n: int = 4):
    batches = [torch.randint(0, VOCAB, (B, L), generator=torch.Generator().manual_seed(100 + k)) for k in range(n)]
    vids = torch.randint(0, VOCAB, (B, L), generator=torch.Generator().manual_seed(3))
    vmask = torch.zeros(B, L - 1, dtype=torch.bool)
    vmask[:, -3:] = True  # final-word tokens only
    return batches, [(vids, vmask)]


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def test_z_init_is_inverse_numel_rounded_as_stored():
    assert z_init_value(16, first_step=True) == 1 / 16  # a power of two: exact in float16
    v16, v32 = z_init_value(768, first_step=True), z_init_value(768, first_step=False)
    assert v16 != v32 and abs(v16 - 1 / 768) < 2**-11 / 768 and abs(v32 - 1 / 768) < 2**-23 / 768
    assert z_init_value(2**25 + 1, first_step=True) == 0.0  # float16 underflow (pythia-160m's embedding)
    assert z_init_value(2**25 + 1, first_step=False) > 0.0
    z = z_init([torch.zeros(3, 5, dtype=torch.float64), torch.zeros(7, dtype=torch.float64)], first_step=False)
    assert torch.equal(z[0], torch.full((3, 5), z_init_value(15, False), dtype=torch.float64))
    assert torch.equal(z[1], torch.full((7,), z_init_value(7, False), dtype=torch.float64))


def test_z_update_normalises_the_residual_not_the_step():
    z = [torch.zeros(4, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)]
    v = [torch.tensor([30.0, 40.0, 0.0, 0.0], dtype=torch.float64), torch.tensor([0.3, 0.4, 0.0], dtype=torch.float64)]
    hz = [torch.zeros_like(t) for t in z]
    out = z_update(z, hz, v, lamb=1e-2, lr_z=1e-2, clip=1.0)
    # ‖g‖ = 50 > 1: the step is η_z · g/‖g‖ (norm η_z = 0.01), although η_z·‖g‖ = 0.5 (< 1) would pass a step clip
    assert torch.allclose(out[0], torch.tensor([0.006, 0.008, 0.0, 0.0], dtype=torch.float64), atol=1e-15)
    # ‖g‖ = 0.5 ≤ 1: the plain step −η_z g
    assert torch.allclose(out[1], 1e-2 * v[1], atol=1e-15)


def test_warmup_starts_at_zero_and_the_first_step_moves_nothing():
    lam = released_lr_lambda(RUN_SH_ARGS["max_steps"] * 0.1, RUN_SH_ARGS["max_steps"])
    assert lam(0) == 0.0 and lam(1) == pytest.approx(1 / 600) and lam(600) == 1.0
    assert released_lr_lambda(0, 100)(0) == 1.0  # without --warmup: the cosine from 1
    from transformers import get_cosine_schedule_with_warmup  # what BS:359-368 calls

    for warm, total in ((600.0, 6000), (0, 30), (2.5, 25)):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        hf = get_cosine_schedule_with_warmup(opt, num_warmup_steps=warm, num_training_steps=total).lr_lambdas[0]
        ours = released_lr_lambda(warm, total)
        assert all(ours(s) == pytest.approx(hf(s), abs=1e-15) for s in (0, 1, 2, 3, 599, 600, 601, total - 1, total))
    proxy, target, scorer = _models()
    batches, vals = _data()
    r = released_outer_steps(proxy, scorer, target, batches, vals, {**RUN_SH_ARGS, "inner_steps": 1}, 2)
    assert r[0]["lr_proxy"] == 0.0 and r[1]["lr_proxy"] == pytest.approx(1e-5 / 600)
    for k, x in proxy.state_dict().items():
        assert torch.equal(r[0]["proxy_state"][k], x), k  # lr 0: not even weight decay moves it
    assert any(not torch.equal(r[1]["proxy_state"][k], x) for k, x in proxy.state_dict().items())


FAST = {"learning_rate": 1e-3, "learning_rate_influence": 1e-3, "max_steps": 10, "inner_steps": 1}


@pytest.fixture(scope="module")
def fast_run():
    """Two outer steps at lr 1e-3 without warm-up (so both models move), with the inputs that produced them."""
    proxy, target, scorer = _models()
    batches, vals = _data()
    return (proxy, target, scorer, batches, vals), released_outer_steps(proxy, scorer, target, batches, vals, FAST, 2)


def test_stale_normaliser_and_batch_pattern(fast_run):
    _, r = fast_run
    # step 0: a softmax of the batch, in the inner step and inside H
    assert float(r[0]["inner_weights"][0].sum()) == pytest.approx(1.0, abs=1e-14)
    assert torch.allclose(r[0]["inner_weights"][0], r[0]["P"], rtol=1e-12, atol=0)
    # step 1: exp(s - m)/S with step 0's (m, S); with K = 1 the inner batch is the outer batch, so the inner weights
    # are step 1's outer scores (same score model) under step 0's normaliser
    s0, s1 = r[0]["scores"], r[1]["scores"]
    want = torch.exp(s1 - s0.max()) / torch.exp(s0 - s0.max()).sum()
    assert torch.allclose(r[1]["inner_weights"][0], want, rtol=1e-12, atol=0)
    assert torch.allclose(r[1]["outer_weights"], want, rtol=1e-12, atol=0)
    assert abs(float(want.sum()) - 1.0) > 1e-6  # the normaliser is stale: the weights no longer sum to 1


def test_per_sample_hypergradient_equals_autograd_through_the_softmax_and_is_deterministic(fast_run):
    (proxy, target, scorer, batches, vals), runs = fast_run
    r = runs[0]
    assert float(r["c"].abs().min()) > 0
    # independent: one batched forward of the score model (as it was before its step) and autograd through softmax
    from released_bliss import score_parameters

    params = [p for _, p in score_parameters(scorer)]
    s = scorer(batches[0])
    obj = -(torch.softmax(s, 0) * r["c"]).sum()
    want = torch.autograd.grad(obj, params)
    got = _flat(r["hypergrad"])
    assert float(got.norm()) > 0
    assert float((got - _flat(want)).norm() / got.norm()) < 1e-10
    # every tensor clipped to at most unit norm, exactly unit where it was larger
    for h, hc in zip(r["hypergrad"], r["hypergrad_clipped"]):
        assert float(hc.norm()) == pytest.approx(min(1.0, float(h.norm())), rel=1e-12)
    again = released_outer_steps(proxy, scorer, target, batches, vals, FAST, 1)[0]  # the inputs are not modified
    assert torch.equal(_flat(again["z"]), _flat(r["z"])) and torch.equal(again["c"], r["c"])
    assert all(torch.equal(again["score_state"][k], x) for k, x in r["score_state"].items())
