"""Compare all five methods at demo scale with several seeds and print mean ± sd per method.

    python bench/compare_demo.py [--seeds 2] [--out runs/compare-demo] [--methods ...] [--key=value overrides]

Runs ``lmselect compare demo`` (same pool, same warm-up, same trained-token budget and schedule for every method),
then prints the comparison table, which is also in OUT/comparison.md with the plot OUT/comparison.png.
Every method seed gets its own selection randomness (Gumbel noise, random subsets, BLISS/MATES data streams); the
warm-up is shared, as in the papers' protocol.
"""

from __future__ import annotations

import argparse
import sys
import time

from lmselect.cli import main


def run() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--out", default="runs/compare-demo")
    ap.add_argument("--methods", default="random,bliss,mates,rho1,blade")
    args, overrides = ap.parse_known_args()
    t0 = time.perf_counter()
    rc = main(["compare", "demo", "--methods", args.methods, "--seeds", str(args.seeds), "--out", args.out, *overrides])
    print(f"wall time: {time.perf_counter() - t0:.0f} s")
    return rc


if __name__ == "__main__":
    sys.exit(run())
