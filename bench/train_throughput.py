"""Training throughput per model preset: tokens/s (and MFU on GPU) of the real training step on synthetic tokens.

    python bench/train_throughput.py --presets debug,pythia-14m --seq-len 256 --batch 8 --steps 10 --device cpu
    python bench/train_throughput.py --presets pythia-160m,pythia-410m --seq-len 1024 --batch 16 --compile

It uses the loop's own pieces (micro_step, clip_grads, AdamW grouping, autocast policy), so the figure is what
``lmselect train`` achieves per device, minus data loading (a memmap read, negligible next to the step).
The first ``--warmup`` steps (compilation, allocator warm-up) are excluded from the timing.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lmselect.models.presets import build_model, count_params, flops_per_token
from lmselect.train.distributed import resolve_device
from lmselect.train.loop import autocast_context, clip_grads, gpu_peak_flops, micro_step
from lmselect.train.schedules import OptimConfig, build_optimizer


def bench_preset(preset: str, *, seq_len: int, batch: int, steps: int, warmup: int, device: torch.device,
                 dtype: str, compile_: bool, vocab: int, attn: str) -> dict:
    model = build_model(preset, vocab, seed=0, attn_implementation=attn).to(device).train()
    opt = build_optimizer(model, OptimConfig())
    fwd = torch.compile(model) if compile_ else model
    autocast = lambda: autocast_context(device, dtype)  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device)

    def step() -> float:
        loss = micro_step(fwd, x, 1, autocast)
        clip_grads(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    float(loss)
    sync()
    dt = time.perf_counter() - t0
    tps = steps * batch * seq_len / dt
    peak = gpu_peak_flops(device)
    mfu = flops_per_token(preset, vocab, seq_len) * tps / peak if peak else None
    out = {"preset": preset, "params": count_params(model), "seq_len": seq_len, "batch": batch, "steps": steps,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "threads": torch.get_num_threads(), "dtype": dtype, "compile": compile_, "tokens_per_s": round(tps, 1),
           "step_ms": round(1000 * dt / steps, 2), "mfu": None if mfu is None else round(mfu, 4)}
    if device.type == "cuda":
        out["max_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="debug,pythia-14m")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step (one micro-batch)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--vocab", type=int, default=50304, help="vocabulary size (GPT-NeoX: 50304)")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--json", action="store_true", help="print one JSON object per preset")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    for preset in [p for p in a.presets.split(",") if p]:
        r = bench_preset(preset, seq_len=a.seq_len, batch=a.batch, steps=a.steps, warmup=a.warmup, device=device,
                         dtype=a.dtype, compile_=a.compile, vocab=a.vocab, attn=a.attn)
        if a.json:
            print(json.dumps(r), flush=True)
        else:
            mfu = f"  MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""
            print(f"{preset:>12}  {r['params'] / 1e6:7.2f}M params  {r['device']}  seq {a.seq_len} x batch {a.batch}  "
                  f"{r['tokens_per_s']:>10,.0f} tok/s  {r['step_ms']:8.1f} ms/step{mfu}", flush=True)


if __name__ == "__main__":
    main()
