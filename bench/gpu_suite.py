"""The GPU suite (issue 23): one command, one table, one JSON — what lmselect's hot paths achieve on one GPU.

    python bench/gpu_suite.py --out gpu_suite.json                    # one H100/H200: at most --budget s (420)
    python bench/gpu_suite.py --device cpu --tiny --out tiny.json     # CI smoke mode: tiny presets, < 1 min on CPU

Sections (run in two passes: the core figures of every section first, then the extras: torch.compile, the speed
choices on/off and pythia-1b; each item guarded: an error or OOM is recorded and the suite goes on; a global time budget
skips what would not fit and says so; the JSON is rewritten after every item, so a killed run keeps what it measured):

* ``env``: device, versions, the peak used for MFU (``--peak-tflops`` overrides the table in
  ``lmselect.train.loop.gpu_peak_flops``) and a measured bf16 matmul rate (what "peak" can mean on this card).
* ``train``: tokens/s, MFU and peak memory of the real training step (the loop's ``micro_step``, ``clip_grads``,
  AdamW grouping and autocast policy) for pythia-160m / pythia-410m at seq 1024, compile off and on, pythia-1b if
  time allows; speed choices on/off at pythia-160m: fused vs foreach AdamW, SDPA backend (flash / efficient / math),
  bf16 autocast vs fp32 (TF32); host-to-device batch copies pageable vs pinned at a launch-bound size (pythia-14m).
* ``score``: tokens/s and MFU of the scoring forward (``score.job.forward_scores``: pinned host batch, non-blocking
  copy, inference mode, bf16 autocast, scores back on the host) for the BLISS score model (pythia-160m backbone) at
  batch 64 and 256, compile off / on, and the LM-loss scorer of pythia-410m.
* ``bliss``: one outer step (proxy pythia-160m, target pythia-410m, batch 32, seq 1024, profile ``paper`` =
  3 z steps with HVPs, raw c) per-sample vs batched: seconds per step, share of each phase, agreement of c and of
  the hypergradient computed from one solver state by both implementations; and the ``default`` profile's step.
* ``mates``: oracle probes per second (batched torch.func vs the loop), pythia-160m target, seq 1024 probes.
* ``projection``: the paper's 1B selection stage (METHODS §1.3: 4 rounds × 6,000 outer steps of batch 32, then
  scoring every sequence of a 25.6 M-sequence shard per round) on one such GPU, from the figures above, against the
  authors' 11.82 h on 8×A6000.

Models are lmselect presets with random initialisation (no downloads) on random tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import itertools
import json
import math
import os
import platform
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from lmselect.models.presets import build_model, count_params, flops_per_token, get_preset, matmul_params
from lmselect.train.loop import autocast_context, clip_grads, gpu_peak_flops, micro_step, to_device
from lmselect.train.schedules import OptimConfig, build_optimizer, param_groups

# the paper's BLISS selection stage at 1B (METHODS §1.3, §1.4; the 1B script's 6,000 outer steps)
PAPER_1B = {"rounds": 4, "outer_steps": 6000, "batch": 32, "seq_len": 1024, "inner_steps": 1, "z_steps": 3,
            "shard_sequences": 25_600_000, "proxy": "pythia-160m", "target": "pythia-1b",
            "authors_hours": 11.82, "authors_hardware": "8x NVIDIA RTX A6000"}

# sizes: full (one H100/H200) and tiny (CPU smoke test)
FULL = {"vocab": 50304, "seq": 1024, "train_presets": ["pythia-160m", "pythia-410m"], "train_big": "pythia-1b",
        "train_batch": {"pythia-160m": 32, "pythia-410m": 32, "pythia-1b": 16}, "steps": 10, "warmup": 3,
        "score_preset": "pythia-160m", "score_lm_preset": "pythia-410m", "score_batches": [64, 256], "score_iters": 8,
        "proxy": "pythia-160m", "target": "pythia-410m", "bliss_batch": 32, "bliss_micro": 8, "bliss_val_batch": 32,
        "bliss_val_seq": 256, "mates_preset": "pythia-160m", "mates_probes": 16, "mates_chunk": 8,
        "mates_val_items": 64, "mates_val_seq": 128, "matmul_n": 8192, "h2d_preset": "pythia-14m"}
TINY = {"vocab": 256, "seq": 32, "train_presets": ["debug"], "train_big": "pythia-14m",
        "train_batch": {}, "default_batch": 4, "steps": 2, "warmup": 1,
        "score_preset": "debug", "score_lm_preset": "debug", "score_batches": [8], "score_iters": 2,
        "proxy": "debug", "target": "debug", "bliss_batch": 4, "bliss_micro": 2, "bliss_val_batch": 4,
        "bliss_val_seq": 16, "mates_preset": "debug", "mates_probes": 4, "mates_chunk": 2, "mates_val_items": 4,
        "mates_val_seq": 16, "matmul_n": 256, "h2d_preset": "debug"}

SECTIONS = ("env", "train", "score", "bliss", "mates", "projection")


# ----------------------------------------------------------------------------------------------------------------
# plumbing: timing, memory, the guarded item runner


class ItemTimeout(Exception):
    """An item ran past what is left of the suite's time budget."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def forward_flops_per_token(preset: str, vocab: int, seq: int, lm_head: bool = True) -> float:
    """Forward FLOPs per token: a third of the training convention (2N + 4·L·d·T); without the LM head (a
    score model reads the last hidden state) minus its 2·V·d."""
    p = get_preset(preset)
    f = flops_per_token(p, vocab, seq) / 3.0
    return f if lm_head else f - 2.0 * vocab * p.hidden_size


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise ItemTimeout inside the block after ``seconds`` (SIGALRM; main thread, POSIX only; no-op elsewhere)."""
    def stop(*_: Any) -> None:
        raise ItemTimeout(f"item stopped after {seconds:.0f} s (the suite's time budget)")

    usable = hasattr(signal, "setitimer") and seconds > 0
    if usable:
        try:
            old = signal.signal(signal.SIGALRM, stop)
        except ValueError:  # not the main thread
            usable = False
    if not usable:
        yield
        return
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Suite:
    """Runs items under one time budget; every item's result (or error / skip) lands in ``self.results``."""

    def __init__(self, args: argparse.Namespace, device: torch.device, sizes: dict[str, Any]) -> None:
        self.args, self.device, self.sizes = args, device, sizes
        self.t0 = time.perf_counter()
        self.results: dict[str, Any] = {"suite": "lmselect bench/gpu_suite.py", "command": " ".join([sys.executable] + sys.argv),
                                        "tiny": bool(args.tiny), "budget_s": args.budget, "started_utc": _utc()}
        for s in SECTIONS:
            self.results[s] = {}
        self.peak = gpu_peak_flops(device, args.peak_tflops)

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.t0)

    def run(self, section: str, name: str, est_s: float, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        """Run ``fn`` unless the budget cannot hold ``est_s`` more seconds; record result / error / skip."""
        left = self.left()
        if left < est_s:
            rec: dict[str, Any] = {"skipped": f"time budget: {left:.0f} s left, this item needs ~{est_s:.0f} s"}
            print(f"[gpu_suite] skip {section}/{name}: {rec['skipped']}", flush=True)
            self.results[section][name] = rec
            self.save()
            return None
        print(f"[gpu_suite] {section}/{name} (~{est_s:.0f} s est., {left:.0f} s left) ...", flush=True)
        reset_memory(self.device)
        t = time.perf_counter()
        try:
            with time_limit(left):
                rec = fn()
            rec["item_s"] = round(time.perf_counter() - t, 2)
            rec.setdefault("peak_mem_gib", peak_gib(self.device))
        except Exception as e:  # OOM, a kernel that is not there, a timeout: record it, go on
            oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
            rec = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500], "oom": oom,
                   "item_s": round(time.perf_counter() - t, 2), "peak_mem_gib": peak_gib(self.device)}
            if self.args.traceback:
                rec["traceback"] = traceback.format_exc()[-4000:]
            print(f"[gpu_suite] {section}/{name} failed: {rec['error']}", flush=True)
        self.results[section][name] = rec
        reset_memory(self.device)
        self.save()
        return rec if "error" not in rec else None

    def save(self) -> None:
        if not self.args.out:
            return
        self.results["elapsed_s"] = round(time.perf_counter() - self.t0, 2)
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str) + "\n")
        os.replace(tmp, out)

    def mfu(self, flops_per_s: float) -> float | None:
        return round(flops_per_s / self.peak, 4) if self.peak else None


