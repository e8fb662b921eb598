"""Compare all five methods at demo scale with several seeds and print mean ± sd per method.

    python bench/compare_demo.py [--seeds 2] [--out runs/compare-demo] [--methods ...] [--key=value overrides]

Runs ``lmselect compare demo`` (same pool, same warm-up, same trained-token budget and schedule for every method),
then prints the comparison table, which is also in OUT/comparison.md with the plot OUT/comparison.png.
Every method seed gets its own selection randomness (Gumbel noise, random subsets, BLISS/MATES data streams); the
warm-up is shared, as in the papers' protocol.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

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
    if rc == 0:
        print()
        print(summary(json.loads((Path(args.out) / "results.json").read_text())))
    return rc


def _ms(xs: list[float | None], scale: float = 1.0, nd: int = 3) -> str:
    v = np.array([x for x in xs if x is not None], dtype=float) * scale
    if not len(v):
        return "–"
    sd = v.std(ddof=1) if len(v) > 1 else 0.0
    return f"{v.mean():.{nd}f} ± {sd:.{nd}f}"


def summary(res: dict) -> str:
    """Mean ± sd over seeds (sample sd) of the final-round numbers, one line per method."""
    lines = ["| method | seeds | LAMBADA final-word CE | clean-text CE | 9-task avg (%) | selection s |", "|---|---|---|---|---|---|"]
    for m in res["methods"]:
        rows = [r for r in res["rows"] if r["method"] == m]
        lines.append(
            f"| {m} | {len(rows)} | {_ms([r['val_loss'].get('lambada') for r in rows])} | "
            f"{_ms([r['val_loss'].get('clean') for r in rows])} | "
            f"{_ms([r['downstream_average'] for r in rows], 100, 1)} | {_ms([r['selection_seconds'] for r in rows], 1, 0)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run())
