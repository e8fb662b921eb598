"""One logger interface for metrics: stdout, a jsonl file, and optional tensorboard / wandb backends.

    logger = MetricLogger(out_dir / "train_log.jsonl", stdout_every=10)
    logger.log(step, loss=2.3, tokens_per_s=1.2e4)
    logger.close()

The jsonl file is the source of truth for reports (``lmselect report`` reads it, never live state). Optional
backends are off by default and need their extras (``pip install lmselect[tensorboard]`` / ``[wandb]``); wandb is
started in offline mode unless the user configured it otherwise, so nothing needs the network.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

from lmselect.artifacts import LmselectError

log = logging.getLogger("lmselect")

BACKENDS: tuple[str, ...] = ("stdout", "jsonl", "tensorboard", "wandb")


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _tensorboard_writer(log_dir: Path) -> Any:
    """A tensorboard ``SummaryWriter`` (the ``tensorboard`` extra), or a one-line error naming the extra."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:
        raise LmselectError("tensorboard logging needs the extra: pip install 'lmselect[tensorboard]'") from None
    log_dir.mkdir(parents=True, exist_ok=True)
    return SummaryWriter(log_dir=str(log_dir))


def _wandb_run(name: str | None, base: Path, project: str | None, config: dict[str, Any] | None) -> Any:
    """A wandb run in offline mode unless ``WANDB_MODE`` is set (nothing touches the network by default)."""
    import os

    try:
        import wandb
    except Exception:
        raise LmselectError("wandb logging needs the extra: pip install 'lmselect[wandb]'") from None
    mode = os.environ.get("WANDB_MODE", "offline")
    base.mkdir(parents=True, exist_ok=True)
    return wandb.init(project=project or "lmselect", name=name, dir=str(base), mode=mode, config=config or {},
                      reinit=True)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)


class MetricLogger:
    def __init__(
        self,
        jsonl_path: str | Path | None,
        *,
        stdout_every: int = 1,
        prefix: str = "",
        backends: Sequence[str] = (),
        run_name: str | None = None,
        append: bool = True,
        tb_dir: str | Path | None = None,
        wandb_project: str | None = None,
        wandb_config: dict[str, Any] | None = None,
    ) -> None:
        """``backends``: any of ``stdout``, ``jsonl`` (always on when ``jsonl_path`` is given; stdout honours
        ``stdout_every``), ``tensorboard`` (event files in ``tb_dir``, default ``<jsonl dir>/tb``) and ``wandb``
        (offline unless ``WANDB_MODE`` says otherwise; files under the jsonl directory)."""
        self.path = Path(jsonl_path) if jsonl_path else None
        self.stdout_every = max(1, int(stdout_every))
        self.prefix = prefix
        self._fh = None
        base = self.path.parent if self.path is not None else Path(".")
        unknown = [b for b in backends if b not in BACKENDS]
        if unknown:
            raise LmselectError(f"unknown logging backend '{unknown[0]}' (choose from {', '.join(BACKENDS)})")
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a" if append else "w", buffering=1)
        self._tb = None
        self._wandb = None
        if "tensorboard" in backends:
            self._tb = _tensorboard_writer(Path(tb_dir) if tb_dir is not None else base / "tb")
        if "wandb" in backends:
            self._wandb = _wandb_run(run_name, base, wandb_project, wandb_config)

    def log(self, step: int, **metrics: Any) -> None:
        rec = {"step": int(step), "time": time.time(), **{k: _clean(v) for k, v in metrics.items()}}
        if self._fh is not None:
            self._fh.write(json.dumps(rec) + "\n")
        if step % self.stdout_every == 0:
            body = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items() if v is not None)
            log.info("%sstep %d %s", self.prefix, step, body)
        if self._tb is not None or self._wandb is not None:
            scalars = {k: float(v) for k, v in rec.items() if k not in ("step", "time") and _is_scalar(v)}
            if self._tb is not None:
                for k, v in scalars.items():
                    self._tb.add_scalar(k, v, int(step))
            if self._wandb is not None:
                self._wandb.log(scalars, step=int(step))

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *a: Any) -> None:
        self.close()


def _clean(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item):
        try:
            v = v.item()
        except Exception:
            return str(v)
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a jsonl log; a truncated final line (killed writer) is ignored."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class Progress:
    """Progress of a long loop that fits where the output goes.

    On a terminal: a tqdm bar (``\\r`` updates, redrawn in place). Anywhere else (a log file, a pipe, CI): no bar and
    no ``\\r``, but a plain log line at most every ``interval_s`` seconds, so a long run shows it is alive between
    its metric lines without filling the file with carriage-return frames.
    """

    def __init__(
        self,
        total: int,
        *,
        initial: int = 0,
        desc: str = "train",
        unit: str = "step",
        stream: Any = None,
        tty: bool | None = None,
        interval_s: float = 30.0,
        enabled: bool = True,
    ) -> None:
        import sys

        self.total, self.n, self.desc, self.unit = int(total), int(initial), desc, unit
        self.stream = stream if stream is not None else sys.stderr
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty()) if callable(isatty) else False
        self.tty, self.enabled, self.interval_s = tty, enabled, float(interval_s)
        self._bar = None
        self._t0 = self._last = time.monotonic()
        self._n0 = self.n
        if enabled and tty:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._bar = tqdm(total=self.total, initial=self.n, desc=desc, unit=unit, file=self.stream,
                             dynamic_ncols=True, leave=False)
            # log lines (the metric lines every log_every steps) go above the bar instead of through it
            self._redirect = logging_redirect_tqdm(loggers=[logging.getLogger()])
            self._redirect.__enter__()

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.n += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)
            return
        now = time.monotonic()
        if now - self._last >= self.interval_s and self.n < self.total:
            self._last = now
            rate = (self.n - self._n0) / max(now - self._t0, 1e-9)
            eta = (self.total - self.n) / rate if rate > 0 else float("nan")
            body = " ".join(f"{k}={_fmt(v)}" for k, v in postfix.items() if v is not None)
            log.info("%s: %s %d/%d (%.0f%%), %.2f %s/s, eta %s %s", self.desc, self.unit, self.n, self.total,
                     100.0 * self.n / max(self.total, 1), rate, self.unit, _duration(eta), body)

    def write(self, line: str) -> None:
        """Print a line without breaking the bar (tqdm.write on a terminal)."""
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            self.stream.write(line + "\n")

    def close(self) -> None:
        if self._bar is not None:
            self._redirect.__exit__(None, None, None)
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *a: Any) -> None:
        self.close()


def track(iterable: Any, *, total: int | None = None, desc: str = "", unit: str = "it", enabled: bool = True) -> Any:
    """``for x in track(items, desc=...)``: a :class:`Progress` over an iterable (a bar on a terminal, periodic log
    lines elsewhere)."""
    n = total if total is not None else len(iterable)
    with Progress(n, desc=desc, unit=unit, enabled=enabled) as bar:
        for x in iterable:
            yield x
            bar.update(1)


def _duration(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
