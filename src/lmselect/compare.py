"""``lmselect compare RECIPE --methods random,bliss,mates,rho1,blade,perplexity --seeds 3``

Runs every method on the same pool, from the same warm-up, with the same budget of trained tokens and the same
schedule (one run directory; methods and seeds are just more branches of it), then writes one table
(``comparison.md`` / ``comparison.json``: report-set losses and 9-task average, mean ± sd over seeds, the paired
difference to random by seed with a 95 % interval, the exposure ledger, wall time and estimated FLOPs of selection) and one plot (``comparison.png``: metric vs trained tokens).
Methods of a level with its own registered control (``level_control``: random_tokens for RHO-1 / BLADE) are run
with that control too and also paired with it.

Selection FLOPs are *estimates* from the model sizes and the token counts each method processes
(forward = 2·N·tokens, forward+backward = 6·N·tokens; N = non-embedding params + output projection), recorded with
the formula so they can be checked; wall time is measured.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from lmselect.artifacts import atomic_write_json, atomic_write_text
from lmselect.config import replace
from lmselect.context import FlopContext
from lmselect.pipeline import add_run_arguments, run_recipe
from lmselect.recipe import load_recipe
from lmselect.report.results import fmt_flops, results_markdown
from lmselect.select.base import control_name, get_method, level_control_name, method_class, method_names
from lmselect.stats import sample_sd
from lmselect.train.distributed import rank_world


def selection_flops(r: Any, vocab: int, seq_len: int, shard_size: int) -> dict[str, float]:
    """Estimated FLOPs spent on *selection* per round (not on training the target), per method of the recipe."""
    f = FlopContext(r, vocab, seq_len, shard_size)
    return {m: float(get_method(m, getattr(r, m, None)).selection_flops(f)) for m in r.methods}


def comparison_table(results: dict[str, Any], flops: dict[str, float], rounds: int) -> str:
    md = results_markdown(results)
    lines = ["## Cost of selection", "",
             "Estimated selection FLOPs (all rounds, one seed; each method's `selection_flops`) and measured wall times "
             "summed over rounds (mean over seeds):", "",
             "| method | selection FLOPs | selection wall time (s) | target training wall time (s) |", "|---|---|---|---|"]
    for m, row in results["methods"].items():
        secs, tr = row.get("selection_seconds"), row.get("train_seconds")
        lines.append(f"| {m} | {fmt_flops(flops.get(m, 0.0) * rounds)} | {'–' if secs is None else f'{secs:.1f}'} | "
                     f"{'–' if tr is None else f'{tr:.1f}'} |")
    lines += ["", "Token-level methods select online: their cost is inside target training (reference forward passes, "
              "reference re-derivation), so compare their training time with random's."]
    return md + "\n" + "\n".join(lines) + "\n"


def curves(run_dir: Path) -> dict[str, dict[str, dict[int, list[float]]]]:
    """method -> metric -> tokens -> values over seeds, from every round's eval/results.json."""
    from lmselect.report.model import collect

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
    keys = [("val_lambada", "LAMBADA final-word CE, report set (lower is better)"), ("val_clean", "clean-text CE, report set (lower is better)"),
            ("avg9", "9-task average accuracy")]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4))
    for ax, (k, title) in zip(axes, keys):
        for m, per in data.items():
            pts = per.get(k)
            if not pts:
                continue
            xs = sorted(pts)
            ax.errorbar(xs, [np.mean(pts[x]) for x in xs], yerr=[sample_sd(pts[x]) or 0.0 for x in xs], marker="o", capsize=3, label=m)
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
    p.add_argument("--methods", default=None, help=f"comma-separated methods (default: all: {','.join(method_names())})")
    p.add_argument("--seeds", type=int, default=3, help="number of method seeds 0..n-1 (default 3: the minimum for a "
                   "paired 95 %% interval worth reading)")
    add_run_arguments(p)


def with_controls(methods: list[str]) -> list[str]:
    """``methods`` plus the control (random selection, first) and, for every level among them, that level's
    registered control (random_tokens beside rho1 / blade: a random mask of the same kept fraction)."""
    methods = list(methods)
    if control_name() not in methods:
        methods.insert(0, control_name())  # every comparison is paired with the control (random selection)
    for level in sorted({method_class(m).level for m in methods}):
        lc = level_control_name(level)
        if lc is not None and lc not in methods:
            methods.append(lc)
    return methods


def preflight(args: argparse.Namespace) -> Any:
    """What ``lmselect compare`` checks before any compute (the recipe with its methods and overrides);
    ``lmselect slurm compare`` calls it before writing a script. Returns the recipe."""
    methods = with_controls([m.strip() for m in (args.methods or ",".join(method_names())).split(",") if m.strip()])
    recipe = load_recipe(args.recipe, list(args.overrides) + [f"--methods={','.join(methods)}"])
    return replace(recipe, seeds=list(range(args.seeds)))


def run(args: argparse.Namespace) -> int:
    recipe = preflight(args)
    out = Path(args.out or Path("runs") / f"{recipe.name}-compare")
    run_dir, results = run_recipe(recipe, out, report=not args.no_report, recompute=args.recompute)
    if rank_world()[0] != 0:  # under torchrun only rank 0 writes the table and the plot
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
