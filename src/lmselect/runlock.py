"""A lock on an output directory, so two lmselect processes never write one run at once.

    with run_lock(out_dir):
        ...  # every stage of the run

The lock is the file ``RUN/.lock`` (JSON: pid, host, started, argv), created with ``O_CREAT | O_EXCL`` so exactly
one process wins even when two start at the same moment. Why a file and not ``fcntl.flock``: the holder must be
*nameable* in the refusal ("in use by pid N on host H since T"), and a file survives on network filesystems where
advisory locks are unreliable. A lock left by a killed process on this host (its pid is gone) is stale and taken
over with a warning naming the dead pid; a lock from another host cannot be checked and is respected, with two
exceptions. A Slurm job that is requeued (time limit, preemption, node failure) may restart on another node: the lock
records the job's id (``SLURM_JOB_ID``, or ``SLURM_ARRAY_JOB_ID_SLURM_ARRAY_TASK_ID`` for an array task, which Slurm
keeps across a requeue), and the same job id taking the lock again is the requeued job replacing its own dead
incarnation, so it takes over (Slurm never runs two incarnations of one job at once). Anything else that is known to
be gone is taken over by the explicit ``--take-over-lock`` flag (or ``LMSELECT_TAKE_OVER_LOCK=1``), which the refusal
names. Under torchrun only rank 0 should take it (the caller decides; this module knows nothing of ranks).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any, Iterator

from lmselect.artifacts import LmselectError, now_iso

log = logging.getLogger("lmselect")

LOCK_NAME = ".lock"
TAKE_OVER_ENV = "LMSELECT_TAKE_OVER_LOCK"  # "1": take over any lock (the --take-over-lock flag sets it)


class RunLockedError(LmselectError):
    """The run directory is held by another live process."""


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def slurm_job(env: dict[str, str] | None = None) -> str | None:
    """This process's Slurm job identity, stable across a requeue: ``ARRAYJOB_TASK`` for an array task, else
    ``SLURM_JOB_ID``; None outside Slurm."""
    env = os.environ if env is None else env
    array, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return env.get("SLURM_JOB_ID") or None


def _take_over_requested() -> bool:
    return os.environ.get(TAKE_OVER_ENV, "").strip().lower() in ("1", "true", "yes")


def _read_holder(lock: Path) -> dict[str, Any] | None:
    """The lock's JSON, or None when it vanished; an unreadable / half-written lock reads as an empty holder."""
    try:
        text = lock.read_text()
    except FileNotFoundError:
        return None
    try:
        d = json.loads(text)
        return d if isinstance(d, dict) else {}
    except ValueError:
        return {}


def _try_create(lock: Path, info: dict[str, Any]) -> bool:
    """Atomically create ``lock`` holding ``info``; False when it already exists."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    except OSError as e:
        raise LmselectError(f"{lock}: cannot create the run lock: {os.strerror(e.errno or errno.EIO).lower()}") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(info) + "\n")
    except OSError as e:
        lock.unlink(missing_ok=True)
        raise LmselectError(f"{lock}: cannot write the run lock: {os.strerror(e.errno or errno.EIO).lower()}") from None
    return True


def acquire(run_dir: str | Path, argv: list[str] | None = None, *, take_over: bool | None = None) -> Path:
    """Take the lock of ``run_dir`` (created if missing) or raise :class:`RunLockedError` naming the holder.

    ``take_over`` (default: ``LMSELECT_TAKE_OVER_LOCK``): take over a lock held by anyone (the caller knows the
    holder is gone, e.g. a job that died on a node that no longer answers)."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LmselectError(f"{run_dir}: cannot create the run directory: {os.strerror(e.errno or errno.EIO).lower()}") from None
    lock = run_dir / LOCK_NAME
    host = socket.gethostname()
    info = {"pid": os.getpid(), "host": host, "started": now_iso(), "argv": list(sys.argv if argv is None else argv)}
    job = slurm_job()
    if job is not None:
        info["slurm_job"] = job
    force = _take_over_requested() if take_over is None else take_over
    for _ in range(5):  # a few rounds: another process may take over a stale lock between our read and unlink
        if _try_create(lock, info):
            return lock
        holder = _read_holder(lock)
        if holder is None:  # released between our attempt and the read: try again
            continue
        pid, h_host, since = holder.get("pid"), holder.get("host"), holder.get("started", "?")
        h_job = holder.get("slurm_job")
        alive_here = h_host == host and isinstance(pid, int) and (_pid_alive(pid) or pid == os.getpid())
        if h_host == host and isinstance(pid, int) and not alive_here:
            log.warning("%s: taking over the stale lock of pid %d (no longer running on %s)", run_dir, pid, host)
        elif job is not None and h_job == job and not alive_here:
            log.warning("%s: taking over the lock of Slurm job %s (pid %s on %s): the job was requeued", run_dir,
                        job, pid, h_host)
        elif force and not (h_host == host and pid == os.getpid()):
            log.warning("%s: taking over the lock of pid %s on host %s since %s (--take-over-lock)", run_dir, pid,
                        h_host, since)
        else:
            who = f"pid {pid} on host {h_host}" + (f" (Slurm job {h_job})" if h_job else "")
            raise RunLockedError(
                f"{run_dir} is in use by {who} since {since} (lock {lock}); wait for it or use another --out; "
                "if that process is gone (e.g. its node died), rerun with --take-over-lock"
            )
        # rename (atomic) rather than unlink, so that of two processes taking over at once only one removes it
        grave = lock.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
        try:
            os.replace(lock, grave)
        except FileNotFoundError:
            continue
        if _read_holder(grave) != holder:  # we moved a fresh lock someone else had just taken: put it back
            with contextlib.suppress(OSError):
                os.link(grave, lock)  # fails (and leaves the newer lock) if yet another process took it meanwhile
            grave.unlink(missing_ok=True)
            continue
        grave.unlink(missing_ok=True)
    raise RunLockedError(f"{run_dir}: could not take the run lock {lock} (other processes keep taking it)")


def release(lock: str | Path) -> None:
    """Remove ``lock`` if this process still holds it."""
    lock = Path(lock)
    holder = _read_holder(lock)
    if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def run_lock(run_dir: str | Path, argv: list[str] | None = None, *, take_over: bool | None = None) -> Iterator[Path]:
    """Hold the lock of ``run_dir`` for the duration of the ``with`` block (released on exceptions too)."""
    lock = acquire(run_dir, argv, take_over=take_over)
    try:
        yield lock
    finally:
        release(lock)
