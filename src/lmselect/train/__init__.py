"""Pretraining: the loop (``train``), schedules, HF-format checkpoints with exact resume, DDP / FSDP2.

Names are imported lazily so ``import lmselect.train.hooks`` stays light.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "TrainConfig": "lmselect.train.loop",
    "train": "lmselect.train.loop",
    "OptimConfig": "lmselect.train.schedules",
    "lr_at": "lmselect.train.schedules",
    "save_checkpoint": "lmselect.train.checkpoint",
    "load_checkpoint_model": "lmselect.train.checkpoint",
    "load_training_state": "lmselect.train.checkpoint",
    "latest_checkpoint": "lmselect.train.checkpoint",
    "TokenSelector": "lmselect.train.hooks",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmselect.train' has no attribute {name!r}")
