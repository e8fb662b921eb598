"""Two nodes on one machine: two ``torchrun --nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d`` agents, started
together on 127.0.0.1 (gloo on CPU), as ``lmselect slurm`` starts one agent per node.

* ``lmselect train``: one agent is stopped mid-run (SIGTERM, what a failing node's agent gets); the other rank ends
  with one line naming itself and the lost peer; the rerun resumes from the last checkpoint, and the result equals
  one process with the same global batch.
* ``lmselect score`` (the perplexity proxy, ``--lm-loss``): one part per rank, the same scores as one process.
* ``lmselect run`` with BLISS and RHO-1 (a token-level method): complete, only rank 0 writes the shared artifacts
  (a rank writes only its own scores part), and the same results as the single-process reference run.

Tolerances. Data-parallel training sums the global batch's gradient in another order than one process (two
micro-batches accumulated vs. an all-reduce of two ranks' gradients), so weights and losses agree to float32 rounding
(losses: rtol 1e-5, as tests/train/test_train_distributed.py). AdamW divides each update by the root of its second
moment, so a parameter whose gradient is near zero (a bias) turns a rounding-sized gradient difference into an update
difference of up to the learning rate; after 30 steps the weights differ by at most 5e-5 (measured), so the weights
are compared to atol 2e-4. Scoring a window does not depend on the other windows of its
batch, but the batch composition changes with the part split, and a CPU matmul of another shape may round
differently: 1e-6. BLISS: as tests/test_pipeline_distributed.py (its solve all-reduces; rtol 1e-4).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# the CLI spelling of tests/train/_train_helpers.make_cfg (the single-process reference)
TRAIN = ["--preset=debug", "--global_batch=4", "--micro_batch=2", "--log_every=1", "--seed=3", "--device=cpu",
         "--dtype=float32", "--optim.lr=3e-3", "--optim.schedule=constant"]
sys.path.insert(0, str(Path(__file__).resolve().parent / "train"))  # _train_helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agents(target: list[str], env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """Two torchrun agents ("nodes") of one job; node 0 hosts the c10d rendezvous store."""
    port = _free_port()
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=lmselect-test",
               f"--rdzv-conf=is_host={int(node == 0)},join_timeout=60", *target]
        procs.append(subprocess.Popen(cmd, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _wait(procs: list[subprocess.Popen], timeout: float = 240) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, o, e))
    return out


def _lines(stderr: str) -> list[str]:
    return [x for x in stderr.splitlines() if x.startswith("lmselect ")]


def test_two_nodes_train_stop_resume_and_score_equal_one_process(tiny_pool, tmp_path):
    from _train_helpers import make_cfg, step_losses, weights

    from lmselect.artifacts import is_complete, read_manifest
    from lmselect.score import read_scores, score_pool
    from lmselect.train.loop import train

    ck = tmp_path / "ck"
    steps = 30
    cli = ["-m", "lmselect.cli", "train", "--pool", str(tiny_pool.path), "--shard", "0", "--out", str(ck),
           "--steps", str(steps), "--save_every=5", *TRAIN]
    procs = _agents(cli)
    t0 = time.time()
    while not list(ck.glob("checkpoints/step-*")) and time.time() - t0 < 120 and procs[1].poll() is None:
        time.sleep(0.01)
    procs[1].send_signal(signal.SIGTERM)  # node 1's agent goes away; torchrun passes SIGTERM to its rank
    (rc0, _, err0), (rc1, _, err1) = _wait(procs)
    assert rc0 != 0 and rc1 != 0, (err0[-2000:], err1[-2000:])
    assert not is_complete(ck, kind="checkpoint")
    assert _lines(err1) == ["lmselect train: rank 1 of 2: stopped by SIGTERM (time limit, preemption or a failed "
                            "rank); rerun the same command to resume"], err1[-3000:]
    lost = _lines(err0)
    # rank 0 stops in one line either way: the ranks agree on a SIGTERM at log steps (train.loop.PreemptionGuard), so
    # it stops with rank 1 when the signal lands before a log step, else it finds rank 1 gone at the next collective
    assert len(lost) == 1 and lost[0].startswith(("lmselect train: rank 0 of 2: error: lost contact with the other "
                                                  "ranks (", "lmselect train: rank 0 of 2: stopped by SIGTERM")), err0[-3000:]
    assert "rerun the same command to resume" in lost[0] and "Traceback" not in lost[0]

    # the rerun resumes from the newest checkpoint and finishes
    (rc0, out0, err0), (rc1, _, err1) = _wait(_agents(cli))
    assert rc0 == 0 and rc1 == 0, (err0[-3000:], err1[-3000:])
    assert "event=resume" in err0
    m = read_manifest(ck, kind="checkpoint")
    assert m["extra"]["step"] == steps

    # one process, same global batch (2 micro-batches of 2 accumulated): same losses and weights
    single = tmp_path / "single"
    train(make_cfg(steps=steps), tiny_pool, tiny_pool.ids(0), single)
    la, lb = step_losses(ck), step_losses(single)
    assert len(la) == len(lb) == steps
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=1e-5, atol=1e-5)
    wa, wb = weights(ck), weights(single)
    for k in wb:  # measured: max |diff| 5e-5 after 30 steps (see the module docstring for why not 1e-5)
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=2e-4, msg=k)

    # score the pool with the trained model (the perplexity proxy): one part per rank, equal to one process
    sdir = tmp_path / "scores"
    (rc0, _, err0), (rc1, _, err1) = _wait(_agents(
        ["-m", "lmselect.cli", "score", "--model", str(ck), "--lm-loss", "--pool", str(tiny_pool.path),
         "--out", str(sdir), "--device", "cpu", "--batch-size", "4", "--no-progress"]))
    assert rc0 == 0 and rc1 == 0, (err0[-3000:], err1[-3000:])
    assert read_manifest(sdir, kind="scores")["counts"]["parts"] == 2
    ref = score_pool(ck, tiny_pool, None, tmp_path / "scores1", batch_size=4, device="cpu", lm_loss=True,
                     progress=False)
    (ia, sa), (ib, sb) = read_scores(sdir), read_scores(ref)
    assert np.array_equal(ia, ib) and len(ia) == len(tiny_pool.ids(None))
    np.testing.assert_allclose(sa, sb, rtol=0, atol=1e-6)
    assert np.ptp(sb) > 1e-3  # the scores differ between sequences: equality is not vacuous


@pytest.mark.slow
def test_two_nodes_run_bliss_and_rho1_equal_one_process(tiny_recipe, all_methods_run, tmp_path):
    from test_pipeline_distributed import WRAPPER, _writes

    from lmselect.artifacts import is_complete, read_manifest
    from lmselect.score import read_scores

    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    wrapper = log_dir / "run_cli.py"
    wrapper.write_text(WRAPPER)
    out = tmp_path / "run"
    results = _wait(_agents([str(wrapper), "run", str(tiny_recipe), "--out", str(out), "--no-report",
                             "--methods=bliss,rho1", "--rounds=1"], env={**ENV, "WRITE_LOG_DIR": str(log_dir)}))
    for rc, _, err in results:
        assert rc == 0, err[-4000:]
    assert is_complete(out, kind="run") and read_manifest(out)["extra"]["world_size"] == 2
    # only rank 0 writes shared artifacts; rank 1 writes nothing but its own scores part (and the job's identical
    # job.json / config.yaml, or the parts' manifest when it finishes last)
    writes = _writes(log_dir)
    rank1 = [p for p, ranks in writes.items() if 1 in ranks]
    assert rank1 and all(Path(p).parent.name == "scores" for p in rank1), rank1
    for path, ranks in writes.items():
        if Path(path).name == "manifest.json" and Path(path).parent.name != "scores":
            assert ranks == [0], (path, ranks)
    ref = all_methods_run
    # RHO-1 (token level) trains on the whole shard with a token mask: same selection, same target
    a = np.load(out / "rho1" / "seed0" / "round1" / "selection" / "selected.npy")
    b = np.load(ref / "rho1" / "seed0" / "round1" / "selection" / "selected.npy")
    assert np.array_equal(a, b)
    ea = json.loads((out / "rho1" / "seed0" / "round1" / "eval" / "results.json").read_text())["val_loss"]
    eb = json.loads((ref / "rho1" / "seed0" / "round1" / "eval" / "results.json").read_text())["val_loss"]
    assert ea == pytest.approx(eb, rel=1e-4)
    # BLISS: the distributed solve is the single-process math: the same scores to float32 rounding
    ia, sa = read_scores(out / "bliss" / "seed0" / "round1" / "scores")
    ib, sb = read_scores(ref / "bliss" / "seed0" / "round1" / "scores")
    assert np.array_equal(ia, ib)
    np.testing.assert_allclose(sa, sb, rtol=1e-4, atol=1e-5)
    assert read_manifest(out / "bliss" / "seed0" / "round1" / "bilevel")["extra"]["world_size"] == 2


def test_scores_resumed_on_another_world_size_one_line(tiny_pool, tiny_tokenizer, tmp_path, monkeypatch):
    """A scoring directory split by a 2-process run, resumed by 3 processes: one line, before compute."""
    from lmselect.artifacts import LmselectError
    from lmselect.models.presets import build_model
    from lmselect.models.scorer import SequenceScorer
    from lmselect.score import score_pool

    model = tmp_path / "scorer"
    SequenceScorer.from_causal_lm(build_model("debug", len(tiny_tokenizer), seed=0), activation="identity",
                                  seed=0).save_pretrained(model)
    tiny_tokenizer.save_pretrained(str(model / "backbone"))  # it carries the pool's tokenizer (checked before scoring)
    out = tmp_path / "scores"
    score_pool(model, tiny_pool, None, out, shard=(0, 2), device="cpu", progress=False)  # rank 0 of 2 finished
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(LmselectError) as e:
        score_pool(model, tiny_pool, None, out, device="cpu", progress=False)
    assert str(e.value) == (f"{out}: already split into 2 parts by an earlier run, this run has 3 processes (one part "
                            "each); rerun with 2 processes (nodes x processes per node) or delete the directory to "
                            "rescore it")
