"""Run lock: one holder at a time (also across processes), stale locks of dead processes taken over, released on error."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lmselect.artifacts import LmselectError
from lmselect.runlock import LOCK_NAME, RunLockedError, run_lock


def test_second_acquisition_refused_and_released(tmp_path):
    run = tmp_path / "run"
    with run_lock(run, argv=["lmselect", "run"]) as lock:
        info = json.loads(lock.read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and info["argv"] == ["lmselect", "run"]
        with pytest.raises(RunLockedError) as e:
            with run_lock(run):
                pass  # pragma: no cover
        msg = str(e.value)
        assert f"in use by pid {os.getpid()} on host {socket.gethostname()} since {info['started']}" in msg
        assert str(run / LOCK_NAME) in msg and "--out" in msg and "\n" not in msg
    assert not (run / LOCK_NAME).exists()
    with run_lock(run):  # free again
        pass


def test_refused_in_a_subprocess(tmp_path):
    run = tmp_path / "run"
    code = textwrap.dedent(
        f"""
        import sys
        from lmselect.runlock import run_lock, RunLockedError
        try:
            with run_lock({str(run)!r}):
                print("acquired")
        except RunLockedError as e:
            print("refused:", e)
            sys.exit(3)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    with run_lock(run):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 3, r.stderr
        assert f"in use by pid {os.getpid()}" in r.stdout
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and "acquired" in r.stdout, r.stderr


def test_stale_lock_of_dead_process_taken_over(tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is now free (reuse within the test is practically impossible)
    (run / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "then"}))
    with caplog.at_level("WARNING", logger="lmselect"):
        with run_lock(run) as lock:
            assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"stale lock of pid {dead.pid}" in caplog.text
    assert not list(run.glob(".lock*"))


def test_lock_of_other_host_is_respected(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": "T"}))
    with pytest.raises(RunLockedError, match="pid 1 on host elsewhere.example since T"):
        with run_lock(run):
            pass  # pragma: no cover
    assert (run / LOCK_NAME).exists()  # not ours to remove


def test_released_on_error(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ValueError):
        with run_lock(run):
            raise ValueError("boom")
    assert not (run / LOCK_NAME).exists()
    assert issubclass(RunLockedError, LmselectError)


# ---- Slurm requeue, explicit take-over, SIGTERM -------------------------------------------------------------------


def test_slurm_job_identity():
    from lmselect.runlock import slurm_job

    assert slurm_job({}) is None
    assert slurm_job({"SLURM_JOB_ID": "4242"}) == "4242"
    # an array task keeps ARRAYJOB_TASK across a requeue (its SLURM_JOB_ID is the task's own id)
    assert slurm_job({"SLURM_JOB_ID": "4250", "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "7"}) == "4242_7"


def test_requeued_slurm_job_takes_over_its_lock_from_another_host(tmp_path, monkeypatch, caplog):
    run = tmp_path / "run"
    run.mkdir()
    holder = {"pid": 77, "host": "node-a.example", "started": "T", "slurm_job": "4242"}
    (run / LOCK_NAME).write_text(json.dumps(holder))
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "999")  # another job: refused, and the message names the way out
    with pytest.raises(RunLockedError) as e:
        with run_lock(run):
            pass  # pragma: no cover
    msg = str(e.value)
    assert "pid 77 on host node-a.example (Slurm job 4242) since T" in msg and "--take-over-lock" in msg
    assert "\n" not in msg
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # the same job, requeued onto this host
    with caplog.at_level("WARNING", logger="lmselect"):
        with run_lock(run) as lock:
            assert json.loads(lock.read_text())["slurm_job"] == "4242"
            assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "Slurm job 4242" in caplog.text and "requeued" in caplog.text
    assert not list(run.glob(".lock*"))


def test_explicit_take_over(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": "T"}))
    with run_lock(run, take_over=True) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    (run / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": "T"}))
    monkeypatch.setenv("LMSELECT_TAKE_OVER_LOCK", "1")  # what --take-over-lock sets
    with run_lock(run):
        pass
    # never from a live process of this very run (its own pid)
    with run_lock(run):
        with pytest.raises(RunLockedError):
            with run_lock(run):
                pass  # pragma: no cover


def test_two_runs_on_one_directory_one_line(tiny_recipe, tmp_path):
    """A second `lmselect run` into a directory held by a live job ends in one line, exit 2, before compute."""
    run = tmp_path / "run"
    with run_lock(run):
        r = subprocess.run([sys.executable, "-m", "lmselect.cli", "run", str(tiny_recipe), "--out", str(run),
                            "--no-report"], capture_output=True, text=True, timeout=120, env=_env())
    assert r.returncode == 2, r.stderr
    line = [x for x in r.stderr.splitlines() if x.startswith("lmselect run:")]
    assert len(line) == 1 and "is in use by pid" in line[0] and "--take-over-lock" in line[0], r.stderr
    assert "Traceback" not in r.stderr


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"), OMP_NUM_THREADS="1",
                HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def test_sigterm_stops_run_cleanly(tiny_recipe, tmp_path):
    """SIGTERM (Slurm's time limit / preemption) ends `lmselect run` like Ctrl-C: one line, exit 143, the lock
    released, nothing half-written that looks complete. (That a rerun resumes an interrupted run is the method
    contract's interruption test and the two-node test's; here: nothing stands in a rerun's way.)"""
    import signal
    import time

    from lmselect.artifacts import is_complete

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "lmselect.cli", "run", str(tiny_recipe), "--out", str(run), "--no-report",
           "--methods=random", "--rounds=1"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.time() + 120
    # wait until it has started computing: the warm-up's train log exists
    while time.time() < deadline and not list(run.glob("warmup/*/train_log.jsonl")) and p.poll() is None:
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 143, err[-3000:]
    lines = [x for x in err.splitlines() if x.startswith("lmselect run:")]
    assert lines == ["lmselect run: stopped by SIGTERM (time limit, preemption or a failed rank); rerun the same "
                     "command to resume"], err[-3000:]
    assert "Traceback" not in err
    assert not (run / LOCK_NAME).exists()
    assert not is_complete(run, kind="run")
    # the warm-up target may have finished before the signal landed (the step in flight finishes, issue 29's
    # preemption rule); then it is whole: its weights are there beside the manifest
    if is_complete(run / "warmup" / "target", kind="checkpoint"):
        assert list((run / "warmup" / "target").glob("*.safetensors"))
    assert not list(run.rglob(".*.tmp-*"))  # no temp file of an atomic write left over
    with run_lock(run):  # a rerun is not refused
        pass
