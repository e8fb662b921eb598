"""Seconds per BLISS outer step: per-sample (the released code's loops) vs batched c_i / hypergradient.

Both solvers start from identical copies of the proxy, target and score model and see the same batches, so their
hypergradients must agree; the script prints the max abs / relative difference and the speed ratio.

    python bench/bliss_step.py                      # CPU default: pythia-14m, batch 8, seq 128, float32
    python bench/bliss_step.py --preset pythia-160m --batch 32 --seq 1024 --micro-batch 8 --device cuda  # bf16
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from lmselect.data.valset import ValidationSet
from lmselect.models.presets import build_model
from lmselect.select.bliss import BilevelSolver, BlissConfig, init_score_model


def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="pythia-160m" if cuda else "pythia-14m")
    ap.add_argument("--target-preset", default=None, help="default: same as --preset")
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--batch", type=int, default=32 if cuda else 8)
    ap.add_argument("--seq", type=int, default=1024 if cuda else 128)
    ap.add_argument("--micro-batch", type=int, default=8 if cuda else 0)
    ap.add_argument("--val-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2, help="timed outer steps per implementation (after 1 warm-up)")
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--dtype", default="auto", help="autocast dtype: auto (bf16 on CUDA), float32, bfloat16")
    ap.add_argument("--batched-dots", default="jvp", choices=["jvp", "double_backward"])
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)

    proxy = build_model(a.preset, a.vocab, seed=0, device=dev)
    target = build_model(a.target_preset or a.preset, a.vocab, seed=1, device=dev)
    scorer = init_score_model(proxy, seed=2)
    g = torch.Generator().manual_seed(0)
    n_val = a.val_batch * (a.steps + 1)
    val_ids = torch.randint(0, a.vocab, (n_val, min(a.seq, 256)), generator=g)
    mask = torch.zeros(n_val, val_ids.shape[1] - 1, dtype=torch.bool)
    mask[:, -3:] = True
    vs = ValidationSet(val_ids, mask, "lambada", "random")
    batches = [torch.randint(0, a.vocab, (a.batch, a.seq), generator=g) for _ in range(2 * (a.steps + 1))]

    results = {}
    last = {}
    for impl in ("per_sample", "batched"):
        cfg = BlissConfig(batch_size=a.batch, micro_batch=a.micro_batch or None, val_batch_size=a.val_batch,
                          outer_steps=1000, hypergrad_impl=impl, batched_dots=a.batched_dots, dtype=a.dtype)
        solver = BilevelSolver(cfg, copy.deepcopy(proxy), copy.deepcopy(target), copy.deepcopy(scorer), vs, dev)
        it = iter(batches)
        times = []
        for k in range(a.steps + 1):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            m = solver.outer_step(it)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if k > 0:  # the first step pays one-off costs (allocator, kernels)
                times.append(time.perf_counter() - t0)
        results[impl] = {"s_per_step": sum(times) / len(times), "t_c": m["t_c"], "t_hyper": m["t_hyper"], "t_z": m["t_z"],
                         "t_inner": m["t_inner"]}
        last[impl] = solver.last
        del solver

    hp, hb = last["per_sample"], last["batched"]
    flat_p = torch.cat([t.reshape(-1).double() for t in hp.grads])
    flat_b = torch.cat([t.reshape(-1).double() for t in hb.grads])
    out = {
        "device": str(dev) + (f" ({torch.cuda.get_device_name()})" if dev.type == "cuda" else f" ({torch.get_num_threads()} threads)"),
        "preset": a.preset, "batch": a.batch, "seq": a.seq, "dtype": a.dtype, "batched_dots": a.batched_dots,
        **{f"{k}_{impl}": v for impl, r in results.items() for k, v in r.items()},
        "speedup_step": results["per_sample"]["s_per_step"] / results["batched"]["s_per_step"],
        "speedup_c_plus_hyper": (results["per_sample"]["t_c"] + results["per_sample"]["t_hyper"])
        / (results["batched"]["t_c"] + results["batched"]["t_hyper"]),
        "hypergrad_max_abs_diff": float((flat_p - flat_b).abs().max()),
        "hypergrad_max_abs": float(flat_p.abs().max()),
        "hypergrad_rel_diff": float((flat_p - flat_b).norm() / flat_p.norm()),
        "c_max_abs_diff": float((hp.c.double() - hb.c.double()).abs().max()),
    }
    for k, v in out.items():
        print(f"{k:32s} {v:.4g}" if isinstance(v, float) else f"{k:32s} {v}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
