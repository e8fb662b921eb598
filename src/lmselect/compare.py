"""``lmselect compare RECIPE --methods random,bliss,mates,rho1,blade,perplexity --seeds 3``

Runs every method on the same pool, from the same warm-up, with the same budget of trained tokens and the same
schedule (one run directory; methods and seeds are just more branches of it), then writes one table
(``comparison.md`` / ``comparison.json``: report-set losses and 9-task average, mean ± sd over seeds, the paired
difference to random by seed with a 95 % interval, the exposure ledger, wall time and estimated FLOPs of selection) and one plot (``comparison.png``: metric vs trained tokens).
Methods of a level with its own registered control (``level_control``: random_tokens for RHO-1 / BLADE) are run
with that control too and also paired with it.

Every comparison says what it can detect: the noise floor of every metric from random's seeds, every paired Δ in
units of it, and the smallest effect its number of seeds detects with 80 % power (``report.results``; the formulas
in ``lmselect.stats``). The downstream headline is continuous (probability of the correct choice, bits per byte of the
correct answer; ``eval/harness.py``), accuracy beside it.

``--controls``: the pool gets the known-answer check's planted documents (held-out selection-set passages and three
kinds of junk, ``check.build_planted_inputs``; the methods see only the visible part of the selection set; report
items are never planted) and two more arms run through the same schedule: ``control_positive`` (the planted
target-like documents, then random) and ``control_negative`` (the planted junk, then the most repetitive
sequences). The table says whether each is detected beyond noise, and every method's Δ as a share of the positive
control's (headroom).

``--scales A,B``: the same comparison at two target presets (``OUT/scale-A``, ``OUT/scale-B``, same pool, seeds and
schedule), then per metric the share of arm pairs ordered the same way at both (decision accuracy) and Spearman's ρ
of the arms' ranking (``OUT/agreement.md``).

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
from lmselect.check import CheckConfig, build_planted_inputs, controlled_recipe, prepare_from_pool
from lmselect.config import replace
from lmselect.context import FlopContext
from lmselect.data.pool import TokenPool
from lmselect.errors import ConfigError
from lmselect.models.presets import PRESETS
from lmselect.pipeline import add_run_arguments, run_recipe
from lmselect.recipe import load_recipe
from lmselect.report.model import collect
from lmselect.report.results import fmt_flops, md_table, metric_keys, metric_value, paired_label, results_markdown
from lmselect.select.base import (
    comparable_method_names,
    control_name,
    get_method,
    known_answer_controls,
    level_control_name,
    method_class,
)
from lmselect.stats import decision_accuracy, finite_mean, sample_sd
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
                vals["prob9"] = ds.get("average_prob_correct")
                vals["bpb9"] = ds.get("average_bpb")
                for k, v in vals.items():
                    if isinstance(v, (int, float)):
                        out.setdefault(method, {}).setdefault(k, {}).setdefault(int(tok), []).append(float(v))
    return out


def plot_comparison(run_dir: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = curves(run_dir)
    keys = [("prob9", "9-task P(correct choice) (higher is better)"),
            ("bpb9", "9-task bits/byte of the correct answer (lower is better)"),
            ("val_lambada", "LAMBADA final-word CE, report set (lower is better)"),
            ("val_clean", "clean-text CE, report set (lower is better)"),
            ("avg9", "9-task average accuracy")]
    keys = [(k, t) for k, t in keys if any(k in per for per in data.values())] or keys[2:4]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    for ax, (k, title) in zip(axes[0], keys):
        for m, per in data.items():
            pts = per.get(k)
            if not pts:
                continue
            xs = sorted(pts)
            ax.errorbar(xs, [np.mean(pts[x]) for x in xs], yerr=[sample_sd(pts[x]) or 0.0 for x in xs], marker="o", capsize=3, label=m)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("target tokens trained")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name)
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML (or 'demo')")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated methods (default: all: {','.join(comparable_method_names())})")
    p.add_argument("--seeds", type=int, default=3, help="number of method seeds 0..n-1 (default 3: the minimum for a "
                   "paired 95 %% interval worth reading)")
    p.add_argument("--controls", action="store_true",
                   help="plant held-out target-like documents and junk in the pool (as lmselect check does) and run "
                   f"the known-answer arms ({', '.join(known_answer_controls())}) through the same schedule: the "
                   "table says whether each is detected beyond noise, and every method's share of the positive "
                   "control's gain (headroom)")
    p.add_argument("--scales", default=None, metavar="A,B",
                   help="run the same comparison at two target presets (e.g. debug,pythia-14m) into OUT/scale-<A> and "
                   "OUT/scale-<B>, then print per metric how often the two scales order a pair of arms the same way "
                   "(decision accuracy) and Spearman's rho of the rankings")
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


def plant_controls(recipe: Any, out: Path) -> Any:
    """The recipe of a controlled comparison: the known-answer check's planted documents (``OUT/controls/inputs``,
    seeded by the recipe's seed) added to the pool's inputs, the selection set cut to its visible part."""
    planted = build_planted_inputs(prepare_from_pool(recipe), out / "controls", CheckConfig(seed=recipe.seed))
    return controlled_recipe(recipe, planted)


def compare_once(args: argparse.Namespace, methods: list[str], out: Path,
                 extra_overrides: list[str] = ()) -> tuple[Path, dict[str, Any]] | None:
    """One comparison into ``out``: run every arm, write and print its table; None on a rank other than 0."""
    recipe = load_recipe(args.recipe, list(args.overrides) + list(extra_overrides) + [f"--methods={','.join(methods)}"])
    recipe = replace(recipe, seeds=list(range(args.seeds)))
    if args.controls:
        recipe = plant_controls(recipe, out)
    run_dir, results = run_recipe(recipe, out, report=not args.no_report, recompute=args.recompute)
    if rank_world()[0] != 0:  # under torchrun only rank 0 writes the table and the plot
        return None

    pool = TokenPool(Path(recipe.pool.path) if recipe.pool.path else run_dir / "pool")
    flops = selection_flops(recipe, pool.vocab_size, pool.seq_len, int(np.mean([len(pool.ids(r)) for r in range(1, recipe.rounds + 1)])))
    table = comparison_table(results, flops, recipe.rounds)
    atomic_write_text(run_dir / "comparison.md", table)
    atomic_write_json(run_dir / "comparison.json", {"results": results, "selection_flops_per_round": flops})
    plot_comparison(run_dir, run_dir / "comparison.png")
    print(table)
    print(f"table: {run_dir / 'comparison.md'}   plot: {run_dir / 'comparison.png'}")
    return run_dir, results


def arm_means(results: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """metric -> arm -> mean over seeds of the final-round figure (every arm of the run, controls included)."""
    rows = results.get("rows") or []
    return {k: {m: finite_mean([metric_value(r, k) for r in rows if r["method"] == m])
                for m in sorted({r["method"] for r in rows})} for k in metric_keys(rows)}


def scale_agreement(by_scale: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per metric, how two scales' comparisons agree: decision accuracy over every pair of arms (the share ordered
    the same way) and Spearman's ρ of the arms' means (:func:`lmselect.stats.decision_accuracy`), with the seeds
    per arm behind each scale."""
    (a, ra), (b, rb) = list(by_scale.items())[:2]
    ma, mb = arm_means(ra), arm_means(rb)
    seeds = {s: {m: sorted(r["seed"] for r in res.get("rows") or [] if r["method"] == m)
                 for m in sorted({r["method"] for r in res.get("rows") or []})} for s, res in by_scale.items()}
    return {"scales": [a, b], "seeds": seeds,
            "metrics": {k: decision_accuracy(ma[k], mb[k]) for k in ma if k in mb}}


