"""Regression (issue 29, item 6): a preempted training stage loses at most a few minutes, in every recipe.

Before, a recipe without ``train.save_every`` (demo.yaml, the template for own corpora) checkpointed only at the end,
and SIGTERM saved nothing, so a Slurm requeue restarted the interrupted stage from step 0. Now the loop checkpoints
at least every ``$LMSELECT_CHECKPOINT_EVERY_S`` seconds (600 by default) and SIGTERM writes a checkpoint of the
current step before the one-line stop (exit 143); the requeued command resumes there and ends where an
uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmselect.cli import main
from lmselect.train import checkpoint as ckpt_io

FAST = ["--global_batch=8", "--micro_batch=8", "--log_every=5"]


def _env(**kw: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"), OMP_NUM_THREADS="1",
                HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **kw)


def _logged_steps(out: Path) -> list[dict]:
    p = out / "train_log.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.is_file() else []


def test_sigterm_writes_a_checkpoint_and_the_requeued_job_resumes_there(tmp_path, tiny_pool):
    steps = 120
    out = tmp_path / "ck"
    cmd = [sys.executable, "-m", "lmselect.cli", "train", "--pool", str(tiny_pool.path), "--out", str(out),
           "--steps", str(steps), *FAST]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None and not any(r.get("step", 0) >= 20 for r in _logged_steps(out)):
        time.sleep(0.02)
    assert p.poll() is None, p.communicate()
    p.send_signal(signal.SIGTERM)  # what Slurm sends at preemption; no save_every is set
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err[-3000:]
    assert [x for x in err.splitlines() if x.startswith("lmselect train:")] == [
        "lmselect train: stopped by SIGTERM (time limit, preemption or a failed rank); rerun the same command to "
        "resume"], err[-3000:]
    saved = ckpt_io.latest_checkpoint(out)
    assert saved is not None and saved != out  # a step checkpoint, not the final model
    at = int(ckpt_io.load_training_state(saved)["step"])
    assert 20 <= at < steps
    # the requeue: the same command resumes at that step and finishes
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    events = [x for x in _logged_steps(out) if x.get("event") == "resume"]
    assert [e["step"] for e in events] == [at]
    # and ends exactly where an uninterrupted run ends
    ref = tmp_path / "ref"
    r = subprocess.run([*cmd[:7], str(ref), *cmd[8:]], capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_file(out / "model.safetensors"), load_file(ref / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("every, saves", [("0", 6), ("", 1)])
def test_the_loop_checkpoints_on_the_clock_without_save_every(tmp_path, tiny_pool, monkeypatch, every, saves):
    """$LMSELECT_CHECKPOINT_EVERY_S (default 600 s): a periodic checkpoint whenever the interval is up, with no
    save_every in the config (0 = at every check; a 6-step run on the default interval saves only its final one)."""
    calls = []
    real = ckpt_io.save_checkpoint
    monkeypatch.setattr(ckpt_io, "save_checkpoint", lambda path, *a, **k: (calls.append(path), real(path, *a, **k)))
    monkeypatch.setenv("LMSELECT_CHECKPOINT_EVERY_S", every)
    assert main(["train", "--pool", str(tiny_pool.path), "--out", str(tmp_path / "ck"), "--steps", "6", *FAST]) == 0
    assert len(calls) == saves


def test_a_bad_checkpoint_interval_is_one_line(tmp_path, tiny_pool, monkeypatch, capsys):
    monkeypatch.setenv("LMSELECT_CHECKPOINT_EVERY_S", "ten minutes")
    assert main(["train", "--pool", str(tiny_pool.path), "--out", str(tmp_path / "ck"), "--steps", "2", *FAST]) == 2
    assert "$LMSELECT_CHECKPOINT_EVERY_S='ten minutes': expected seconds" in capsys.readouterr().err
