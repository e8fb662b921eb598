"""``lmselect compare RECIPE --methods random,bliss,mates,rho1,blade --seeds 2``

Runs every method on the same pool, from the same warm-up, with the same budget of trained tokens and the same
schedule (one run directory; methods and seeds are just more branches of it), then writes one table
(``comparison.md`` / ``comparison.json``: validation losses, 9-task average ± stderr, wall time and estimated FLOPs
of selection per method, mean ± sd over seeds) and one plot (``comparison.png``: metric vs trained tokens).

Selection FLOPs are *estimates* from the model sizes and the token counts each method processes
(forward = 2·N·tokens, forward+backward = 6·N·tokens; N = non-embedding params + output projection), recorded with
the formula so they can be checked; wall time is measured.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np

from lmselect.artifacts import atomic_write_json, atomic_write_text
from lmselect.config import replace
from lmselect.models.presets import matmul_params
from lmselect.pipeline import results_markdown, run_recipe
from lmselect.recipe import METHODS, Recipe, load_recipe


def selection_flops(r: Recipe, vocab: int, seq_len: int, shard_size: int) -> dict[str, float]:
    """Estimated FLOPs spent on *selection* per round (not on training the target), per method."""
    nt, npx = matmul_params(r.target.preset, vocab), matmul_params(r.proxy.preset, vocab)
    T = seq_len
    b = r.bliss
    per_outer = (
        b.inner_steps * b.batch_size * T * (6 * npx + 2 * nt)  # inner AdamW steps on G (proxy fwd+bwd, teacher fwd)
        + b.val_batch_size * T * 6 * npx  # validation gradient
        + b.z_steps * b.batch_size * T * 12 * npx  # Hessian-vector products (double backward ≈ 2× fwd+bwd)
        + b.batch_size * T * 6 * npx  # c_i (one JVP / double-backward pass)
        + b.batch_size * T * 6 * npx  # score model forward + backward
    )
    bliss = b.outer_steps * per_outer + shard_size * T * 2 * npx
    m = r.mates
    val_items = min(m.val_items or r.validation.max_items, r.validation.max_items)
    n_inf = nt if m.influence_init == "target" else matmul_params(m.influence_preset, vocab)  # influence-model backbone
    mates = m.n_probe * T * 6 * nt + m.n_probe * val_items * T * 2 * nt \
        + m.influence_steps * m.influence_batch_size * T * 6 * n_inf + shard_size * T * 2 * n_inf
    tokens_per_round = r.round_steps * r.train.global_batch * T
    rho1 = tokens_per_round * 2 * nt + r.rho1.steps * r.rho1.batch_size * T * 6 * nt
    bl = r.blade
    syncs = max(1, int(np.ceil(r.round_steps / bl.tau))) if bl.tau else 1
    blade = tokens_per_round * 2 * nt + syncs * bl.ref_steps * bl.ref_batch_size * T * (6 * nt + 2 * nt)
    return {"random": 0.0, "bliss": float(bliss), "mates": float(mates), "rho1": float(rho1), "blade": float(blade)}


def comparison_table(results: dict[str, Any], flops: dict[str, float], rounds: int) -> str:
    md = results_markdown(results)
    lines = ["## Cost of selection", "",
             "Estimated selection FLOPs (all rounds, one seed; formula in lmselect/compare.py) and measured wall times "
             "summed over rounds (mean over seeds):", "",
             "| method | selection FLOPs | selection wall time (s) | target training wall time (s) |", "|---|---|---|---|"]
    for m, row in results["methods"].items():
        secs, tr = row.get("selection_seconds"), row.get("train_seconds")
        lines.append(f"| {m} | {flops.get(m, 0.0) * rounds:.3e} | {'–' if secs is None else f'{secs:.1f}'} | "
                     f"{'–' if tr is None else f'{tr:.1f}'} |")
    lines += ["", "RHO-1 and BLADE select online: their cost is inside target training (reference forward passes, "
              "BLADE's reference re-derivation), so compare their training time with random's."]
    return md + "\n" + "\n".join(lines) + "\n"


def curves(run_dir: Path) -> dict[str, dict[str, dict[int, list[float]]]]:
    """method -> metric -> tokens -> values over seeds, from every round's eval/results.json."""
    from lmselect.report import collect

    out: dict[str, dict[str, dict[int, list[float]]]] = {}
    for method, seeds in collect(run_dir).rounds.items():
        for _, rounds in seeds.items():
            for _, rd in rounds.items():
                ev = rd.eval or {}
                tok = ev.get("tokens")
                if tok is None:
                    continue
                vals = {f"val_{k}": v for k, v in (ev.get("val_loss") or {}).items()}
                ds = ev.get("downstream") or {}
                vals["avg9"] = ds.get("average")
                for k, v in vals.items():
                    if isinstance(v, (int, float)):
                        out.setdefault(method, {}).setdefault(k, {}).setdefault(int(tok), []).append(float(v))
    return out


def plot_comparison(run_dir: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = curves(run_dir)
    keys = [("val_lambada", "LAMBADA final-word CE (lower is better)"), ("val_clean", "clean-text CE (lower is better)"),
            ("avg9", "9-task average accuracy")]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4))
    for ax, (k, title) in zip(axes, keys):
        for m, per in data.items():
            pts = per.get(k)
            if not pts:
                continue
            xs = sorted(pts)
            ax.errorbar(xs, [np.mean(pts[x]) for x in xs], yerr=[np.std(pts[x]) for x in xs], marker="o", capsize=3, label=m)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("target tokens trained")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name)
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML (or 'demo')")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods (default: all five)")
    p.add_argument("--seeds", type=int, default=2, help="number of method seeds (0..n-1)")
    p.add_argument("--out", help="run directory (default: runs/<name>-compare)")
    p.add_argument("--no-report", action="store_true")


def run(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    recipe = load_recipe(args.recipe, list(args.overrides) + [f"--methods={','.join(methods)}"])
    recipe = replace(recipe, seeds=list(range(args.seeds)))
    out = Path(args.out or Path("runs") / f"{recipe.name}-compare")
    run_dir, results = run_recipe(recipe, out, report=not args.no_report)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 writes the table and the plot
        return 0
    from lmselect.data.pool import TokenPool

    pool = TokenPool(Path(recipe.pool.path) if recipe.pool.path else run_dir / "pool")
    flops = selection_flops(recipe, pool.vocab_size, pool.seq_len, int(np.mean([len(pool.ids(r)) for r in range(1, recipe.rounds + 1)])))
    table = comparison_table(results, flops, recipe.rounds)
    atomic_write_text(run_dir / "comparison.md", table)
    atomic_write_json(run_dir / "comparison.json", {"results": results, "selection_flops_per_round": flops})
    plot_comparison(run_dir, run_dir / "comparison.png")
    print(table)
    print(f"table: {run_dir / 'comparison.md'}   plot: {run_dir / 'comparison.png'}")
    return 0
