"""Pretrain a model preset on a pool, one shard of it, or a selection; resumable, data parallel under torchrun.

    lmselect train --pool POOL [--shard I | --selection FILE.npy|DIR] --out DIR [--config YAML] [--steps N]
                   [--init-from CKPT [--continue-optimizer]] [--key.sub=value ...]

Without --shard / --selection every training shard of the pool is used (never the validation hold-out).
Data parallel: ``torchrun --nproc_per_node 8 -m lmselect.cli train ...`` (rank 0 writes the checkpoint and logs).
Rerunning the same command resumes from the newest checkpoint in --out, or does nothing when it is finished.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from lmselect.artifacts import LmselectError, read_manifest
from lmselect.config import load_config, replace
from lmselect.data.pool import TokenPool


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pool", required=True, help="pool directory (lmselect prepare)")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--shard", type=int, default=None, help="train on this shard of the pool")
    src.add_argument("--selection", default=None, help="selected.npy of sequence ids, or a selection directory")
    parser.add_argument("--out", required=True, help="output checkpoint directory (resumed when it exists)")
    parser.add_argument("--config", default=None, help="YAML file of TrainConfig keys")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides steps / tokens)")
    parser.add_argument("--init-from", default=None, help="checkpoint whose weights this run starts from")
    parser.add_argument(
        "--continue-optimizer", action="store_true", help="with --init-from: continue its optimizer state too"
    )


def selection_ids(pool, shard: int | None = None, selection: str | Path | None = None) -> np.ndarray:
    """Training sequence ids: a selection file / directory, one shard, or all training shards."""
    if selection is not None:
        p = Path(selection)
        if p.is_dir():
            read_manifest(p, kind="selection")
            p = p / "selected.npy"
        if not p.is_file():
            raise LmselectError(f"{p}: selection file not found")
        try:
            ids = np.load(p)
        except (ValueError, OSError) as e:
            raise LmselectError(f"{p}: not a .npy array of sequence ids ({e})") from None
        return ids
    ids = pool.ids(shard)
    if ids.size == 0:
        raise LmselectError(f"{pool.path}: shard {shard} is empty (pool has shards 0..{pool.n_shards - 1})")
    return ids


def preflight(args: argparse.Namespace) -> Any:
    """What ``lmselect train`` checks before any compute: the config (file and overrides), the pool, the checkpoint
    to start from; ``lmselect slurm train`` calls it before writing a script. Returns the TrainConfig."""
    from lmselect.train.loop import TrainConfig  # torch: `lmselect train --help` and slurm's preflight stay light

    cfg = load_config(TrainConfig, args.config, getattr(args, "overrides", []))
    read_manifest(args.pool, kind="pool")
    if args.init_from is not None and not Path(args.init_from).exists():
        raise LmselectError(f"--init-from {args.init_from}: not found")
    return cfg


def run(args: argparse.Namespace) -> int:
    # torch, as in preflight
    from lmselect.train.distributed import cleanup
    from lmselect.train.loop import train

    cfg = preflight(args)
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps, tokens=None)
    if args.continue_optimizer:
        if args.init_from is None:
            raise LmselectError("--continue-optimizer needs --init-from")
        cfg = replace(cfg, continue_optimizer=True)
    pool = TokenPool(args.pool)
    ids = selection_ids(pool, args.shard, args.selection)
    try:
        result = train(cfg, pool, ids, args.out, init_from=args.init_from)
    finally:
        cleanup()
    print(json.dumps(result))
    return 0
