"""``lmselect report RUN_DIR``: write report.html, figures/, results.md and results.json from the run directory alone."""

from __future__ import annotations

import argparse

from lmselect.artifacts import LmselectError
from lmselect.report.html import write_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory written by `lmselect run`")
    parser.add_argument("--examples", type=int, default=3,
                        help="highest- and lowest-scored sequences shown per method and round (0: none)")
    parser.add_argument("--max-chars", type=int, default=400, help="truncate decoded examples to this many characters")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "overrides", None):
        raise LmselectError(f"lmselect report takes no config overrides (got {' '.join(args.overrides)})")
    path = write_report(args.run_dir, n_examples=args.examples, max_chars=args.max_chars)
    print(f"wrote {path}")
    print(f"wrote {path.parent / 'results.md'}, {path.parent / 'results.json'} and {path.parent / 'figures'}/")
    return 0


