"""BLADE: dynamic-reference token selection; reduction to RHO-1, episode schedule, exact resume."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lmselect.data.valset import validation_loss
from lmselect.models.losses import token_ce
from lmselect.models.presets import build_model
from lmselect.select.blade import BladeConfig, BladeSelector
from lmselect.select.rho1 import Rho1Selector
from lmselect.testing import SAMPLE_LAMBADA
from lmselect.testing import make_valset as _make_valset

LAMBADA = SAMPLE_LAMBADA[:6]


def make_valset(tmp_path: Path, tokenizer, seq_len: int = 32):
    return _make_valset(tmp_path / "val.jsonl", tokenizer, LAMBADA, seq_len=seq_len)


class Stream:
    """A seeded batch stream whose position is plain state (copyable for resume tests)."""

    def __init__(self, pool, seed: int, batch: int = 4):
        self.pool, self.seed, self.batch, self.n = pool, seed, batch, 0

    def __call__(self) -> torch.Tensor:
        rng = np.random.default_rng(self.seed + self.n)
        self.n += 1
        return self.pool.batch(np.sort(rng.choice(self.pool.ids(None), self.batch, replace=False)))


def target_step(model, opt, x, selector):
    ce = token_ce(model(input_ids=x).logits, x)
    mask = selector.keep_mask(x, ce.detach())
    loss = (ce * mask).sum() / mask.sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return mask


@pytest.mark.parametrize("tau", [None, math.inf])
@pytest.mark.parametrize("pause", [True, False])
def test_blade_tau_inf_k0_equals_rho1_with_initial_reference(tmp_path, tiny_pool, tiny_tokenizer, tau, pause):
    torch.manual_seed(0)
    vset = make_valset(tmp_path, tiny_tokenizer)
    u = build_model("debug", tiny_pool.vocab_size, seed=0)
    rho1 = Rho1Selector(copy.deepcopy(u), keep_fraction=0.6)
    blade = BladeSelector(BladeConfig(tau=tau, ref_steps=0, keep_fraction=0.6, pause_target=pause), vset)
    blade.setup(u, torch.device("cpu"))
    opt = torch.optim.AdamW(u.parameters(), lr=3e-3)
    stream, data = Stream(tiny_pool, 7), Stream(tiny_pool, 100)
    n_differs = 0
    for step in range(5):
        blade.on_step_start(step, u, stream)
        x = data()
        ce = token_ce(u(input_ids=x).logits, x).detach()
        m_b, m_r = blade.keep_mask(x, ce), rho1.keep_mask(x, ce)
        assert torch.equal(m_b, m_r)
        n_differs += int(not torch.equal(m_b, ce >= ce.flatten().kthvalue(ce.numel() - int(m_b.sum()) + 1).values))
        target_step(u, opt, x, blade)  # the target moves; the reference must not
    assert blade.n_syncs == 1 and blade.last_sync_step == 0
    assert n_differs > 0  # the masks are not simply "highest target CE": the reference matters


def test_episode_schedule_and_reference_training(tmp_path, tiny_pool, tiny_tokenizer):
    torch.manual_seed(0)
    vset = make_valset(tmp_path, tiny_tokenizer)
    u = build_model("debug", tiny_pool.vocab_size, seed=0)
    cfg = BladeConfig(tau=3, ref_steps=6, ref_lr=3e-3, ref_batch_size=4, keep_fraction=0.6)
    sel = BladeSelector(cfg, vset)
    sel.setup(u, torch.device("cpu"))
    opt = torch.optim.AdamW(u.parameters(), lr=1e-3)
    stream, data = Stream(tiny_pool, 7), Stream(tiny_pool, 100)
    syncs = []
    for step in range(7):
        before = [p.detach().clone() for p in u.parameters()]
        sel.on_step_start(step, u, stream)
        sel.on_step_start(step, u, stream)  # a second call at the same step must not refresh again
        assert all(torch.equal(a, p) for a, p in zip(before, u.parameters()))  # u paused, untouched
        if sel.last_sync_step == step:
            syncs.append(step)
            # w was copied from u and trained K steps on L_val + λ·selected CE: it is better on the validation set
            assert validation_loss(sel.reference, vset) < validation_loss(u, vset)
            assert not sel.reference.training and not any(p.requires_grad for p in sel.reference.parameters())
        target_step(u, opt, data(), sel)
    assert syncs == [0, 3, 6] and sel.n_syncs == 3
    assert stream.n == 3 * 6 * 1  # K fresh training batches per episode (the duplicate calls drew none)
    st = sel.stats()
    assert st["last_sync_step"] == 6 and st["n_syncs"] == 3
    assert st["kept_fraction"] == pytest.approx(round(0.6 * 4 * 31) / (4 * 31))


@pytest.mark.parametrize("pause", [True, False])
def test_exact_resume(tmp_path, tiny_pool, tiny_tokenizer, pause):
    """Stop after step 3 (mid-episode; mid reference training when the target is not paused) and resume."""
    torch.manual_seed(0)
    vset = make_valset(tmp_path, tiny_tokenizer)
    cfg = BladeConfig(tau=4, ref_steps=3, ref_lr=1e-3, ref_batch_size=2, keep_fraction=0.5, pause_target=pause)

    def run(sel, u, opt, stream, data, steps):
        masks = []
        for step in steps:
            sel.on_step_start(step, u, stream)
            masks.append(target_step(u, opt, data(), sel))
        return masks

    u = build_model("debug", tiny_pool.vocab_size, seed=0)
    opt = torch.optim.AdamW(u.parameters(), lr=1e-3)
    a = BladeSelector(cfg, vset)
    a.setup(u, torch.device("cpu"))
    stream, data = Stream(tiny_pool, 7), Stream(tiny_pool, 100)
    full = run(a, u, opt, stream, data, range(0, 2))
    # checkpoint after step 1: model, optimizer, streams, selector state (through a save/load round trip)
    saved = (copy.deepcopy(u.state_dict()), copy.deepcopy(opt.state_dict()), stream.n, data.n)
    torch.save(a.state_dict(), tmp_path / "sel.pt")
    full += run(a, u, opt, stream, data, range(2, 9))

    u2 = build_model("debug", tiny_pool.vocab_size, seed=123)
    u2.load_state_dict(saved[0])
    opt2 = torch.optim.AdamW(u2.parameters(), lr=1e-3)
    opt2.load_state_dict(saved[1])
    b = BladeSelector(cfg, vset)
    b.load_state_dict(torch.load(tmp_path / "sel.pt", weights_only=False))  # before setup, as a loop may do
    b.setup(u2, torch.device("cpu"))
    s2, d2 = Stream(tiny_pool, 7), Stream(tiny_pool, 100)
    s2.n, d2.n = saved[2], saved[3]
    resumed = run(b, u2, opt2, s2, d2, range(2, 9))
    for m1, m2 in zip(full[2:], resumed):
        assert torch.equal(m1, m2)
    assert all(torch.equal(p, q) for p, q in zip(u.parameters(), u2.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(a.reference.parameters(), b.reference.parameters()))
    assert a.n_syncs == b.n_syncs == 3


def test_nonpaused_target_swaps_reference_after_k_steps(tmp_path, tiny_pool, tiny_tokenizer):
    vset = make_valset(tmp_path, tiny_tokenizer)
    u = build_model("debug", tiny_pool.vocab_size, seed=0)
    sel = BladeSelector(BladeConfig(tau=None, ref_steps=3, ref_lr=1e-3, pause_target=False), vset)
    sel.setup(u, torch.device("cpu"))
    stream = Stream(tiny_pool, 7)
    sel.on_step_start(0, u, stream)
    first = sel.reference
    assert all(torch.equal(p, q) for p, q in zip(first.parameters(), u.parameters()))  # unadapted copy scores first
    sel.on_step_start(1, u, stream)
    assert sel.reference is first
    sel.on_step_start(2, u, stream)  # third reference step done -> swapped in
    assert sel.reference is not first and stream.n == 3
    sel.on_step_start(3, u, stream)
    assert stream.n == 3  # tau = None: never refreshed
