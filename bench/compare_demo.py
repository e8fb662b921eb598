"""Compare every registered method at demo scale, paired by seed, and print the tables of its results file
(benchmarks/results/YYYY-MM-every-method-demo-scale.md).

    python bench/compare_demo.py [--seeds 3] [--out runs/compare-demo] [--methods ...] [--key=value overrides]

Runs ``lmselect compare demo`` (same pool, warm-up, schedule and fed-token budget for every method; seed k of every
method uses the same data-order seeds), then prints the report-set table (mean ± sd over seeds), the paired
differences to random, to the random token mask (token-level methods) and to the best cheap baseline with 95 % t
intervals ("within noise" when it contains 0) and the exposure ledger. The same
tables are in OUT/comparison.md (with per-seed rows and selection costs) and OUT/results.json; the plot with error
bars is OUT/comparison.png. Every number is on the held-out report sets, which no method has seen.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lmselect.cli import main
from lmselect.report.results import headline_sections, md_table


def run() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="runs/compare-demo")
    ap.add_argument("--methods", default=None, help="default: every registered method")
    args, overrides = ap.parse_known_args()
    t0 = time.perf_counter()
    cmd = ["compare", "demo", "--seeds", str(args.seeds), "--out", args.out, "--no-report", *overrides]
    if args.methods:
        cmd[2:2] = ["--methods", args.methods]
    rc = main(cmd)
    print(f"wall time: {time.perf_counter() - t0:.0f} s")
    if rc == 0:
        print()
        print(summary(json.loads((Path(args.out) / "results.json").read_text())))
    return rc


def summary(res: dict) -> str:
    """The results file's tables: report-set figures, the paired differences (to random, to the random token mask for the
    token-level methods, to the best cheap baseline) and the exposure ledger, as the report renders them."""
    keep = ("Final round", "Paired difference", "Exposure")
    out = []
    for sec in headline_sections(res):
        if sec["title"].startswith(keep) and sec["header"]:
            out += [f"{sec['title']}", "", md_table(sec["header"], sec["rows"]), ""]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(run())