def _utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def random_tokens(n: int, seq: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------------
# env


def section_env(suite: Suite, extra: bool) -> None:
    if extra:
        return
    dev = suite.device

    def info() -> dict[str, Any]:
        import transformers

        rec: dict[str, Any] = {"device": str(dev), "torch": torch.__version__, "transformers": transformers.__version__,
                               "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
                               "peak_tflops_used": None if suite.peak is None else suite.peak / 1e12,
                               "peak_source": "--peak-tflops" if suite.args.peak_tflops else "table"}
        if dev.type == "cuda":
            p = torch.cuda.get_device_properties(dev)
            rec.update(name=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                       memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                       cudnn=torch.backends.cudnn.version(), bf16=torch.cuda.is_bf16_supported(),
                       flash_sdp=torch.backends.cuda.flash_sdp_enabled(),
                       mem_efficient_sdp=torch.backends.cuda.mem_efficient_sdp_enabled())
        else:
            rec["name"] = platform.processor() or platform.machine()
        return rec

    def matmul() -> dict[str, Any]:
        n = suite.sizes["matmul_n"]
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
        g = torch.Generator(device=dev).manual_seed(0)
        a = torch.randn(n, n, device=dev, dtype=dt, generator=g)
        b = torch.randn(n, n, device=dev, dtype=dt, generator=g)
        for _ in range(3):
            a @ b
        sync(dev)
        reps = 10
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(dev)
        tf = 2 * n**3 * reps / (time.perf_counter() - t) / 1e12
        return {"n": n, "dtype": str(dt).replace("torch.", ""), "tflops": round(tf, 1),
                "of_peak": None if not suite.peak else round(tf * 1e12 / suite.peak, 3)}

    suite.run("env", "info", 1, info)
    suite.run("env", "matmul", 5, matmul)


# ----------------------------------------------------------------------------------------------------------------
# train


def train_item(suite: Suite, preset: str, *, compile_: bool = False, fused: bool | None = None,
               sdpa: str | None = None, dtype: str = "auto", h2d: str | None = None, batch: int | None = None
               ) -> dict[str, Any]:
    """Tokens/s and MFU of ``steps`` timed training steps (after ``warmup``) of ``preset`` on one batch.

    ``h2d``: copy the batch from the host every step, ``pageable`` (``.to(non_blocking=True)`` from ordinary memory,
    the loop before issue 23) or ``pinned`` (``train.loop.to_device``, the loop now); None: the batch stays on the
    device."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    S, dev = suite.sizes, suite.device
    vocab, seq = S["vocab"], S["seq"]
    batch = batch or S["train_batch"].get(preset, S.get("default_batch", 32))
    model = build_model(preset, vocab, seed=0, device=dev).train()
    if fused is None:
        opt = build_optimizer(model, OptimConfig())  # the loop's choice: fused on CUDA
    else:
        opt = torch.optim.AdamW(param_groups(model.named_parameters(), 0.1), lr=1e-3, betas=(0.9, 0.95),
                                fused=fused or None, foreach=None if fused else True)
    fwd = torch.compile(model, backend=suite.args.compile_backend) if compile_ else model
    autocast = lambda: autocast_context(dev, dtype)  # noqa: E731
    x_host = random_tokens(batch, seq, vocab, 0)
    x = x_host.to(dev)
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}.get(sdpa or "")
    kernel = (lambda: sdpa_kernel(backend)) if backend is not None else contextlib.nullcontext

    def step() -> torch.Tensor:
        xb = x if h2d is None else (to_device(x_host, dev) if h2d == "pinned" else x_host.to(dev, non_blocking=True))
        with kernel():
            loss = micro_step(fwd, xb, 1, autocast)
        clip_grads(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t = time.perf_counter()
    for _ in range(S["warmup"]):
        step()
    sync(dev)
    warm_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(S["steps"]):
        loss = step()
    sync(dev)
    dt = time.perf_counter() - t
    tps = S["steps"] * batch * seq / dt
    flops = flops_per_token(preset, vocab, seq) * tps
    return {"preset": preset, "params_m": round(count_params(model) / 1e6, 2), "batch": batch, "seq": seq,
            "compile": compile_, "fused_adamw": (dev.type == "cuda") if fused is None else fused,
            "sdpa": sdpa or "default", "dtype": dtype, "h2d": h2d or "on_device", "tokens_per_s": round(tps, 1),
            "step_ms": round(1000 * dt / S["steps"], 2), "tflops": round(flops / 1e12, 2), "mfu": suite.mfu(flops),
            "warmup_s": round(warm_s, 2), "loss": round(float(loss), 4), "peak_mem_gib": peak_gib(dev)}


def section_train(suite: Suite, extra: bool) -> None:
    S, tiny = suite.sizes, suite.args.tiny
    # rough item costs (s) on an H100/H200 including model build; compile adds its compilation
    est = {"pythia-160m": 8, "pythia-410m": 15, "pythia-1b": 30}
    first, *rest = S["train_presets"]
    if not extra:
        for p in [first, *rest]:
            suite.run("train", f"{p}", 2 if tiny else est.get(p, 10), lambda p=p: train_item(suite, p))
        return
    for p in [first, *rest]:
        suite.run("train", f"{p}+compile", 10 if tiny else 3 * est.get(p, 10) + 45,
                  lambda p=p: train_item(suite, p, compile_=True))
    # speed choices on/off at the first (smallest) preset: each a few seconds
    suite.run("train", f"{first}+foreach_adamw", 2 if tiny else 8, lambda: train_item(suite, first, fused=False))
    suite.run("train", f"{first}+fp32", 2 if tiny else 12, lambda: train_item(suite, first, dtype="float32"))
    for b in (["math"] if tiny else ["flash", "efficient", "cudnn", "math"]):
        suite.run("train", f"{first}+sdpa_{b}", 2 if tiny else 8, lambda b=b: train_item(suite, first, sdpa=b))
    # host -> device copies in a launch-bound regime (a small model): pageable vs pinned
    small = S["h2d_preset"]
    for h in ("pageable", "pinned"):
        suite.run("train", f"{small}+h2d_{h}", 2 if tiny else 6, lambda h=h: train_item(suite, small, h2d=h, batch=8))
    big = S["train_big"]
    suite.run("train", big, 3 if tiny else est.get(big, 30), lambda: train_item(suite, big))


# ----------------------------------------------------------------------------------------------------------------
# score


def score_item(suite: Suite, preset: str, batch: int, *, lm_loss: bool = False, compile_: bool = False) -> dict[str, Any]:
    from lmselect.score.job import LMLossScorer, forward_scores, resolve_amp_dtype
    from lmselect.select.bliss import init_score_model

    S, dev = suite.sizes, suite.device
    vocab, seq = S["vocab"], S["seq"]
    lm = build_model(preset, vocab, seed=0, device=dev)
    model = LMLossScorer(lm) if lm_loss else init_score_model(lm, seed=1)
    if not lm_loss:
        del lm
    model = model.to(dev).eval()
    run = torch.compile(model, backend=suite.args.compile_backend) if compile_ else model
    amp = resolve_amp_dtype(None, dev)
    xs = [random_tokens(batch, seq, vocab, i) for i in range(2)]
    if dev.type == "cuda":
        xs = [x.pin_memory() for x in xs]
    t = time.perf_counter()
    for i in range(2):
        forward_scores(run, xs[i % 2], None, dev, amp)
    warm_s = time.perf_counter() - t
    iters = S["score_iters"]
    sync(dev)
    t = time.perf_counter()
    for i in range(iters):
        out = forward_scores(run, xs[i % 2], None, dev, amp)
    sync(dev)
    dt = time.perf_counter() - t
    tps = iters * batch * seq / dt
    flops = forward_flops_per_token(preset, vocab, seq, lm_head=lm_loss) * tps
    return {"preset": preset, "model": "lm_loss" if lm_loss else "score_model", "batch": batch, "seq": seq,
            "compile": compile_, "dtype": str(amp).replace("torch.", ""), "tokens_per_s": round(tps, 1),
            "sequences_per_s": round(tps / seq, 1), "tflops": round(flops / 1e12, 2), "mfu": suite.mfu(flops),
            "warmup_s": round(warm_s, 2), "finite": bool(torch.isfinite(torch.as_tensor(out)).all()),
            "peak_mem_gib": peak_gib(dev)}


def section_score(suite: Suite, extra: bool) -> None:
    S, tiny = suite.sizes, suite.args.tiny
    p, b = S["score_preset"], S["score_batches"][-1]
    if extra:
        suite.run("score", f"{p}_b{b}+compile", 8 if tiny else 60, lambda: score_item(suite, p, b, compile_=True))
        return
    for b in S["score_batches"]:
        suite.run("score", f"{p}_b{b}", 2 if tiny else 8, lambda b=b: score_item(suite, p, b))
    q = S["score_lm_preset"]
    suite.run("score", f"{q}_lm_loss_b{S['score_batches'][0]}", 2 if tiny else 12,
              lambda: score_item(suite, q, S["score_batches"][0], lm_loss=True))


# ----------------------------------------------------------------------------------------------------------------
# bliss


def _bliss_setup(suite: Suite) -> dict[str, Any]:
    from lmselect.data.valset import ValidationSet
    from lmselect.select.bliss import init_score_model

    S, dev = suite.sizes, suite.device
    vocab = S["vocab"]
    proxy = build_model(S["proxy"], vocab, seed=0, device=dev)
    target = build_model(S["target"], vocab, seed=1, device=dev)
    scorer = init_score_model(proxy, seed=2)
    n_val = 4 * S["bliss_val_batch"]
    val_ids = random_tokens(n_val, S["bliss_val_seq"], vocab, 99)
    mask = torch.zeros(n_val, val_ids.shape[1] - 1, dtype=torch.bool)
    mask[:, -3:] = True  # LAMBADA-like final word
    vs = ValidationSet(val_ids, mask, "lambada", "random")
    batches = [random_tokens(S["bliss_batch"], S["seq"], vocab, 1000 + i) for i in range(8)]  # cycled
    return {"proxy": proxy, "target": target, "scorer": scorer, "valset": vs, "batches": batches}


def _solver(suite: Suite, st: dict[str, Any], impl: str, profile: str) -> Any:
    from lmselect.select.bliss import BilevelSolver, BlissConfig

    S = suite.sizes
    cfg = BlissConfig(batch_size=S["bliss_batch"], micro_batch=S["bliss_micro"], val_batch_size=S["bliss_val_batch"],
                      outer_steps=1000, hypergrad_impl=impl, profile=profile, log_every=1000, diag_every=0)
    return BilevelSolver(cfg, copy.deepcopy(st["proxy"]), copy.deepcopy(st["target"]), copy.deepcopy(st["scorer"]),
                         st["valset"], suite.device)


PHASES = ("t_inner", "t_val", "t_z", "t_c", "t_hyper", "t_update")


def bliss_step_item(suite: Suite, st: dict[str, Any], impl: str, profile: str, timed: int) -> dict[str, Any]:
    dev = suite.device
    solver = _solver(suite, st, impl, profile)
    it = itertools.cycle(st["batches"])  # K inner + 1 outer (+ hyper batches) per step
    secs, phases = [], {k: 0.0 for k in PHASES}
    for k in range(1 + timed):  # the first step pays one-off costs (allocator, kernel selection)
        sync(dev)
        t = time.perf_counter()
        m = solver.outer_step(it)
        sync(dev)
        if k > 0:
            secs.append(time.perf_counter() - t)
            for ph in PHASES:
                phases[ph] += float(m.get(ph, 0.0)) / timed
    s = sum(secs) / len(secs)
    return {"impl": impl, "profile": profile, "proxy": suite.sizes["proxy"], "target": suite.sizes["target"],
            "batch": suite.sizes["bliss_batch"], "seq": suite.sizes["seq"], "micro_batch": suite.sizes["bliss_micro"],
            "s_per_outer_step": round(s, 4), "timed_steps": timed,
            "phase_s": {k: round(v, 4) for k, v in phases.items()},
            "phase_share": {k: round(v / s, 3) for k, v in phases.items()}, "peak_mem_gib": peak_gib(dev)}


def bliss_agreement_item(suite: Suite, st: dict[str, Any]) -> dict[str, Any]:
    """Steps 2–5 from one solver state by both implementations (same z: z re-initialised every step)."""
    solver = _solver(suite, st, "batched", "paper")
    ids = st["batches"][0].to(suite.device)
    vids, vmask, vtok = solver.next_val_batch()
    h_ps = solver.hypergradient(ids, vids, vmask, "per_sample", val_token_mask=vtok)
    h_b = solver.hypergradient(ids, vids, vmask, "batched", val_token_mask=vtok)
    gp = torch.cat([g.reshape(-1).double() for g in h_ps.grads])
    gb = torch.cat([g.reshape(-1).double() for g in h_b.grads])
    cp, cb = h_ps.c.double(), h_b.c.double()
    rel_g = float((gp - gb).norm() / gp.norm().clamp_min(1e-300))
    rel_c = float((cp - cb).norm() / cp.norm().clamp_min(1e-300))
    cos_g = float(torch.nn.functional.cosine_similarity(gp, gb, dim=0))
    # ranks of c: what selection uses downstream
    from lmselect.select.mates import spearman

    rho = spearman(cp.cpu().numpy(), cb.cpu().numpy()) if cp.numel() > 2 else float("nan")
    amp = solver._amp_dtype()
    return {"dtype": "float32" if amp is None else str(amp).replace("torch.", ""), "c_rel_diff": rel_c,
            "c_spearman": rho, "hypergrad_rel_diff": rel_g, "hypergrad_cos": cos_g,
            "c_max_abs": float(cp.abs().max()), "hypergrad_norm": float(gp.norm())}


def section_bliss(suite: Suite, extra: bool) -> None:
    if extra:
        return
    tiny = suite.args.tiny
    box: dict[str, Any] = {}

    def setup() -> dict[str, Any]:
        box.update(_bliss_setup(suite))
        return {"proxy": suite.sizes["proxy"], "target": suite.sizes["target"]}

    if suite.run("bliss", "setup", 2 if tiny else 10, setup) is None:
        return
    timed = 1 if tiny else 2
    b = suite.run("bliss", "paper_batched", 3 if tiny else 25, lambda: bliss_step_item(suite, box, "batched", "paper", timed))
    p = suite.run("bliss", "paper_per_sample", 3 if tiny else 40,
                  lambda: bliss_step_item(suite, box, "per_sample", "paper", timed))
    if b and p:
        suite.results["bliss"]["speedup_batched"] = round(p["s_per_outer_step"] / b["s_per_outer_step"], 2)
    suite.run("bliss", "agreement", 3 if tiny else 20, lambda: bliss_agreement_item(suite, box))
    suite.run("bliss", "default_profile", 3 if tiny else 40, lambda: bliss_step_item(suite, box, "auto", "default", 1))
    box.clear()


# ----------------------------------------------------------------------------------------------------------------
# mates


def mates_item(suite: Suite, method: str) -> dict[str, Any]:
    from lmselect.data.valset import ValidationSet
    from lmselect.models.losses import token_ce
    from lmselect.select.mates import probe_oracle

    S, dev = suite.sizes, suite.device
    vocab, preset = S["vocab"], S["mates_preset"]
    model = build_model(preset, vocab, seed=0, device=dev)
    opt = build_optimizer(model, OptimConfig())
    x = random_tokens(2, S["seq"], vocab, 5).to(dev)
    with autocast_context(dev, "auto"):
        token_ce(model(input_ids=x).logits, x).mean().backward()  # one real step: Adam moments exist
    opt.step()
    opt.zero_grad(set_to_none=True)
    n_val = S["mates_val_items"]
    val = random_tokens(n_val, S["mates_val_seq"], vocab, 6)
    mask = torch.zeros(n_val, val.shape[1] - 1, dtype=torch.bool)
    mask[:, -3:] = True
    vs = ValidationSet(val, mask, "lambada", "random")
    n = S["mates_probes"] if method == "batched" else max(2, S["mates_probes"] // 4)
    probes = random_tokens(n + S["mates_chunk"], S["seq"], vocab, 7)
    kw = dict(method=method, chunk_size=S["mates_chunk"], val_batch_size=32, dtype="auto", lr=1e-3, clip_grad_norm=1.0)
    t = time.perf_counter()
    probe_oracle(model, opt, probes[: S["mates_chunk"] if method == "batched" else 1], vs, **kw)  # warm-up
    sync(dev)
    warm_s = time.perf_counter() - t
    t = time.perf_counter()
    vals = probe_oracle(model, opt, probes[-n:], vs, **kw)
    sync(dev)
    dt = time.perf_counter() - t
    import numpy as np

    return {"method": method, "preset": preset, "probe_seq": S["seq"], "val_items": n_val,
            "val_seq": S["mates_val_seq"], "chunk": S["mates_chunk"] if method == "batched" else 1, "probes": n,
            "probes_per_s": round(n / dt, 3), "s_per_probe": round(dt / n, 4), "warmup_s": round(warm_s, 2),
            "finite": bool(np.isfinite(vals).all()), "peak_mem_gib": peak_gib(dev)}


def section_mates(suite: Suite, extra: bool) -> None:
    if extra:
        return
    tiny = suite.args.tiny
    b = suite.run("mates", "batched", 3 if tiny else 30, lambda: mates_item(suite, "batched"))
    lp = suite.run("mates", "loop", 3 if tiny else 20, lambda: mates_item(suite, "loop"))
    if b and lp:
        suite.results["mates"]["speedup_batched"] = round(b["probes_per_s"] / lp["probes_per_s"], 2)


# ----------------------------------------------------------------------------------------------------------------
# projection


def projection(suite: Suite) -> dict[str, Any]:
    """Hours of the paper's 1B BLISS selection stage on one such device, from this run's measurements.

    bilevel: rounds × outer_steps × (measured batched paper-profile outer step at proxy/target of this run
    + the extra teacher forwards of a 1B target: (inner_steps + 1) × batch × seq × 2·ΔN FLOPs at the measured
    LM forward rate); scoring: rounds × shard_sequences × seq tokens through the score model at its best measured
    rate, scaled by FLOPs when the run's score preset differs from the paper's proxy. Warm-up and target training are
    not part of the selection stage (the authors' 11.82 h counts selection only, METHODS §1.4)."""
    R, S = suite.results, suite.sizes
    P = PAPER_1B
    vocab, seq = S["vocab"], S["seq"]
    step = R["bliss"].get("paper_batched", {}).get("s_per_outer_step")
    scores = [r for r in R["score"].values() if isinstance(r, dict) and r.get("model") == "score_model" and r.get("tokens_per_s")]
    lm = [r for r in R["score"].values() if isinstance(r, dict) and r.get("model") == "lm_loss" and r.get("tokens_per_s")]
    if step is None or not scores:
        raise RuntimeError("needs bliss/paper_batched and a score-model measurement")
    best = max(scores, key=lambda r: r["tokens_per_s"])
    # scoring rate of the paper's score model (backbone = its proxy), scaled by forward FLOPs if we measured another
    f_meas = forward_flops_per_token(best["preset"], vocab, seq, lm_head=False)
    f_paper = forward_flops_per_token(P["proxy"], 50304, P["seq_len"], lm_head=False)
    score_tps = best["tokens_per_s"] * f_meas / f_paper
    # forward FLOP/s of an LM (teacher) forward: measured LM-loss scorer, else the score model's
    fwd_flops = (lm[0]["tflops"] if lm else best["tflops"]) * 1e12
    # teacher parameters a 1B target adds over the measured one (not in tiny mode: its CPU rates would swamp it)
    dn = 0.0 if suite.args.tiny else matmul_params(P["target"], 50304) - matmul_params(S["target"], 50304)
    extra_teacher_s = (P["inner_steps"] + 1) * P["batch"] * P["seq_len"] * 2 * max(dn, 0.0) / max(fwd_flops, 1.0)
    step_1b = step + extra_teacher_s
    bilevel_h = P["rounds"] * P["outer_steps"] * step_1b / 3600
    scoring_h = P["rounds"] * P["shard_sequences"] * P["seq_len"] / score_tps / 3600
    total = bilevel_h + scoring_h
    return {"assumptions": {**P, "measured_with": {"proxy": S["proxy"], "target": S["target"], "score": best["preset"]},
                            "note": "tiny run: the numbers only check the arithmetic" if suite.args.tiny else ""},
            "outer_step_s_measured": step, "outer_step_s_1b_target": round(step_1b, 4),
            "extra_teacher_s_per_step": round(extra_teacher_s, 4), "score_tokens_per_s": round(score_tps, 1),
            "bilevel_hours": round(bilevel_h, 3), "scoring_hours": round(scoring_h, 3), "total_hours": round(total, 3),
            "authors_hours": P["authors_hours"], "vs_authors": round(total / P["authors_hours"], 3),
            "meets_target": total < P["authors_hours"]}


def section_projection(suite: Suite, extra: bool) -> None:
    # after the core pass, and again after the extras (a compiled scorer may be faster: the best rate counts)
    suite.run("projection", "paper_1b_selection", 0, lambda: projection(suite))


# ----------------------------------------------------------------------------------------------------------------
# table


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if pct:
        return f"{100 * v:.1f}%"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


def table(results: dict[str, Any]) -> str:
    env = results["env"].get("info", {})
    lines = [f"lmselect GPU suite on {env.get('name', '?')} ({env.get('device', '?')}), torch {env.get('torch', '?')}, "
             f"peak {_fmt(env.get('peak_tflops_used'))} TFLOP/s; matmul {_fmt(results['env'].get('matmul', {}).get('tflops'))} TFLOP/s",
             f"{'section':<10} {'item':<34} {'figure':>20} {'MFU':>7} {'peak GiB':>9}  note", "-" * 100]

    def row(sec: str, name: str, fig: str, mfu: Any, mem: Any, note: str = "") -> None:
        lines.append(f"{sec:<10} {name:<34} {fig:>20} {_fmt(mfu, pct=True) if mfu is not None else '-':>7} "
                     f"{_fmt(mem):>9}  {note}")

    for sec in ("train", "score", "bliss", "mates", "projection"):
        for name, r in results[sec].items():
            if not isinstance(r, dict):
                row(sec, name, _fmt(r) + "x", None, None)
                continue
            if "skipped" in r or "error" in r:
                row(sec, name, "SKIPPED" if "skipped" in r else "ERROR", None, r.get("peak_mem_gib"),
                    (r.get("skipped") or r.get("error", ""))[:60])
            elif sec in ("train", "score"):
                row(sec, name, f"{_fmt(r['tokens_per_s'])} tok/s", r.get("mfu"), r.get("peak_mem_gib"),
                    f"warm-up {r.get('warmup_s')} s")
            elif sec == "bliss" and "s_per_outer_step" in r:
                top = sorted(r["phase_share"].items(), key=lambda kv: -kv[1])[:3]
                row(sec, name, f"{r['s_per_outer_step']:.3f} s/step", None, r.get("peak_mem_gib"),
                    " ".join(f"{k[2:]} {100 * v:.0f}%" for k, v in top))
            elif sec == "bliss" and "c_rel_diff" in r:
                row(sec, name, f"rel {r['hypergrad_rel_diff']:.1e}", None, r.get("peak_mem_gib"),
                    f"c rel {r['c_rel_diff']:.1e}, spearman {r['c_spearman']:.4f}, {r['dtype']}")
            elif sec == "mates" and "probes_per_s" in r:
                row(sec, name, f"{r['probes_per_s']:.2f} probe/s", None, r.get("peak_mem_gib"),
                    f"val {r['val_items']}x{r['val_seq']}, chunk {r['chunk']}")
            elif sec == "projection" and "total_hours" in r:
                row(sec, name, f"{r['total_hours']:.2f} h", None, None,
                    f"bilevel {r['bilevel_hours']:.2f} h + scoring {r['scoring_hours']:.2f} h vs authors "
                    f"{r['authors_hours']} h on 8xA6000")
            else:
                row(sec, name, "", None, r.get("peak_mem_gib"), ", ".join(f"{k}={v}" for k, v in list(r.items())[:3]))
    lines.append("-" * 100)
    lines.append(f"elapsed {results.get('elapsed_s')} s of a {results.get('budget_s')} s budget")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_suite.json", help="the JSON record (rewritten after every item)")
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cuda, cuda:N, cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny presets and short sequences (CI smoke mode)")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole suite (default 420; tiny 120)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak per GPU for MFU (default: table)")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; tiny: eager)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (torch.set_num_threads; default for --tiny: 1, which on a shared 2-core box is "
                         "10-30x faster than 2 spinning threads)")
    ap.add_argument("--traceback", action="store_true", help="keep each error's traceback in the JSON")
    a = ap.parse_args(argv)
    a.budget = a.budget if a.budget is not None else (120.0 if a.tiny else 420.0)
    a.compile_backend = a.compile_backend or ("eager" if a.tiny else "inductor")
    if a.threads or a.tiny:
        torch.set_num_threads(a.threads or 1)
    from lmselect.train.distributed import resolve_device

    device = resolve_device(a.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers outside autocast, as the loop does
        torch.backends.cudnn.allow_tf32 = True
    sizes = TINY if a.tiny else FULL
    suite = Suite(a, device, sizes)
    wanted = [s.strip() for s in a.sections.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown section(s) {unknown}; known: {', '.join(SECTIONS)}")
    # core figures first (no compile), then the extras: compilation, speed choices on/off, the largest model
    for extra in (False, True):
        for name in SECTIONS:
            if name in wanted:
                globals()[f"section_{name}"](suite, extra)
    suite.results["finished_utc"] = _utc()
    suite.save()
    print(table(suite.results), flush=True)
    if a.out:
        print(f"[gpu_suite] JSON: {a.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
