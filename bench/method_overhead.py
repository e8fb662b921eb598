"""Per-step cost of token-level selection: plain training vs RHO-1 vs BLADE (METHODS §3, §4).

Expectations (dense transformer, compute-bound):
  * one training step ≈ forward (1 unit) + backward (2 units) = 3 units, plus the optimizer update;
  * RHO-1 adds one no-grad forward of the reference per step: ≈ +1/3 of a training step;
  * BLADE adds the same reference forward per step, plus K reference steps every τ target steps. One reference step =
    a no-grad forward of u on a training batch (1 unit) + forward/backward of w on that batch (3) + on a validation
    batch (3 · val tokens / train tokens) + an AdamW update, so amortised BLADE ≈ RHO-1 + (K/τ) · ref-step / step.

Default clock: process CPU time with one thread, so other processes on a shared machine barely move the figures.
The timing loop is self-contained (it does not use lmselect.train.loop): random tokens, AdamW, the TokenSelector hook
called the way the loop calls it. Run:  python bench/method_overhead.py [--preset debug --seq-len 128 ...]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import torch

from lmselect.data.valset import ValidationSet
from lmselect.models.losses import token_ce
from lmselect.models.presets import build_model
from lmselect.select.blade import BladeConfig, BladeSelector
from lmselect.select.rho1 import Rho1Selector
from lmselect.train.hooks import TokenSelector


def make_data(vocab: int, n: int, seq_len: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(seed))


CLOCK: Callable[[], float] = time.process_time


def time_steps(model: Any, selector: TokenSelector, data: torch.Tensor, batch: int, steps: int, warmup: int,
               next_batch: Callable[[], torch.Tensor], start_step: int = 0) -> list[float]:
    """Seconds per target step (selector hooks included), after ``warmup`` untimed plain steps."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    plain = TokenSelector()
    times: list[float] = []
    for i in range(warmup + steps):
        sel = selector if i >= warmup else plain  # warm-up: allocator and threads only, no episode start
        x = data[(i * batch) % (len(data) - batch):][:batch]
        t0 = CLOCK()
        sel.on_step_start(start_step + i - warmup, model, next_batch)
        ce = token_ce(model(input_ids=x).logits, x)
        mask = sel.keep_mask(x, ce.detach())
        loss = (ce * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(CLOCK() - t0)
    return times


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="debug")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20, help="timed steps for plain / RHO-1")
    ap.add_argument("--tau", type=int, default=10, help="BLADE episode length")
    ap.add_argument("--episodes", type=int, default=3, help="BLADE episodes timed")
    ap.add_argument("--k", type=int, default=5, help="BLADE reference steps per episode")
    ap.add_argument("--val-items", type=int, default=8, help="validation items per reference step")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="cpu: process CPU time (robust on a shared machine, meaningful with --threads 1); wall")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(args.seed)

    data = make_data(args.vocab, 256, args.seq_len, args.seed)
    extra = make_data(args.vocab, 256, args.seq_len, args.seed + 1)
    pos = [0]

    def next_batch() -> torch.Tensor:
        pos[0] = (pos[0] + args.batch) % (len(extra) - args.batch)
        return extra[pos[0] : pos[0] + args.batch]

    val_ids = make_data(args.vocab, 64, args.seq_len, args.seed + 2)
    val_mask = torch.zeros(64, args.seq_len - 1, dtype=torch.bool)
    val_mask[:, -3:] = True  # LAMBADA-like: the final word's tokens
    vset = ValidationSet(val_ids, val_mask, "lambada", "random")

    def fresh() -> Any:
        return build_model(args.preset, args.vocab, seed=args.seed)

    warm = 3
    plain = time_steps(fresh(), TokenSelector(), data, args.batch, args.steps, warm, next_batch)
    rho1 = time_steps(fresh(), Rho1Selector(fresh(), 0.6), data, args.batch, args.steps, warm, next_batch)
    u = fresh()
    blade_sel = BladeSelector(BladeConfig(tau=args.tau, ref_steps=args.k, ref_batch_size=args.val_items), vset)
    blade_sel.setup(u, torch.device("cpu"))
    blade = time_steps(u, blade_sel, data, args.batch, args.episodes * args.tau, warm, next_batch)
    sync_idx = set(range(0, len(blade), args.tau))
    normal = [t for i, t in enumerate(blade) if i not in sync_idx]

    # On a shared CPU single timings are noisy (even CPU time, through cache contention): the minimum over steps
    # estimates the uncontended cost and the median what a run sees. Ratios use the minima.
    t_plain, t_rho1, t_bstep = min(plain), min(rho1), min(normal)
    t_ref_step = min(blade[i] - t_bstep for i in sync_idx) / max(args.k, 1)
    t_blade_amort = t_bstep + args.k / args.tau * t_ref_step
    val_frac = args.val_items / args.batch  # validation tokens per reference step relative to training tokens
    exp_ref_step = (1 + 3 + 3 * val_frac) / 3  # in training-step units (optimizer update ignored)
    exp_blade = 1 + 1 / 3 + args.k / args.tau * exp_ref_step

    print(f"preset={args.preset} vocab={args.vocab} seq_len={args.seq_len} batch={args.batch} threads={args.threads} clock={args.clock}")
    print(f"{'method':<30}{'min s/step':>11}{'median':>9}{'x plain':>9}{'expected':>10}")
    rows = [
        ("plain", t_plain, statistics.median(plain), 1.0),
        ("rho1 (+ref forward)", t_rho1, statistics.median(rho1), 4 / 3),
        ("blade, step between syncs", t_bstep, statistics.median(normal), 4 / 3),
        ("blade, one reference step", t_ref_step, float("nan"), exp_ref_step),
        (f"blade amortised K={args.k} tau={args.tau}", t_blade_amort, float("nan"), exp_blade),
    ]
    for name, t, med, exp in rows:
        print(f"{name:<30}{t:>11.4f}{med:>9.4f}{t / t_plain:>9.2f}{exp:>10.2f}")
    paper = t_bstep / t_plain + 0.3 * t_ref_step / t_plain
    print(f"paper setting K=300, tau=1000: measured-component estimate {paper:.2f}x plain "
          f"(expected {1 + 1 / 3 + 0.3 * exp_ref_step:.2f}x)")
    return {"plain": t_plain, "rho1": t_rho1, "blade_step": t_bstep, "blade_ref_step": t_ref_step,
            "blade_amortised": t_blade_amort}

if __name__ == "__main__":
    main()
