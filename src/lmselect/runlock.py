"""Run-directory lock (interim; replaced by the full implementation)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Iterator

from lmselect.errors import LmselectError


@contextlib.contextmanager
def run_lock(run_dir: str | Path, enabled: bool = True) -> Iterator[None]:
    if not enabled:
        yield
        return
    p = Path(run_dir)
    p.mkdir(parents=True, exist_ok=True)
    lock = p / ".lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        raise LmselectError(f"{p} is in use (lock {lock}: {lock.read_text()})") from None
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
    os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
