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
