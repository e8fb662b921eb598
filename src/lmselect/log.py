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

log = logging.getLogger("lmselect")


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
    ) -> None:
        self.path = Path(jsonl_path) if jsonl_path else None
        self.stdout_every = max(1, int(stdout_every))
        self.prefix = prefix
        self._fh = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a" if append else "w", buffering=1)
        self._tb = None
        self._wandb = None
        for b in backends:
            if b == "tensorboard":
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except Exception as e:  # pragma: no cover - optional extra
                    raise RuntimeError("tensorboard logging needs `pip install lmselect[tensorboard]`") from e
                self._tb = SummaryWriter(log_dir=str((self.path.parent if self.path else Path(".")) / "tb"))
            elif b == "wandb":  # pragma: no cover - optional extra
                import os

                import wandb

                os.environ.setdefault("WANDB_MODE", "offline")
                self._wandb = wandb.init(name=run_name, dir=str(self.path.parent if self.path else "."), reinit=True)
            elif b not in ("stdout", "jsonl"):
                raise ValueError(f"unknown logging backend '{b}' (stdout, jsonl, tensorboard, wandb)")

    def log(self, step: int, **metrics: Any) -> None:
        rec = {"step": int(step), "time": time.time(), **{k: _clean(v) for k, v in metrics.items()}}
        if self._fh is not None:
            self._fh.write(json.dumps(rec) + "\n")
        if step % self.stdout_every == 0:
            body = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items() if v is not None)
            log.info("%sstep %d %s", self.prefix, step, body)
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:  # pragma: no cover
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:  # pragma: no cover
            self._wandb.finish()

    def __enter__(self) -> "MetricLogger":
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
