"""Helpers shared by the training tests (importable by spawned worker processes, unlike fixtures)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def make_cfg(**overrides: Any):
    """TrainConfig for CPU tests: debug preset, fp32, 4-sequence global batch in 2 micro-batches, log every step."""
    from lmselect.config import deep_merge, from_dict
    from lmselect.train.loop import TrainConfig

    base = {"preset": "debug", "steps": 4, "global_batch": 4, "micro_batch": 2, "log_every": 1, "seed": 3,
            "device": "cpu", "dtype": "float32", "optim": {"lr": 3e-3, "schedule": "constant"}}
    return from_dict(TrainConfig, deep_merge(base, overrides))


def step_losses(out_dir: str | Path) -> list[float]:
    from lmselect.log import read_jsonl

    return [r["loss"] for r in read_jsonl(Path(out_dir) / "train_log.jsonl") if "loss" in r]


def weights(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(ckpt_dir) / "model.safetensors"))


def ddp_worker(rank: int, world: int, port: int, pool_dir: str, out_dir: str, overrides: dict[str, Any]) -> None:
    """One rank of a gloo data-parallel run, as torchrun would set it up (env vars), training through train()."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from lmselect.data.pool import TokenPool
    from lmselect.train.distributed import cleanup
    from lmselect.train.loop import train

    pool = TokenPool(pool_dir)
    try:
        train(make_cfg(**overrides), pool, pool.ids(0), out_dir)
    finally:
        cleanup()


def recording_rho1(vocab_size: int, keep_fraction: float = 0.6):
    """RHO-1 with a fixed reference (a seeded untrained debug model) that records every step's global mask."""
    from lmselect.models.presets import build_model
    from lmselect.select.rho1 import Rho1Selector

    class RecordingRho1(Rho1Selector):
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, **k)
            self.masks: list[torch.Tensor] = []

        def on_mask(self, mask: torch.Tensor) -> None:
            super().on_mask(mask)
            self.masks.append(mask.detach().cpu().clone())

    return RecordingRho1(build_model("debug", vocab_size, seed=11), keep_fraction=keep_fraction)


def ddp_rho1_worker(rank: int, world: int, port: int, pool_dir: str, out_dir: str, overrides: dict[str, Any]) -> None:
    """One rank of a gloo run training with a recording RHO-1 selector; saves its masks to out_dir/masks{rank}.pt."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from lmselect.data.pool import TokenPool
    from lmselect.train.distributed import cleanup
    from lmselect.train.loop import train

    pool = TokenPool(pool_dir)
    sel = recording_rho1(pool.vocab_size)
    try:
        train(make_cfg(**overrides), pool, pool.ids(0), out_dir, token_selector=sel)
        torch.save(sel.masks, Path(out_dir) / f"masks{rank}.pt")
    finally:
        cleanup()
