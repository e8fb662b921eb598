"""Token top-k (RHO-1 / BLADE) is taken over the global batch: micro-batch size and world size change nothing.

METHODS §3–4 keep the top k % of the tokens of the *batch*. These tests pin that the mask is a function of the
global batch only (a brute-force sort over it), and that the loss and the weights after a few steps do not depend on
how the batch is split into micro-batches (1 process) or ranks (2 gloo processes).
"""

from __future__ import annotations

import socket

import torch
import torch.multiprocessing as mp
from _train_helpers import ddp_rho1_worker, make_cfg, recording_rho1, step_losses, weights

from lmselect.models.losses import token_ce
from lmselect.models.presets import build_model
from lmselect.select.rho1 import reference_token_ce
from lmselect.train.loop import DataOrder, train

OVERRIDES = {"steps": 3, "global_batch": 8, "optim": {"schedule": "cosine", "warmup_steps": 1}}


def _run(pool, out, micro_batch: int):
    sel = recording_rho1(pool.vocab_size)
    train(make_cfg(**OVERRIDES, micro_batch=micro_batch), pool, pool.ids(0), out, token_selector=sel)
    return sel


def _brute_force_mask(score: torch.Tensor, fraction: float) -> torch.Tensor:
    flat = score.reshape(-1).tolist()
    k = max(1, round(fraction * len(flat)))
    keep = sorted(range(len(flat)), key=lambda j: (-flat[j], j))[:k]  # highest first, ties: earlier position first
    m = torch.zeros(len(flat), dtype=torch.bool)
    m[keep] = True
    return m.view(score.shape)


def _assert_same_training(a, b) -> None:
    """Same per-step loss and pre-clip gradient norm (Adam's update is scale-free; the norm is not), same weights."""
    from lmselect.log import read_jsonl

    for key in ("loss", "grad_norm"):
        va, vb = ([r[key] for r in read_jsonl(d / "train_log.jsonl") if key in r] for d in (a, b))
        assert len(va) == len(vb) == OVERRIDES["steps"]
        torch.testing.assert_close(torch.tensor(va), torch.tensor(vb), rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
    # Adam's first steps are ~lr·sign(g): a near-zero gradient entry turns summation-order noise into ~1e-5 moves
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


def test_mask_is_a_brute_force_sort_of_the_global_batch(tiny_pool, tmp_path):
    sel = _run(tiny_pool, tmp_path / "m2", micro_batch=2)  # 4 micro-batches of 2
    # step 0 by hand: the initial target and the fixed reference on all 8 sequences of the first global batch at once
    cfg = make_cfg(**OVERRIDES)
    x = tiny_pool.batch(DataOrder(tiny_pool.ids(0), cfg.seed).next(cfg.global_batch))
    target = build_model("debug", tiny_pool.vocab_size, seed=cfg.seed, eos_token_id=tiny_pool.eos_id)
    with torch.no_grad():
        score = token_ce(target(input_ids=x).logits, x) - reference_token_ce(sel.reference, x)
    expected = _brute_force_mask(score, 0.6)
    assert len(sel.masks) == 3 and sel.masks[0].shape == expected.shape == (8, x.shape[1] - 1)
    assert torch.equal(sel.masks[0], expected)
    # a global top-k, not 4 per-micro-batch ones: the kept count differs between micro-batches
    per_micro = sel.masks[0].view(4, -1).sum(1)
    assert int(sel.masks[0].sum()) == round(0.6 * score.numel()) and len(set(per_micro.tolist())) > 1
    assert sel.stats()["kept_fraction"] == int(expected.sum()) / expected.numel()


def test_micro_batch_size_does_not_change_masks_losses_or_weights(tiny_pool, tmp_path):
    runs = {mb: _run(tiny_pool, tmp_path / f"m{mb}", micro_batch=mb) for mb in (2, 4, 8)}  # accum 4, 2, 1 (one pass)
    for mb in (2, 4):
        assert all(torch.equal(a, b) for a, b in zip(runs[mb].masks, runs[8].masks)), mb
        _assert_same_training(tmp_path / f"m{mb}", tmp_path / "m8")
    # not vacuous: the masks move with training, and the loss is the mean over kept tokens only
    assert not torch.equal(runs[8].masks[0], runs[8].masks[2])
    assert step_losses(tmp_path / "m8")[0] != step_losses(tmp_path / "m8")[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process(tiny_pool, tmp_path):
    # global batch 8: one process = the whole batch in one forward; two ranks = 2 micro-batches of 2 each
    overrides = {**OVERRIDES, "micro_batch": 2}
    mp.spawn(ddp_rho1_worker, args=(2, _free_port(), str(tiny_pool.path), str(tmp_path / "ddp"), overrides),
             nprocs=2, join=True)
    single = _run(tiny_pool, tmp_path / "single", micro_batch=8)
    m0, m1 = torch.load(tmp_path / "ddp" / "masks0.pt"), torch.load(tmp_path / "ddp" / "masks1.pt")
    assert len(m0) == len(single.masks) == 3
    for a, b, c in zip(m0, m1, single.masks):
        assert a.shape == c.shape == (8, tiny_pool.seq_len - 1)  # every rank holds the whole global mask
        assert torch.equal(a, b) and torch.equal(a, c)
    _assert_same_training(tmp_path / "ddp", tmp_path / "single")
