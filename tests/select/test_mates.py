"""MATES: oracle probe (loop restore, batched == loop), influence model, Gumbel-top-k, one full round."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from lmselect.artifacts import read_manifest
from lmselect.models.losses import token_ce
from lmselect.models.presets import build_model
from lmselect.select import mates as mates_mod
from lmselect.select.mates import (
    MatesConfig,
    _as_optimizer,
    predict,
    probe_oracle,
    run_mates_round,
    train_influence_model,
)
from lmselect.select.topk import gumbel_topk, top_fraction
from lmselect.stats import spearman
from lmselect.testing import SAMPLE_LAMBADA
from lmselect.testing import make_valset as _make_valset

LAMBADA = SAMPLE_LAMBADA[:5]


def make_valset(tmp_path: Path, tokenizer, seq_len: int = 32):
    return _make_valset(tmp_path / "val.jsonl", tokenizer, LAMBADA, seq_len=seq_len)


def trained_target(pool, dtype=torch.float32, opt_cls=torch.optim.AdamW, steps: int = 2, **opt_kw):
    """A debug target that has taken a few real optimizer steps (so the Adam state is non-trivial)."""
    torch.manual_seed(0)
    model = build_model("debug", pool.vocab_size, seed=0).to(dtype)
    opt = opt_cls(model.parameters(), lr=1e-3, **opt_kw)
    ids = pool.ids(0)
    for s in range(steps):
        x = pool.batch(ids[4 * s : 4 * s + 4])
        opt.zero_grad()
        token_ce(model(input_ids=x).logits, x).mean().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def snapshot(model, opt):
    return (
        [p.detach().clone() for p in model.parameters()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        copy.deepcopy(opt.state_dict()),
    )


def assert_same_state(model, opt, snap):
    params, grads, osd = snap
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    now = opt.state_dict()
    assert now["param_groups"] == osd["param_groups"]
    assert now["state"].keys() == osd["state"].keys()
    for k in osd["state"]:
        for name, v in osd["state"][k].items():
            assert torch.equal(now["state"][k][name], v), (k, name)


@pytest.mark.parametrize("steps", [0, 2])
def test_loop_probe_restores_bit_identically(tmp_path, tiny_pool, tiny_tokenizer, steps):
    vset = make_valset(tmp_path, tiny_tokenizer)
    model, opt = trained_target(tiny_pool, steps=steps)
    if steps:  # leave a live gradient on the model too: it must come back
        x = tiny_pool.batch(tiny_pool.ids(0)[:2])
        token_ce(model(input_ids=x).logits, x).mean().backward()
    snap = snapshot(model, opt)
    vals = probe_oracle(model, opt, tiny_pool.batch(tiny_pool.ids(1)[:4]), vset, method="loop", lr=5e-3)
    assert_same_state(model, opt, snap)
    assert np.all(np.isfinite(vals)) and np.std(vals) > 0
    assert model.config._attn_implementation == "sdpa"  # switched back after probing


@pytest.mark.parametrize(
    "opt_cls,opt_kw,probe_kw",
    [
        (torch.optim.AdamW, {"weight_decay": 0.1}, {}),
        (torch.optim.AdamW, {"weight_decay": 0.1, "betas": (0.9, 0.95)}, {"lr": 2e-3, "clip_grad_norm": 0.5}),
        (torch.optim.Adam, {"weight_decay": 0.01}, {}),
    ],
)
def test_batched_probe_equals_loop_float64(tmp_path, tiny_pool, tiny_tokenizer, opt_cls, opt_kw, probe_kw):
    vset = make_valset(tmp_path, tiny_tokenizer)
    model, opt = trained_target(tiny_pool, dtype=torch.float64, opt_cls=opt_cls, **opt_kw)
    probes = tiny_pool.batch(tiny_pool.ids(1)[:5])
    snap = snapshot(model, opt)
    batched = probe_oracle(model, opt, probes, vset, method="batched", chunk_size=2, val_batch_size=3, **probe_kw)
    assert_same_state(model, opt, snap)  # the batched probe never touches the model or optimizer
    # same attention on both sides (the loop probe otherwise keeps the training's sdpa): this pins the arithmetic
    loop = probe_oracle(model, opt, probes, vset, method="loop", val_batch_size=3, attn_implementation="eager", **probe_kw)
    np.testing.assert_allclose(batched, loop, rtol=1e-10, atol=0)
    # the step really moved the validation loss, differently per sequence
    from lmselect.data.valset import validation_loss

    assert np.std(loop) > 1e-6 and np.all(np.abs(loop - validation_loss(model, vset)) > 1e-6)


def test_optimizer_rebuilt_from_state_dict(tmp_path, tiny_pool, tiny_tokenizer):
    vset = make_valset(tmp_path, tiny_tokenizer)
    model, opt = trained_target(tiny_pool, weight_decay=0.1)
    clone = copy.deepcopy(model)
    opt2 = _as_optimizer(clone, copy.deepcopy(opt.state_dict()))
    probes = tiny_pool.batch(tiny_pool.ids(1)[:3])
    a = probe_oracle(model, opt, probes, vset, method="loop")
    b = probe_oracle(clone, opt2, probes, vset, method="loop")
    np.testing.assert_array_equal(a, b)


def test_influence_model_keeps_best_holdout_checkpoint(tiny_pool):
    model, _ = trained_target(tiny_pool)
    ids = np.concatenate([tiny_pool.ids(0), tiny_pool.ids(1)])
    tokens = tiny_pool.batch(ids)
    values = tokens[:, :8].float().mean(1).numpy()  # a learnable function of the text
    cfg = MatesConfig(influence_steps=12, influence_eval_every=3, influence_lr=1e-3, influence_batch_size=8, holdout=0.25)
    scorer, info, log = train_influence_model(cfg, model, tokens, values, tiny_pool.vocab_size)
    rhos = [r["holdout_spearman"] for r in log if np.isfinite(r["holdout_spearman"])]
    assert info["best_spearman"] == pytest.approx(max(rhos))
    assert info["n_holdout"] == 8 and info["n_train"] == 24
    # the returned scorer is the best checkpoint: re-measure its held-out correlation
    perm = np.random.default_rng(cfg.seed + 2).permutation(len(ids))
    hold = perm[: info["n_holdout"]]
    z = (values - values.mean()) / values.std()
    with torch.no_grad():
        preds = scorer(tokens[hold]).double().numpy()
    assert spearman(preds, z[hold]) == pytest.approx(info["best_spearman"], abs=1e-6)
    assert scorer.activation == "identity"


def test_gumbel_topk_on_mates_predictions(tiny_pool):
    model, _ = trained_target(tiny_pool)
    from lmselect.models.scorer import SequenceScorer

    scorer = SequenceScorer.from_causal_lm(model, activation="identity", seed=0)
    ids = np.concatenate([tiny_pool.ids(0), tiny_pool.ids(1)])
    _, first = np.unique(np.asarray(tiny_pool.tokens[ids]), axis=0, return_index=True)
    ids = np.sort(ids[first])  # the tiny pool repeats sentences: keep distinct rows so predictions do not tie
    preds = predict(scorer, tiny_pool, ids, batch_size=7)
    assert len(ids) >= 12 and np.diff(np.sort(preds)).min() > 0
    k = max(1, round(0.25 * len(ids)))
    a = gumbel_topk(ids, preds, 0.25, 0.5, seed=3, largest=False)
    b = gumbel_topk(ids, preds, 0.25, 0.5, seed=3, largest=False)
    assert np.array_equal(a, b) and len(a) == k
    # noise is real at τ = 0.5 relative to the spread of these predictions: some seed changes the set
    assert any(not np.array_equal(a, gumbel_topk(ids, preds, 0.25, 0.5, seed=s, largest=False)) for s in range(4, 10))
    cold = gumbel_topk(ids, preds, 0.25, 1e-12, seed=3, largest=False)
    assert np.array_equal(cold, top_fraction(ids, preds, 0.25, largest=False))
    assert preds[np.isin(ids, cold)].max() <= preds[~np.isin(ids, cold)].min()


def test_run_mates_round_end_to_end_and_resume(tmp_path, tiny_pool, tiny_tokenizer, monkeypatch):
    vset = make_valset(tmp_path, tiny_tokenizer)
    model, opt = trained_target(tiny_pool, weight_decay=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    cfg = MatesConfig(n_probe=12, probe_chunk=4, influence_steps=6, influence_eval_every=3, influence_batch_size=4,
                      influence_lr=1e-3, fraction=0.25, val_items=4)
    out = tmp_path / "influence"
    probe_ids, cand = tiny_pool.ids(0), tiny_pool.ids(1)
    sel = run_mates_round(cfg, model, opt.state_dict(), tiny_pool, probe_ids, cand, vset, out, "cpu")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    m = read_manifest(out, kind="influence")
    assert m["counts"] == {"probes": 12, "candidates": 16, "selected": 4, "val_items": 4}
    assert len(sel) == 4 and np.all(np.diff(sel) > 0) and np.isin(sel, cand).all()
    import pyarrow.parquet as pq

    oracle = pq.read_table(out / "oracle.parquet").to_pydict()
    assert oracle["seq_id"] == list(probe_ids[:12])
    # oracle values are those of the probe itself
    clone = copy.deepcopy(model)
    direct = probe_oracle(clone, _as_optimizer(clone, opt.state_dict()), tiny_pool.batch(probe_ids[:12]),
                          vset.subset(slice(0, 4)), method="loop")
    np.testing.assert_allclose(oracle["val_loss"], direct, rtol=1e-5)
    assert (out / "influence_model" / "scorer.json").is_file() and (out / "predictions.parquet").is_file()
    preds = pq.read_table(out / "predictions.parquet").to_pydict()
    assert np.array_equal(sel, gumbel_topk(cand, np.array(preds["pred"]), 0.25, 0.5, cfg.seed + 4, largest=False))

    # complete: returned as is.  Partial (no manifest, predictions lost): oracle and influence model are reused.
    def boom(*a, **k):
        raise AssertionError("recomputed a finished sub-step")

    monkeypatch.setattr(mates_mod, "probe_oracle", boom)
    monkeypatch.setattr(mates_mod, "train_influence_model", boom)
    assert np.array_equal(run_mates_round(cfg, model, opt.state_dict(), tiny_pool, probe_ids, cand, vset, out), sel)
    (out / "manifest.json").unlink()
    (out / "predictions.parquet").unlink()
    again = run_mates_round(cfg, model, opt.state_dict(), tiny_pool, probe_ids, cand, vset, out)
    assert np.array_equal(again, sel)
    assert read_manifest(out, kind="influence")["uuid"] != m["uuid"]


# ----------------------------------------------------------------------------------------------------------------
# the probe step is the training step (METHODS §2 step 1), bit for bit


def _round_setup(tmp_path, pool, rnd: int, grad_clip: float):
    """A warm-up checkpoint (real AdamW moments) and round ``rnd``'s training config as the pipeline builds it."""
    from lmselect.config import replace
    from lmselect.pipeline import Runner
    from lmselect.recipe import Recipe
    from lmselect.train.loop import TrainConfig, train

    optim = {"lr": 4e-3, "grad_clip": grad_clip, "weight_decay": 0.1, "warmup_steps": 1, "schedule": "cosine"}
    base = replace(TrainConfig(), preset="debug", steps=2, global_batch=2, micro_batch=2, seed=3, device="cpu",
                   dtype="float32", log_every=1, **{f"optim.{k}": v for k, v in optim.items()})
    train(base, pool, pool.ids(0), tmp_path / "warm")
    runner = Runner(Recipe(train=base, lr_per_round="halving", round_steps=1), tmp_path / "run")
    cfg = runner.ctx.train_cfg(1, rnd=rnd, seed=0)  # what stage_train uses for round rnd
    return replace(cfg, global_batch=1, micro_batch=1)  # batch of 1: the probe's single sequence


