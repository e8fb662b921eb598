"""``lmselect demo``: the embedded demo recipe end to end on the bundled corpus (CPU, minutes).

Prepares the bundled mixed-quality corpus, warms up a tiny target and proxy, then runs random selection and BLISS
side by side from the same warm-up for two rounds, evaluates each round's decay branch, prints the results table
(LAMBADA final-word and held-out clean-text validation loss at equal tokens, 9-task average, selection rate per
source) and writes report.html. Rerunning the command resumes/reuses what is already done.
"""

from __future__ import annotations

import argparse

from lmselect.pipeline import results_markdown, run_recipe
from lmselect.recipe import load_recipe


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--no-report", action="store_true", help="skip report.html")
    p.epilog = "Any recipe key can be overridden, e.g. --methods=random,bliss,mates --rounds=3."


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe("demo", args.overrides)
    run_dir, results = run_recipe(recipe, args.out, report=not args.no_report)
    print()
    print(results_markdown(results))
    print(f"run directory: {run_dir}   report: {run_dir / 'report.html'}")
    return 0
