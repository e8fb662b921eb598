"""LoRDO communication and a small loss comparison (train/lordo.py, METHODS §5).

    python bench/lordo_comm.py                                   # bytes table + 2-worker CPU run, 40 steps
    python bench/lordo_comm.py --steps 100 --sync-every 8 --rank 16 --skip-run

Part 1, bytes all-reduced per optimizer step (fp32 payload each worker contributes; a ring all-reduce puts
2(M−1)/M of it on the wire per worker, the same factor for every scheme), for the pythia-160m / 410m shapes
(built on the meta device, vocab 50304):
  * DDP: every gradient, every step.
  * low-rank DDP: GaLore-style, the r × b projected gradient of every low-rank matrix (embeddings in full) per step.
  * LoRDO: the full pseudo-gradient θ₀ − θ of every parameter once every K_x steps (what LordoOptimizer sends;
    the basis Q is recomputed locally from the averaged pseudo-gradient, so it is never sent).

Part 2, a small real run: 2 gloo workers on CPU, debug preset, a pool prepared from data/demo (seq 64), the same
steps / batch / LR for AdamW under DDP and for LoRDO; prints the final training loss and the held-out loss of each
final checkpoint (for LoRDO the saved model is the workers' mean).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from lmselect.models.presets import build_model
from lmselect.train.lordo import LordoConfig, communication_bytes

REPO = Path(__file__).resolve().parents[1]


def bytes_table(presets: list[str], lcfg: LordoConfig) -> list[dict[str, Any]]:
    rows = []
    for name in presets:
        with torch.device("meta"):
            model = build_model(name, 50304, seed=0)
        acct = communication_bytes(model, lcfg)
        rows.append({"preset": name, "params": acct["params"], "ddp_MB": acct["ddp"] / 2**20,
                     "lowrank_ddp_MB": acct["lowrank_ddp"] / 2**20, "lordo_MB": acct["lordo"] / 2**20,
                     "ddp/lordo": acct["ddp_over_lordo"], "lowrank_ddp/lordo": acct["lowrank_ddp_over_lordo"]})
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, pool_dir: str, out_dir: str, cfg_dict: dict[str, Any]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from lmselect.config import from_dict
    from lmselect.data.pool import TokenPool
    from lmselect.train.distributed import cleanup
    from lmselect.train.loop import TrainConfig, train

    pool = TokenPool(pool_dir)
    try:
        train(from_dict(TrainConfig, cfg_dict), pool, pool.ids(0), out_dir)
    finally:
        cleanup()


@torch.no_grad()
def heldout_loss(ckpt: Path, pool) -> float:
    from lmselect.models.losses import token_ce
    from lmselect.train.checkpoint import load_checkpoint_model

    model = load_checkpoint_model(ckpt).eval()
    ids = pool.ids(-1)
    return float(torch.cat([token_ce(model(input_ids=x).logits, x).flatten()
                            for x in (pool.batch(ids[i:i + 16]) for i in range(0, len(ids), 16))]).mean())


def small_run(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    from lmselect.data.pool import TokenPool
    from lmselect.data.prepare import PrepareConfig, prepare
    from lmselect.log import read_jsonl

    pool_dir = prepare(PrepareConfig(inputs=[str(REPO / "data/demo/corpus/*.jsonl.gz")], vocab_size=512, seq_len=64, n_shards=1,
                                     val_sequences=64, max_docs=args.max_docs, workers=1), work / "pool", progress=False)
    pool = TokenPool(pool_dir)
    base = {"preset": "debug", "steps": args.steps, "global_batch": 16, "micro_batch": 8, "log_every": 1,
            "device": "cpu", "dtype": "float32", "seed": 0,
            "optim": {"lr": args.lr, "schedule": "cosine", "warmup_steps": 4}}
    runs = {"adamw_ddp": {**base},
            "lordo": {**base, "optimizer": "lordo",
                      "lordo": {"rank": args.rank, "sync_every": args.sync_every, "omega": args.omega}}}
    out = []
    for name, cfg in runs.items():
        t0 = time.perf_counter()
        mp.spawn(_worker, args=(2, _free_port(), str(pool_dir), str(work / name), cfg), nprocs=2, join=True)
        losses = [r["loss"] for r in read_jsonl(work / name / "train_log.jsonl") if "loss" in r]
        out.append({"run": name, "steps": len(losses), "first_loss": losses[0], "final_loss": losses[-1],
                    "mean_last5": sum(losses[-5:]) / 5, "heldout_loss": heldout_loss(work / name, pool),
                    "seconds": round(time.perf_counter() - t0, 1)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="pythia-160m,pythia-410m")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--sync-every", type=int, default=32)
    ap.add_argument("--omega", type=float, default=0.9)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--run-rank", type=int, default=8, help="LoRDO rank of the small debug run (d_model 64)")
    ap.add_argument("--run-sync-every", type=int, default=8, help="K_x of the small debug run")
    ap.add_argument("--max-docs", type=int, default=3000)
    ap.add_argument("--skip-run", action="store_true")
    args = ap.parse_args()
    lcfg = LordoConfig(rank=args.rank, sync_every=args.sync_every, omega=args.omega)
    for row in bytes_table(args.presets.split(","), lcfg):
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
    if not args.skip_run:
        args.rank, args.sync_every = args.run_rank, args.run_sync_every
        with tempfile.TemporaryDirectory() as tmp:
            for row in small_run(args, Path(tmp)):
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))


if __name__ == "__main__":
    main()
