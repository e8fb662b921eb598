"""``lmselect demo``: the embedded demo recipe end to end on the bundled corpus (CPU, minutes).

Prepares the bundled mixed-quality corpus, warms up a tiny target and proxy, then runs random selection and BLISS
side by side from the same warm-up for two rounds, evaluates each round's decay branch, prints the results table
(LAMBADA final-word and held-out clean-text validation loss at equal tokens, 9-task average, selection rate per
source) and writes report.html. Rerunning the command resumes/reuses what is already done.
"""

from __future__ import annotations

import argparse

from lmselect.pipeline import add_run_arguments, run_recipe
from lmselect.recipe import load_recipe
from lmselect.report.results import results_markdown


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, default_out="runs/demo")


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe("demo", args.overrides)
    run_dir, results = run_recipe(recipe, args.out, report=not args.no_report, recompute=args.recompute)
    print()
    print(results_markdown(results))
    print(f"run directory: {run_dir}   report: {run_dir / 'report.html'}")
    return 0
