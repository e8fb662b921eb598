"""Random token-mask control: seeded, uniform, independent of the micro-batch split, exactly the kept fraction
through the loop's global top-k, resumable."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmselect.select.random_tokens import RandomTokensConfig, RandomTokenSelector
from lmselect.train.hooks import topk_token_mask

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))


def _scores(sel, x, step=0):
    sel.on_step_start(step, None, None)
    return sel.token_scores(x, torch.zeros(x.shape[0], x.shape[1] - 1))


def test_scores_are_seeded_split_invariant_and_uniform():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 300, (8, 33), generator=g)
    a = _scores(RandomTokenSelector(0.6, seed=5), x)
    assert a.shape == (8, 32) and a.dtype == torch.float32
    # the same rows split into micro-batches (or ranks) score the same
    parts = torch.cat([_scores(RandomTokenSelector(0.6, seed=5), x[i : i + 3]) for i in range(0, 8, 3)])
    assert torch.equal(a, parts)
    assert not torch.equal(a, _scores(RandomTokenSelector(0.6, seed=6), x))  # another seed
    assert not torch.equal(a, _scores(RandomTokenSelector(0.6, seed=5), x, step=1))  # another step
    big = _scores(RandomTokenSelector(0.6, seed=1), torch.randint(0, 300, (256, 129), generator=g)).numpy()
    assert 0 <= big.min() and big.max() < 1 and abs(big.mean() - 0.5) < 0.01
    # no position is favoured: the kept fraction per position is flat
    m = topk_token_mask(torch.from_numpy(big), 0.6).float().mean(0).numpy()
    assert np.all(np.abs(m - 0.6) < 0.15), m


def test_mask_keeps_exactly_the_fraction_of_the_global_batch():
    x = torch.randint(0, 300, (4, 17), generator=torch.Generator().manual_seed(1))
    sel = RandomTokenSelector(0.6, seed=0)
    mask = topk_token_mask(_scores(sel, x), sel.keep_fraction)
    assert int(mask.sum()) == round(0.6 * 4 * 16)


def test_bad_keep_fraction_names_the_key():
    from lmselect.errors import ConfigError
    from lmselect.select.base import get_method

    with pytest.raises(ConfigError, match="random_tokens.keep_fraction"):
        get_method("random_tokens", RandomTokensConfig(keep_fraction=1.5)).check_config()
    from lmselect.select.blade import BladeConfig
    from lmselect.select.rho1 import Rho1Config

    assert RandomTokensConfig().keep_fraction == Rho1Config().keep_fraction == BladeConfig().keep_fraction


def test_training_with_the_mask_resumes_exactly(tiny_pool, tmp_path):
    from _train_helpers import make_cfg, step_losses, weights

    from lmselect.log import read_jsonl
    from lmselect.train.loop import train

    ids = tiny_pool.ids(0)
    full = train(make_cfg(steps=4), tiny_pool, ids, tmp_path / "full", token_selector=RandomTokenSelector(0.6, 9))
    train(make_cfg(steps=2), tiny_pool, ids, tmp_path / "split", token_selector=RandomTokenSelector(0.6, 9))
    res = train(make_cfg(steps=4), tiny_pool, ids, tmp_path / "split", token_selector=RandomTokenSelector(0.6, 9))
    assert res["loss"] == full["loss"] and step_losses(tmp_path / "split") == step_losses(tmp_path / "full")
    wa, wb = weights(tmp_path / "split"), weights(tmp_path / "full")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    n = 4 * (tiny_pool.seq_len - 1)
    kept = [r["sel_kept_fraction"] for r in read_jsonl(tmp_path / "full" / "train_log.jsonl") if "sel_kept_fraction" in r]
    assert kept and all(k == round(0.6 * n) / n for k in kept)
    # a different seed trains on other tokens
    other = train(make_cfg(steps=4), tiny_pool, ids, tmp_path / "other", token_selector=RandomTokenSelector(0.6, 10))
    assert other["loss"] != full["loss"]


def test_the_mask_needs_no_scoring_forward(tiny_pool, tmp_path, monkeypatch):
    """The random mask does not read the CE, so the loop skips the no-grad scoring pass (2 micro-batches per step):
    the same weights as with the pass forced, fewer forwards, and the checkpoint records that no pass ran."""
    from _train_helpers import make_cfg, weights

    import lmselect.train.loop as loop
    from lmselect.artifacts import read_manifest

    calls = []
    real = loop.forward_ce
    monkeypatch.setattr(loop, "forward_ce", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = tiny_pool.ids(0)
    loop.train(make_cfg(steps=3), tiny_pool, ids, tmp_path / "skip", token_selector=RandomTokenSelector(0.6, 9))
    n_skip, calls[:] = len(calls), []

    class Forced(RandomTokenSelector):
        reads_ce = True

    loop.train(make_cfg(steps=3), tiny_pool, ids, tmp_path / "forced", token_selector=Forced(0.6, 9))
    assert n_skip == 3 * 2 and len(calls) == 3 * 2 * 2  # grad forwards only vs grad + scoring forwards
    wa, wb = weights(tmp_path / "skip"), weights(tmp_path / "forced")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert read_manifest(tmp_path / "skip")["extra"]["scoring_forward"] is False
    assert read_manifest(tmp_path / "forced")["extra"]["scoring_forward"] is True