@pytest.mark.parametrize("rnd,grad_clip", [(1, 0.0), (2, 0.3)])
def test_probe_step_is_one_train_step_bit_for_bit(tmp_path, tiny_pool, tiny_tokenizer, rnd, grad_clip):
    from lmselect.data.valset import validation_loss
    from lmselect.log import read_jsonl
    from lmselect.select.mates import probe_step, training_optimizer
    from lmselect.train.checkpoint import load_checkpoint_model, load_training_state
    from lmselect.train.loop import train
    from lmselect.train.schedules import lr_at

    cfg = _round_setup(tmp_path, tiny_pool, rnd, grad_clip)
    assert cfg.optim.lr == 4e-3 * 0.5**rnd and cfg.continue_optimizer  # round rnd's lr, not round rnd-1's
    seq = int(tiny_pool.ids(1)[3])
    train(cfg, tiny_pool, np.array([seq]), tmp_path / "round", init_from=tmp_path / "warm")
    norm = [r["grad_norm"] for r in read_jsonl(tmp_path / "round" / "train_log.jsonl") if "grad_norm" in r]
    assert len(norm) == 1 and (grad_clip == 0.0 or norm[0] > 2 * grad_clip)  # clipping really is active

    # the probe: from the warm-up checkpoint and its optimizer state, one probe step on the same sequence
    model = load_checkpoint_model(tmp_path / "warm")
    opt = training_optimizer(model, cfg, load_training_state(tmp_path / "warm")["optimizer"])
    probe_step(model, opt, tiny_pool.batch([seq]), lr=lr_at(0, cfg.optim, cfg.steps), grad_clip=cfg.optim.grad_clip,
               dtype=cfg.dtype)
    trained = load_checkpoint_model(tmp_path / "round")
    warm = load_checkpoint_model(tmp_path / "warm").state_dict()
    for k, v in trained.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert any(not torch.equal(warm[k], v) for k, v in trained.state_dict().items())  # the step moved the weights

    # and through run_mates_round(train_cfg=...): the loop oracle's value for that sequence is the validation loss
    # of train()'s model exactly; the batched one agrees to float32 round-off
    vset = make_valset(tmp_path, tiny_tokenizer)
    expected = validation_loss(trained, vset.subset(slice(0, 4)), batch_size=32)
    probes = np.array([seq, *tiny_pool.ids(1)[4:7]])
    for method in ("loop", "batched"):
        mcfg = MatesConfig(n_probe=4, probe_method=method, probe_chunk=2, influence_steps=1, influence_batch_size=2,
                           influence_eval_every=1, val_items=4, fraction=0.25)
        out = tmp_path / f"influence-{method}"
        warm_model = load_checkpoint_model(tmp_path / "warm")
        run_mates_round(mcfg, warm_model, load_training_state(tmp_path / "warm")["optimizer"], tiny_pool, probes,
                        tiny_pool.ids(1), vset, out, "cpu", train_cfg=cfg)
        import pyarrow.parquet as pq

        got = pq.read_table(out / "oracle.parquet").to_pydict()["val_loss"][0]
        if method == "loop":
            assert got == expected
        else:
            assert got == pytest.approx(expected, rel=1e-5)


def test_probe_candidates_are_held_out_of_warmup_and_candidate_shards(tiny_pool):
    from lmselect.artifacts import LmselectError
    from lmselect.select.mates import probe_candidates
    from lmselect.select.topk import random_fraction

    warm = random_fraction(tiny_pool.ids(0), 0.5, seed=0)
    held = probe_candidates(tiny_pool, warm)
    assert len(held) == len(tiny_pool.ids(0)) - len(warm) and np.all(np.diff(held) > 0)
    assert not np.isin(held, warm).any() and np.isin(held, tiny_pool.ids(0)).all()
    assert not np.isin(held, tiny_pool.ids(1)).any()
    with pytest.raises(LmselectError, match="probe_from"):
        probe_candidates(tiny_pool, tiny_pool.ids(0))
    assert MatesConfig().probe_from == "holdout"
