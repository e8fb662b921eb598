"""The training loop: exact resume, crash recovery, token-selector masking, checkpoints, config errors, CLI."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from _train_helpers import make_cfg, step_losses, weights

from lmselect.artifacts import LmselectError, read_manifest
from lmselect.log import read_jsonl
from lmselect.models.losses import token_ce
from lmselect.train.checkpoint import CHECKPOINTS_SUBDIR, latest_checkpoint, load_checkpoint_model, load_training_state
from lmselect.train.hooks import TokenSelector
from lmselect.train.loop import DataOrder, backward_loss, forward_ce, train
from lmselect.train.schedules import build_optimizer


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


class StatefulSelector(TokenSelector):
    """Scores depend on its own state and on next_batch() draws, so a resume that lost either would diverge."""

    name = "stateful"
    keep_fraction = 0.5

    def __init__(self, crash_at: int | None = None):
        self.calls, self.offset, self.crash_at = 0, 0, crash_at

    def on_step_start(self, step, model, next_batch):
        if step == self.crash_at:
            raise KeyboardInterrupt("simulated crash")
        if step % 2 == 0:
            self.offset = int(next_batch().sum()) % 3

    def token_scores(self, input_ids, token_ce):
        pos = torch.arange(token_ce.shape[1])
        self.calls += 1
        return ((pos + self.offset + self.calls) % 3 != 0).float().expand_as(token_ce) + 0.01 * token_ce

    def stats(self):
        return {"calls": self.calls}

    def state_dict(self):
        return {"calls": self.calls, "offset": self.offset}

    def load_state_dict(self, d):
        self.calls, self.offset = d["calls"], d["offset"]


def test_resume_is_exact(tiny_pool, tmp_path):
    # 6 steps of 4 out of 16 sequences: crosses an epoch boundary after step 4
    cfg = make_cfg(steps=6, optim={"warmup_steps": 2})
    ids = tiny_pool.ids(0)
    full = train(cfg, tiny_pool, ids, tmp_path / "full")
    half = train(make_cfg(steps=3, optim={"warmup_steps": 2}), tiny_pool, ids, tmp_path / "split")
    assert half["step"] == 3 and load_training_state(tmp_path / "split")["step"] == 3
    resumed = train(cfg, tiny_pool, ids, tmp_path / "split")  # a new call = a fresh start of the process state
    assert resumed["step"] == full["step"] == 6 and resumed["tokens_seen"] == 6 * 4 * tiny_pool.seq_len
    assert step_losses(tmp_path / "split") == step_losses(tmp_path / "full")  # identical, not merely close
    assert resumed["loss"] == full["loss"]
    assert_same_weights(tmp_path / "split", tmp_path / "full")
    # the finished stage returns at once, untouched
    mtime = (tmp_path / "full" / "model.safetensors").stat().st_mtime_ns
    assert train(cfg, tiny_pool, ids, tmp_path / "full")["step"] == 6
    assert (tmp_path / "full" / "model.safetensors").stat().st_mtime_ns == mtime


def test_crash_resume_from_periodic_checkpoint(tiny_pool, tmp_path, caplog):
    cfg = make_cfg(steps=6, save_every=2, optim={"schedule": "cosine", "warmup_steps": 1})
    ids = tiny_pool.ids(0)
    train(cfg, tiny_pool, ids, tmp_path / "full", token_selector=StatefulSelector())
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tiny_pool, ids, tmp_path / "crash", token_selector=StatefulSelector(crash_at=5))
    assert not (tmp_path / "crash" / "manifest.json").exists()  # no final checkpoint: the stage is not done
    ck = latest_checkpoint(tmp_path / "crash")
    assert ck is not None and ck.parent.name == CHECKPOINTS_SUBDIR and read_manifest(ck)["extra"]["step"] == 4
    assert len(list((tmp_path / "crash" / CHECKPOINTS_SUBDIR).iterdir())) == 1  # older periodic ones pruned
    sel = StatefulSelector()
    with caplog.at_level("INFO", logger="lmselect.train"):
        train(cfg, tiny_pool, ids, tmp_path / "crash", token_selector=sel)
    # a resumed run says what it resumed (issue 21, item 8)
    assert any("resuming from the checkpoint at step 4 of 6" in r.getMessage() for r in caplog.records)
    assert step_losses(tmp_path / "crash") == step_losses(tmp_path / "full")  # log truncated to step 4, redone
    assert_same_weights(tmp_path / "crash", tmp_path / "full")
    assert sel.calls == 6 * 2  # restored counter: 2 micro-batches per step
    assert not (tmp_path / "crash" / CHECKPOINTS_SUBDIR).exists()


def test_incomplete_checkpoint_is_not_resumed(tiny_pool, tmp_path):
    cfg = make_cfg(steps=2)
    train(cfg, tiny_pool, tiny_pool.ids(0), tmp_path / "a")
    (tmp_path / "a" / "manifest.json").unlink()  # as if killed while publishing
    assert latest_checkpoint(tmp_path / "a") is None
    train(cfg, tiny_pool, tiny_pool.ids(0), tmp_path / "a")  # retrains from scratch
    assert read_manifest(tmp_path / "a", kind="checkpoint")["extra"]["step"] == 2


class EarlyTokens(TokenSelector):
    """Prefers earlier positions; ties (same position) go to the earlier sequence of the global batch."""

    keep_fraction = 0.5

    def token_scores(self, input_ids, token_ce):
        return -torch.arange(token_ce.shape[1], dtype=torch.float32).expand_as(token_ce)


def test_masked_backward_equals_masked_loss_gradient(tiny_pool):
    from lmselect.models.presets import build_model

    x = tiny_pool.batch(tiny_pool.ids(0)[:3])
    half = (x.shape[1] - 1) // 2
    mask = torch.zeros(x.shape[0], x.shape[1] - 1, dtype=torch.bool)
    mask[:, :half] = True
    grads = {}
    for name in ("loop", "manual", "plain"):
        model = build_model("debug", tiny_pool.vocab_size, seed=0)
        ce = forward_ce(model, x, contextlib.nullcontext)
        if name == "manual":
            ce[:, :half].mean().backward()
        else:  # 1 of 2 micro-batches on 1 of 2 ranks, with a quarter of the kept tokens: its gradient before DDP's
            # mean over ranks is 2 x its share of the global masked mean = half the one-batch masked-mean gradient
            backward_loss(ce, 2, mask if name == "loop" else None, n_kept=4 * int(mask.sum()), world=2)
        grads[name] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads["loop"], grads["manual"]):
        torch.testing.assert_close(a * 2, b, rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(a * 2, b) for a, b in zip(grads["plain"], grads["manual"]))


def test_selector_step_through_train_matches_manual_adamw(tiny_pool, tmp_path):
    """One optimizer step of train() with a selector (2 micro-batches of 1) == AdamW on the hand-masked loss."""
    from lmselect.models.presets import build_model

    cfg = make_cfg(steps=1, global_batch=2, micro_batch=1, optim={"grad_clip": 0.0})
    ids = tiny_pool.ids(0)
    train(cfg, tiny_pool, ids, tmp_path / "sel", token_selector=EarlyTokens())
    model = build_model("debug", tiny_pool.vocab_size, seed=cfg.seed, eos_token_id=tiny_pool.eos_id)
    opt = build_optimizer(model, cfg.optim)
    x = tiny_pool.batch(DataOrder(ids, cfg.seed).next(2))
    ce = token_ce(model(input_ids=x).logits, x)
    n = ce.shape[1]  # 31 positions, 2 rows: k = 31 = the first 15 positions of both rows + position 15 of row 0
    mask = torch.zeros_like(ce, dtype=torch.bool)
    mask[:, : n // 2] = True
    mask[0, n // 2] = True
    assert int(mask.sum()) == round(0.5 * ce.numel())
    ce[mask].mean().backward()
    opt.step()
    got = weights(tmp_path / "sel")
    for k, v in model.state_dict().items():
        if k in got:  # Adam's first step ~ lr·sign(g): near-zero gradients amplify summation-order noise
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-5)


def test_checkpoint_is_a_hf_model_dir(tiny_pool, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "ck"
    res = train(make_cfg(steps=2), tiny_pool, tiny_pool.ids(1), out)
    m = read_manifest(out, kind="checkpoint")
    assert m["extra"]["step"] == 2 and m["extra"]["tokens_seen"] == res["tokens_seen"] == 2 * 4 * tiny_pool.seq_len
    assert m["extra"]["tokenizer_fingerprint"] == tiny_pool.tokenizer_fingerprint and m["extra"]["preset"] == "debug"
    assert (out / "config.yaml").is_file() and (out / "train_log.jsonl").is_file()
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert len(tok) == tiny_pool.vocab_size
    x = tiny_pool.batch(tiny_pool.ids(1)[:2])
    ours = load_checkpoint_model(out)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, ours(input_ids=x).logits)
    start = [r for r in read_jsonl(out / "train_log.jsonl") if r.get("event") == "start"]
    assert start[0]["tokens_per_step"] == 4 * tiny_pool.seq_len


def test_init_from_continues_optimizer_state(tiny_pool, tmp_path):
    ids = tiny_pool.ids(0)
    train(make_cfg(steps=2), tiny_pool, ids, tmp_path / "r1")
    train(make_cfg(steps=2, continue_optimizer=True), tiny_pool, ids, tmp_path / "r2", init_from=tmp_path / "r1")
    train(make_cfg(steps=2), tiny_pool, ids, tmp_path / "r2fresh", init_from=tmp_path / "r1")
    adam_step = lambda d: int(load_training_state(d)["optimizer"]["state"][0]["step"])  # noqa: E731
    assert adam_step(tmp_path / "r2") == 4 and adam_step(tmp_path / "r2fresh") == 2
    assert read_manifest(tmp_path / "r2")["extra"]["step"] == 2  # steps count per stage
    assert read_manifest(tmp_path / "r2")["parents"][1]["path"] == str(tmp_path / "r1")
    w1, w2 = weights(tmp_path / "r1"), weights(tmp_path / "r2fresh")
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)


def test_bad_batch_config_is_one_line_error(tiny_pool, tmp_path):
    with pytest.raises(LmselectError, match=r"global_batch \(6\) must be a positive multiple of micro_batch \(4\)") as e:
        train(make_cfg(global_batch=6, micro_batch=4), tiny_pool, tiny_pool.ids(0), tmp_path / "x")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "x").exists()


def test_cli_train_shard_and_selection(tiny_pool, tmp_path, capsys):
    from lmselect.cli import main

    common = ["--pool", str(tiny_pool.path), "--global_batch=4", "--micro_batch=2", "--device=cpu", "--log_every=1"]
    assert main(["train", *common, "--shard", "1", "--out", str(tmp_path / "a"), "--steps", "2", "--optim.lr=1e-3"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["step"] == 2
    import yaml

    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert saved["steps"] == 2 and saved["optim"]["lr"] == pytest.approx(1e-3) and saved["global_batch"] == 4

    sel = tmp_path / "sel.npy"
    np.save(sel, tiny_pool.ids(0)[:8])
    cfg = tmp_path / "t.yaml"
    cfg.write_text("steps: 1\noptim:\n  schedule: cosine\n")
    assert main(["train", *common, "--selection", str(sel), "--config", str(cfg), "--out", str(tmp_path / "b")]) == 0
    assert read_manifest(tmp_path / "b")["extra"]["step"] == 1

    assert main(["train", *common, "--global_batch=6", "--micro_batch=4", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmselect train: error: global_batch (6)") and "\n" not in err
    assert main(["train", *common, "--selection", str(tmp_path / "nope.npy"), "--out", str(tmp_path / "d")]) == 2
    assert "selection file not found" in capsys.readouterr().err


def test_progress_bar_shows_no_nan_loss_before_the_first_log_step(tiny_pool, tmp_path, monkeypatch):
    """Regression (issue 21, item 8): the terminal bar showed loss=nan until the first log step."""
    import math

    import lmselect.train.loop as loop

    seen: list[dict] = []

    class Recorder:
        def __init__(self, *a, **k):
            pass

        def update(self, n=1, **postfix):
            seen.append(postfix)

        def close(self):
            pass

    monkeypatch.setattr(loop, "Progress", Recorder)
    train(make_cfg(steps=4, log_every=3), tiny_pool, tiny_pool.ids(0), tmp_path / "a")
    assert [("loss" in p) for p in seen] == [False, False, True, True]
    assert all(math.isfinite(p["loss"]) for p in seen if "loss" in p)
