"""A comparison that knows its own power, rerun in one command into a dated results file.

    python bench/compare_power.py [--seeds 3] [--methods random,bliss,dsir] [--scales debug,pythia-14m]
                                  [--out runs/compare-power] [--results-dir benchmarks/results] [--key=value ...]

Runs ``lmselect compare demo --controls --scales A,B`` (the demo recipe with its prefilter: the same pool, warm-up,
schedule and token budget for every arm; the known-answer control arms on a pool with the check's planted
documents; the same comparison at two target presets). Then it writes
``RESULTS_DIR/YYYY-MM-comparison-power.md``, naming the commit, the machine, the exact command and the wall time. The
file holds, for each scale, the noise floor and detectable effect of every metric, the report-set and continuous
downstream table, the paired differences to random, the controls' detected / not detected verdicts and the
headroom shares, followed by the agreement of the two scales and a verdict in plain words derived from those
tables. Extra ``--key=value`` arguments are recipe overrides; use them to shorten a check of the script itself, e.g.
``--warmup.steps=10 --round_steps=5 --bliss.outer_steps=2 --eval.limit=4 --decay.steps=1`` (the file then records
them, since they are part of the command).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from lmselect.artifacts import atomic_write_text, git_commit
from lmselect.cli import main
from lmselect.report.results import headline_sections, md_table

KEEP = ("What this comparison can detect", "Final round", "Paired difference to random", "Known-answer controls",
        "Headroom", "Exposure")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")).split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.node()}: {cpu}, {os.cpu_count()} CPUs{mem}, {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


def sections(res: dict) -> str:
    out = []
    for sec in headline_sections(res):
        if sec["title"].startswith(KEEP):
            out += [f"#### {sec['title']}", "", sec["note"], ""]
            if sec["rows"]:
                out += [md_table(sec["header"], sec["rows"]), ""]
            out += [f"- {b}" for b in sec["bullets"]] + ([""] if sec["bullets"] else [])
    return "\n".join(out)


def verdict(scale: str, res: dict) -> list[str]:
    """Plain-words lines from the tables: which controls were detected, which methods moved beyond noise, and what
    a within-noise result could have detected, on the headline (first) metrics."""
    from lmselect.report.results import paired_cell, paired_label

    lines = []
    ka = res.get("known_answer_controls") or {}
    for m, a in (ka.get("arms") or {}).items():
        on = ", ".join(paired_label(k)[2:] for k in a["detected_on"])
        lines.append(f"{scale}: the {a['kind']} control ({m}) is " + (f"detected beyond noise on {on}." if on else
                                                                      "not detected beyond noise on any metric."))
    if ka and not ka.get("can_rank"):
        lines.append(f"{scale}: neither control is detected, so nothing at this scale can be ranked.")
    controls = set(ka.get("arms") or {})
    for m, per in (res.get("paired_vs_random") or {}).items():
        if m in controls:
            continue
        moved = [f"{paired_label(k)[2:]} {paired_cell(v, k)}" for k, v in per.items() if not v.get("within_noise")]
        if moved:
            lines.append(f"{scale}: {m} differs from random beyond noise on " + "; ".join(moved) + ".")
        else:
            first = next(iter(per.items()), None)
            if first:
                lines.append(f"{scale}: {m} is within noise of random on every metric; e.g. "
                             f"{paired_label(first[0])[2:]} {paired_cell(first[1], first[0])}.")
    return lines


def left_out(methods: str) -> list[str]:
    """Registered comparable methods this run did not include (random_tokens comes with a token-level method)."""
    from lmselect.select.base import comparable_method_names

    asked = {m.strip() for m in methods.split(",")}
    return [m for m in comparable_method_names() if m not in asked]


def run() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", default="random,bliss,dsir")
    ap.add_argument("--scales", default="debug,pythia-14m")
    ap.add_argument("--out", default="runs/compare-power")
    ap.add_argument("--results-dir", default="benchmarks/results")
    args, overrides = ap.parse_known_args()
    cmd = ["compare", "demo", "--controls", "--seeds", str(args.seeds), "--methods", args.methods,
           "--scales", args.scales, "--out", args.out, "--no-report", *overrides]
    commit = git_commit(Path(__file__).resolve().parent) or "unknown"  # the code that runs, taken before it runs
    # a rerun into a complete OUT reuses its stages (and their wall time is not in this run's): say so in the file
    reused = [s for s in args.scales.split(",") if (Path(args.out) / f"scale-{s.strip()}" / "manifest.json").is_file()]
    t0 = time.perf_counter()
    started = datetime.now(timezone.utc)
    rc = main(cmd)
    wall = time.perf_counter() - t0
    if rc != 0:
        return rc
    out = Path(args.out)
    scales = [s.strip() for s in args.scales.split(",")]
    agreement = (out / "agreement.md").read_text()
    body = [
        f"# Comparison power at demo scale: {args.methods} with controls, scales {args.scales}", "",
        # the header every results file carries (benchmarks/results/README.md; tests/test_docs.py checks it)
        f"- **Date:** {started:%Y-%m-%d %H:%M} UTC; wall time {wall / 60:.1f} min"
        + (f" (stages of {', '.join(reused)} reused from an earlier run in {args.out}: not its full cost)" if reused
           else ""),
        f"- **Commit:** {commit}",
        f"- **Machine:** {machine()}",
        "- **Command:** `" + " ".join(["python", "bench/compare_power.py", *map(shlex.quote, sys.argv[1:])]) + "`",
        f"  (runs `lmselect {' '.join(map(shlex.quote, cmd))}`)",
        f"- methods left out (to fit the time budget): {', '.join(left_out(args.methods)) or 'none'}", "",
        "Every number is on the held-out report sets or the nine downstream tasks, which no method has seen; the "
        "pool holds the known-answer check's planted documents (the methods see half of the selection set). How to "
        "read the tables: docs/guide/comparisons.md.", "",
        "## Verdict (from the tables below)", "",
    ]
    results = {s: json.loads((out / f"scale-{s}" / "results.json").read_text()) for s in scales}
    for s in scales:
        body += [f"- {line}" for line in verdict(s, results[s])]
    body += ["", agreement, ""]
    for s in scales:
        body += [f"## Scale {s} (target preset)", "", sections(results[s]), ""]
    dest = Path(args.results_dir) / f"{started:%Y-%m}-comparison-power.md"
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dest, "\n".join(body) + "\n")
    print(f"wall time: {wall:.0f} s")
    print(f"results file: {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(run())
