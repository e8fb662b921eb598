"""RHO-1: the top-k % excess-loss mask, the reference model and its optional loss cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmselect.artifacts import read_manifest
from lmselect.data.valset import validation_loss
from lmselect.models.losses import token_ce
from lmselect.models.presets import build_model
from lmselect.select.rho1 import (
    ReferenceLossCache,
    Rho1Config,
    Rho1Selector,
    precompute_reference_losses,
    reference_token_ce,
    train_reference,
)
from lmselect.testing import SAMPLE_LAMBADA
from lmselect.testing import make_valset as _make_valset

LAMBADA = SAMPLE_LAMBADA[:6]


def make_valset(tmp_path: Path, tokenizer, seq_len: int = 32):
    return _make_valset(tmp_path / "val.jsonl", tokenizer, LAMBADA, seq_len=seq_len)


def brute_force_mask(score: torch.Tensor, fraction: float) -> torch.Tensor:
    flat = score.reshape(-1).tolist()
    n = len(flat)
    k = max(1, round(fraction * n))
    order = sorted(range(n), key=lambda j: (-flat[j], j))[:k]  # highest first, ties: lower position first
    m = torch.zeros(n, dtype=torch.bool)
    m[order] = True
    return m.view(score.shape)


@pytest.mark.parametrize("fraction", [0.05, 0.25, 0.35, 0.6, 1.0])
def test_mask_equals_brute_force_with_ties_and_rounding(fraction, tiny_tokenizer):
    V = len(tiny_tokenizer)
    ref = build_model("debug", V, seed=1)
    sel = Rho1Selector(ref, keep_fraction=fraction)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (2, 6), generator=g)  # n = 2·5 = 10 tokens: 0.25 -> 2.5 -> 2, 0.35 -> 3.5 -> 4, 0.05 -> 1
    ref_ce = reference_token_ce(ref, x)
    # target CE: exactly the reference's on most tokens (excess 0, a big tie) and higher on a few
    bump = torch.zeros_like(ref_ce)
    bump[0, 1] = bump[1, 3] = bump[1, 0] = 1.0
    target_ce = ref_ce + bump
    mask = sel.keep_mask(x, target_ce)
    expected = brute_force_mask(target_ce - ref_ce, fraction)
    assert torch.equal(mask, expected)
    assert int(mask.sum()) == max(1, round(fraction * 10))
    if fraction == 0.35:  # the three bumped tokens, then the first tied token by position
        assert mask[0, 1] and mask[1, 3] and mask[1, 0] and mask[0, 0] and int(mask.sum()) == 4


def test_mask_random_scores_matches_brute_force(tiny_tokenizer):
    V = len(tiny_tokenizer)
    ref = build_model("debug", V, seed=1)
    sel = Rho1Selector(ref, keep_fraction=0.6)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, V, (3, 17), generator=g)
    # quantised target CE so that many excess losses tie exactly
    target_ce = torch.round(torch.rand(3, 16, generator=g) * 4) + 3.0
    mask = sel.keep_mask(x, target_ce)
    assert torch.equal(mask, brute_force_mask(target_ce - reference_token_ce(ref, x), 0.6))
    assert sel.stats()["kept_fraction"] == pytest.approx(round(0.6 * 48) / 48)


def test_train_reference_learns_and_resumes(tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    V = len(tiny_tokenizer)
    vset = make_valset(tmp_path, tiny_tokenizer)
    init = build_model("debug", V, seed=0)
    before = {k: v.clone() for k, v in init.state_dict().items()}
    cfg = Rho1Config(steps=30, lr=3e-3, batch_size=4, seed=0)
    ref = train_reference(cfg, init, vset, tiny_tokenizer, tmp_path / "ref")
    # init untouched, reference frozen and better on the text it was trained on
    assert all(torch.equal(before[k], v) for k, v in init.state_dict().items())
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert validation_loss(ref, vset) < validation_loss(init, vset) - 0.5
    m = read_manifest(tmp_path / "ref", kind="reference")
    assert m["counts"]["steps"] == 30
    # complete -> loaded, not retrained (a different config would otherwise give different weights)
    again = train_reference(Rho1Config(steps=1, lr=1.0), init, vset, tiny_tokenizer, tmp_path / "ref")
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), again.state_dict().values()))
    assert read_manifest(tmp_path / "ref")["uuid"] == m["uuid"]


def test_sigterm_saves_the_reference_training_and_the_rerun_resumes_bit_identical(tmp_path, tiny_tokenizer,
                                                                                   monkeypatch):
    """Regression (issue 29, item 6): an interrupted reference run restarted from scratch. Now SIGTERM lets the step
    finish, saves the training state in the (manifest-less) reference directory and stops as under the CLI; the
    rerun resumes at that step and ends with the weights of an uninterrupted run. Until then the directory is not a
    reference."""
    import os
    import signal

    from safetensors.torch import load_file

    from lmselect.artifacts import is_complete
    from lmselect.cli import Terminated, _raise_terminated
    from lmselect.errors import ArtifactError
    from lmselect.select import rho1 as rho1_mod
    from lmselect.select.rho1 import REFERENCE_PARTIAL, load_reference

    vset = make_valset(tmp_path, tiny_tokenizer)
    init = build_model("debug", len(tiny_tokenizer), seed=0)
    cfg = Rho1Config(steps=12, lr=3e-3, batch_size=4, seed=0)
    train_reference(cfg, init, vset, tiny_tokenizer, tmp_path / "want")  # uninterrupted
    calls: list[int] = []
    kill_at = [5]
    real = rho1_mod.token_ce

    def ce(*a, **k):  # the loss of each training step; SIGTERM arrives during step 5 of the first run
        calls.append(1)
        if len(calls) in kill_at:
            kill_at.clear()
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(rho1_mod, "token_ce", ce)
    out = tmp_path / "ref"
    prev = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        with pytest.raises(Terminated):
            train_reference(cfg, init, vset, tiny_tokenizer, out)
    finally:
        signal.signal(signal.SIGTERM, prev)
    assert torch.load(out / REFERENCE_PARTIAL, weights_only=False)["step"] == 5
    assert not is_complete(out) and sorted(p.name for p in out.iterdir()) == [REFERENCE_PARTIAL]
    with pytest.raises(ArtifactError):
        load_reference(out)
    calls.clear()
    ref = train_reference(cfg, init, vset, tiny_tokenizer, out)  # the requeue
    assert len(calls) == 7  # steps 6..12 only
    assert is_complete(out, kind="reference") and not (out / REFERENCE_PARTIAL).exists()
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "want" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(v, a[k]) for k, v in ref.state_dict().items() if k in a)
    assert (out / "ref_log.jsonl").read_text() == (tmp_path / "want" / "ref_log.jsonl").read_text()
    assert read_manifest(out)["extra"]["final_loss"] == read_manifest(tmp_path / "want")["extra"]["final_loss"]


def test_train_reference_from_texts(tmp_path, tiny_tokenizer):
    V = len(tiny_tokenizer)
    init = build_model("debug", V, seed=0)
    ref = train_reference(Rho1Config(steps=2, batch_size=2, seq_len=16), init, LAMBADA * 3, tiny_tokenizer, tmp_path / "r")
    assert read_manifest(tmp_path / "r")["counts"]["train_sequences"] >= 2
    assert any(not torch.equal(a, b) for a, b in zip(ref.state_dict().values(), init.state_dict().values()))


def test_reference_loss_cache(tmp_path, tiny_pool):
    V = tiny_pool.vocab_size
    ref = build_model("debug", V, seed=1)
    ids = tiny_pool.ids(0)
    precompute_reference_losses(ref, tiny_pool, ids, tmp_path / "cache", batch_size=5)
    cache = ReferenceLossCache(tmp_path / "cache", tiny_pool)
    sel = Rho1Selector(ref, keep_fraction=0.6, cache=cache)
    plain = Rho1Selector(ref, keep_fraction=0.6)
    x = tiny_pool.batch(ids[:5])
    x[3:, 5] = (x[3:, 5] + 1) % V  # 3 cached rows, 2 rows the cache has never seen
    got = sel.reference_ce(x)
    exact = plain.reference_ce(x)
    assert torch.allclose(got[:3], exact[:3], rtol=2e-3, atol=2e-3)  # float16 storage
    assert torch.equal(got[3:], exact[3:])  # missing rows computed on the fly
    assert sel.stats()["ref_cache_hits"] == 3 and sel.stats()["ref_cache_misses"] == 2


def test_rho1_end_to_end_training_steps(tmp_path, tiny_pool, tiny_tokenizer):
    """Reference trained on the validation text, then a few target steps with the selector through the hook."""
    torch.manual_seed(0)
    V = tiny_pool.vocab_size
    vset = make_valset(tmp_path, tiny_tokenizer)
    target = build_model("debug", V, seed=0)
    ref = train_reference(Rho1Config(steps=5, lr=1e-3, batch_size=4), target, vset, tiny_tokenizer, tmp_path / "ref")
    sel = Rho1Selector(ref, keep_fraction=0.6)
    sel.setup(target, torch.device("cpu"))
    opt = torch.optim.AdamW(target.parameters(), lr=1e-3)
    ids = tiny_pool.ids(0)
    for step in range(3):
        x = tiny_pool.batch(ids[4 * step : 4 * step + 4])
        sel.on_step_start(step, target, lambda x=x: x)
        ce = token_ce(target(input_ids=x).logits, x)
        mask = sel.keep_mask(x, ce.detach())
        loss = (ce * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
        # kept tokens really are those with the largest excess loss
        excess = ce.detach() - reference_token_ce(ref, x)
        assert excess[mask].min() >= excess[~mask].max()
    assert sel.stats()["kept_fraction"] == pytest.approx(round(0.6 * 4 * 31) / (4 * 31))
    assert all(not p.requires_grad for p in ref.parameters())
