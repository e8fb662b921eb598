#!/usr/bin/env python3
"""Bytes communicated per BLISS outer step and per target training step, at M GPUs (on paper, from the code).

    python bench/multinode_comm.py                                   # the paper recipe's shapes, M = 8 and 64
    python bench/multinode_comm.py --recipe demo --gpus 8 64 512

What each rank contributes to the collectives (fp32 payload; a ring all-reduce or all-gather puts 2(M−1)/M resp.
(M−1)/M of the full tensor on the wire per rank, so the wire bytes grow by < 2x from 8 to any M), read off the code:

* target step (``train/loop.py``, DDP): every gradient once per optimizer step, N_target elements — the DDP row of
  ``bench/lordo_comm.py`` (``train.lordo.communication_bytes``).
* BLISS outer step (``select/bliss/solver.py``), per outer step with K inner steps, J z-solve steps and H hyper
  batches: K proxy-gradient all-reduces (N_proxy each) + one v (N_proxy) + J Hessian-vector products (N_proxy each)
  + (1 + H) score-model gradients (N_score: the score model's backbone + head, the unused LM head excluded) +
  O(batch) scalars (scores and c_i all-gathered, a few counts): (K + 1 + J)·N_proxy + (1 + H)·N_score.

The scores are not a cost here: each rank scores its own part of the pool and writes it (no collective).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from lmselect.config import load_config
from lmselect.models.presets import build_model
from lmselect.recipe import RECIPES_DIR, Recipe
from lmselect.select.bliss.config import resolve_profile
from lmselect.train.lordo import LordoConfig, communication_bytes

VOCAB = 50304


def n_params(preset: str) -> tuple[int, int]:
    """(trainable parameters of the causal LM, the same minus its output embedding = a score model's backbone)."""
    with torch.device("meta"):
        lm = build_model(preset, VOCAB, seed=0)
    n = sum(p.numel() for p in lm.parameters() if p.requires_grad)
    out = sum(p.numel() for p in lm.get_output_embeddings().parameters())
    tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    return n, n - (0 if tied else out)


def table(recipe_name: str, gpus: list[int]) -> dict[str, Any]:
    path = Path(recipe_name)
    if not path.is_file():
        path = RECIPES_DIR / (recipe_name if recipe_name.endswith(".yaml") else f"{recipe_name}.yaml")
    r = load_config(Recipe, path, [])  # the shapes only: no pool needs to exist
    b = resolve_profile(r.bliss)
    n_proxy, n_score_backbone = n_params(r.proxy.preset)
    with torch.device("meta"):
        d = build_model(r.proxy.preset, VOCAB, seed=0).config.hidden_size
    n_score = n_score_backbone + d + 1  # backbone + linear head (d weights, 1 bias)
    with torch.device("meta"):
        target = build_model(r.target.preset, VOCAB, seed=0)
    ddp = communication_bytes(target, LordoConfig())["ddp"]  # bytes: 4 per gradient element
    K, J, H = int(b.inner_steps), int(b.z_steps), int(b.hyper_batches)
    bliss_elems = (K + 1 + J) * n_proxy + (1 + H) * n_score + 4 * int(b.batch_size)
    rows = []
    for m in gpus:
        ring = 2 * (m - 1) / m
        rows.append({"gpus": m, "bliss_outer_step_payload_MB": 4 * bliss_elems / 2**20,
                     "bliss_outer_step_wire_MB_per_gpu": ring * 4 * bliss_elems / 2**20,
                     "target_step_payload_MB": ddp / 2**20, "target_step_wire_MB_per_gpu": ring * ddp / 2**20})
    return {"recipe": r.name, "proxy": r.proxy.preset, "target": r.target.preset, "N_proxy": n_proxy,
            "N_score": n_score, "N_target": int(ddp // 4), "K_inner": K, "J_z_steps": J, "H_hyper_batches": H,
            "formula": "(K+1+J)*N_proxy + (1+H)*N_score fp32 elements per outer step", "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="recipes/paper-pythia-410m.yaml")
    ap.add_argument("--gpus", type=int, nargs="+", default=[8, 64])
    args = ap.parse_args()
    res = table(args.recipe, args.gpus)
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}))
    print(f"{'GPUs':>5} | {'BLISS outer step: payload / wire per GPU (MB)':>46} | {'target step: payload / wire (MB)':>34}")
    for row in res["rows"]:
        print(f"{row['gpus']:>5} | {row['bliss_outer_step_payload_MB']:>21.1f} / {row['bliss_outer_step_wire_MB_per_gpu']:>22.1f} "
              f"| {row['target_step_payload_MB']:>16.1f} / {row['target_step_wire_MB_per_gpu']:>15.1f}")


if __name__ == "__main__":
    main()
