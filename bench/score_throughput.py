#!/usr/bin/env python3
"""Scoring throughput (sequences/s) of ``lmselect score``'s batched forward, on synthetic tokens (no pool needed).

    python bench/score_throughput.py                                   # CPU: pythia-14m, 16 x 512 tokens
    python bench/score_throughput.py --device cuda --preset pythia-410m --seq-len 1024 --batch-size 64
    python bench/score_throughput.py --mode lm-loss --peak-tflops 989

Times exactly the code path of ``lmselect score`` (``lmselect.score.forward_scores``: inference_mode, autocast to
bf16 on GPU, scores copied back to the host) for a SequenceScorer (mean-pooled backbone + linear head; the LM head
is never run) or a causal LM scored by negative mean cross-entropy (``--mode lm-loss``; runs the LM head).

MFU = forward FLOPs / time / peak. Forward FLOPs per token = 2 * N + 4 * n_layers * d_model * seq_len, with N the
parameters of the matrix multiplies actually run (non-embedding backbone + head; plus the vocab x d output
projection with --mode lm-loss) and the attention term counting QK^T and AV over the full (not causally halved)
context, the PaLM convention. Peak defaults to the H100 SXM dense bf16 figure, 989 TFLOP/s, on CUDA; on CPU MFU is
printed only when --peak-tflops is given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch


def forward_flops_per_token(model: Any, preset: Any, seq_len: int, lm_loss: bool) -> tuple[float, int]:
    """(forward FLOPs per token, matmul parameter count N) of one scoring forward."""
    lm = model.lm
    n = sum(p.numel() for p in lm.parameters())
    n -= lm.get_input_embeddings().weight.numel()  # a lookup, not a matmul
    if not lm_loss:
        n -= lm.get_output_embeddings().weight.numel()  # SequenceScorer never runs the LM head
        n += sum(p.numel() for p in model.head.parameters())
    attn = 4.0 * preset.num_layers * preset.hidden_size * seq_len
    return 2.0 * n + attn, n


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1")
    ap.add_argument("--preset", default=None, help="model preset (default: pythia-14m on CPU, pythia-410m on GPU)")
    ap.add_argument("--seq-len", type=int, default=None, help="default 512 on CPU, 1024 on GPU")
    ap.add_argument("--batch-size", type=int, default=None, help="default 16 on CPU, 64 on GPU")
    ap.add_argument("--vocab-size", type=int, default=50304)
    ap.add_argument("--mode", choices=["scorer", "lm-loss"], default="scorer")
    ap.add_argument("--dtype", default="auto", help="autocast dtype: auto (bf16 on GPU), float32, bfloat16")
    ap.add_argument("--cast-weights", action="store_true", help="also cast the weights to the autocast dtype")
    ap.add_argument("--warmup", type=int, default=2, help="untimed batches first")
    ap.add_argument("--batches", type=int, default=10, help="timed batches")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak dense TFLOP/s for MFU (GPU default 989)")
    ap.add_argument("--json", action="store_true", help="print one JSON line with the figures")
    args = ap.parse_args(argv)

    from lmselect.models.presets import build_model, get_preset
    from lmselect.models.scorer import SequenceScorer
    from lmselect.score import LMLossScorer, forward_scores, resolve_amp_dtype
    from lmselect.train.distributed import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    preset = get_preset(args.preset or ("pythia-410m" if gpu else "pythia-14m"))
    seq_len = args.seq_len or (1024 if gpu else 512)
    bs = args.batch_size or (64 if gpu else 16)
    amp = resolve_amp_dtype(args.dtype, device)

    lm = build_model(preset, args.vocab_size, seed=0, device=device)
    scorer = SequenceScorer(lm, activation="sigmoid", seed=0)
    model = LMLossScorer(lm) if args.mode == "lm-loss" else scorer
    model = model.to(device).eval()
    if args.cast_weights and amp != torch.float32:
        model = model.to(dtype=amp)
    flops_tok, n_mm = forward_flops_per_token(scorer, preset, seq_len, args.mode == "lm-loss")

    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab_size, (bs, seq_len), generator=g) for _ in range(2)]
    if gpu:
        batches = [b.pin_memory() for b in batches]
    for i in range(args.warmup):
        forward_scores(model, batches[i % 2], None, device, amp)
    times = []
    for i in range(args.batches):
        if gpu:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        forward_scores(model, batches[i % 2], None, device, amp)  # includes the host copy of the scores (a sync)
        times.append(time.perf_counter() - t0)
    total = sum(times)
    seqs = bs * len(times)
    tokens = seqs * seq_len
    achieved = flops_tok * tokens / total / 1e12
    peak = args.peak_tflops if args.peak_tflops is not None else (989.0 if gpu else None)
    res: dict[str, Any] = {
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if gpu else f" ({torch.get_num_threads()} threads)"),
        "preset": preset.name, "mode": args.mode, "seq_len": seq_len, "batch_size": bs, "vocab_size": args.vocab_size,
        "amp_dtype": str(amp).replace("torch.", ""), "cast_weights": bool(args.cast_weights),
        "matmul_params": n_mm, "forward_flops_per_token": flops_tok,
        "batches": len(times), "ms_per_batch_median": 1e3 * statistics.median(times),
        "sequences_per_s": seqs / total, "tokens_per_s": tokens / total, "achieved_tflops": achieved,
        "peak_tflops": peak, "mfu": achieved / peak if peak else None,
    }
    if args.json:
        print(json.dumps(res))
    else:
        print(f"device            {res['device']}")
        print(f"model             {preset.name} ({args.mode}), N_matmul = {n_mm / 1e6:.2f} M, vocab {args.vocab_size}")
        print(f"batch             {bs} x {seq_len} tokens, autocast {res['amp_dtype']}"
              + (", bf16 weights" if args.cast_weights else ""))
        print(f"time              {res['ms_per_batch_median']:.1f} ms / batch (median of {len(times)})")
        print(f"throughput        {res['sequences_per_s']:.1f} sequences/s, {res['tokens_per_s']:.0f} tokens/s")
        print(f"forward compute   {flops_tok / 1e6:.2f} MFLOP/token -> {achieved:.3f} TFLOP/s"
              + (f", MFU {100 * res['mfu']:.1f}% of {peak:g} TFLOP/s" if peak else ""))
    return res


if __name__ == "__main__":
    main()