def agreement_markdown(agr: dict[str, Any]) -> str:
    a, b = agr["scales"]
    rows = []
    for k, v in agr["metrics"].items():
        acc = "–" if v["accuracy"] is None else f"{v['accuracy']:.2f} ({v['agree']}/{v['pairs']})"
        rho = "–" if v["spearman"] is None else f"{v['spearman']:+.2f}"
        rows.append([paired_label(k)[2:], str(len(v["arms"])), acc, rho])
    seeds = "; ".join(f"{s}: " + ", ".join(f"{m} {len(v)}" for m, v in per.items()) for s, per in agr["seeds"].items())
    return "\n".join([
        f"## Agreement of the comparison at {a} and {b}", "",
        "Per metric: decision accuracy = share of pairs of arms (every method and control) that both scales order the "
        "same way (DataDecide); Spearman's ρ of the arms' means. Means over seeds; seeds per arm: " + seeds + ".", "",
        md_table(["metric", "arms", f"decision accuracy ({a} vs {b})", "Spearman ρ"], rows), ""])


def arm_names(args: argparse.Namespace) -> list[str]:
    """The arms of the comparison: ``--methods`` (default: every comparable method) with their controls, plus the
    known-answer arms with ``--controls``."""
    names = [m.strip() for m in (args.methods or ",".join(comparable_method_names())).split(",") if m.strip()]
    methods = with_controls(names)
    if args.controls:
        methods += [m for m in known_answer_controls() if m not in methods]
    return methods


def _scales(args: argparse.Namespace) -> list[str]:
    scales = [s.strip() for s in args.scales.split(",") if s.strip()]
    if len(scales) != 2 or len(set(scales)) != 2:
        raise ConfigError(f"--scales: give two different target presets, e.g. debug,pythia-14m (got {args.scales!r})")
    for s in scales:
        if s not in PRESETS:
            raise ConfigError(f"--scales: unknown preset '{s}' (known: {', '.join(PRESETS)})")
    return scales


def preflight(args: argparse.Namespace) -> Any:
    """What ``lmselect compare`` checks before any compute (the recipe with its arms and overrides, ``--scales``);
    ``lmselect slurm compare`` calls it before writing a script. Returns the recipe."""
    if args.scales:
        _scales(args)
    recipe = load_recipe(args.recipe, list(args.overrides) + [f"--methods={','.join(arm_names(args))}"])
    return replace(recipe, seeds=list(range(args.seeds)))


def run(args: argparse.Namespace) -> int:
    recipe = preflight(args)
    methods = arm_names(args)
    out = Path(args.out or Path("runs") / f"{recipe.name}-compare")
    if not args.scales:
        compare_once(args, methods, out)
        return 0
    by_scale = {}
    for s in _scales(args):
        done = compare_once(args, methods, out / f"scale-{s}", [f"--target.preset={s}"])
        if done is None:
            return 0
        by_scale[s] = done[1]
    agr = scale_agreement(by_scale)
    md = agreement_markdown(agr)
    atomic_write_text(out / "agreement.md", md)
    atomic_write_json(out / "agreement.json", agr)
    print(md)
    print(f"agreement: {out / 'agreement.md'}")
    return 0
