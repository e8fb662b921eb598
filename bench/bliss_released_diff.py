"""How far each of lmselect's own BLISS choices moves a solve away from the released code (METHODS §1.2's table).

    python bench/bliss_released_diff.py                                   # tiny float64 GPT-NeoX, 3 settings (~10 s)
    python bench/bliss_released_diff.py --model demo --run runs/demo --cases run_sh_k1   # the demo's warm-up proxy
    python bench/bliss_released_diff.py --json out.json                   # also every figure as JSON

The reference is our per-sample transcription of the authors' ``train()`` (``tests/select/released_bliss.py``,
MingruiLiu-ML-Lab/BLISS-Bilevel-Data-Selection at 420da66), which ``bliss.profile: paper`` equals to 1e-10
(``tests/select/test_bliss_released.py``). For each option of the ``default`` profile (``PROFILES``), this script
switches *that option alone* to lmselect's value in an otherwise released (``paper``) solve, runs ``--steps`` outer
steps on the same models, stream and validation batches as the released loop, and prints the relative L2 distance
from the released loop in z, the c_i and the hypergradient (before the clip) at each step, and the share of
hypergradient coordinates whose sign agrees (coordinates above 1e-6 of the largest; below that a sign is round-off). Rows: ``paper`` (the sanity row: ~1e-14), each option alone, ``all``
(every option at lmselect's value). Settings (``--cases``): ``run_sh_k1`` = the released scripts/run.sh constants
at K = 1 (γ 1e-2, λ 1e-7, lr 1e-5, warm-up), ``fast_k1`` / ``fast_k2`` = lr 1e-3 without warm-up at K = 1 / 2.

``--model demo`` uses a finished demo run's warm-up proxy and target (float64), its round-1 candidates and its
selection set, with ``--batch`` sequences per batch (8): what the options do on a trained proxy rather than a random
one. The demo model takes about a minute on a CPU; it reads the run, it never trains one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "select"))  # the oracle and its harness
import released_harness as H  # noqa: E402

from lmselect.select.bliss import PROFILES, init_score_model  # noqa: E402

#: lmselect's choices that differ from the released code: option -> (paper value, default value)
OPTIONS: dict[str, tuple[Any, Any]] = {k: (PROFILES["paper"][k], PROFILES["default"][k]) for k in (
    "z_clip_mode", "z_init", "weight_decay_1d", "outer_batch", "schedule", "score_head_init", "softmax_normaliser")}


def _setup_tiny() -> dict[str, Any]:
    pool, valset = H.tiny_data()
    return {"pool": pool, "valset": valset, "train_ids": None, "batch": H.B,
            "models": lambda head: H.tiny_models(head_init=head)}


def _setup_demo(run: Path, batch: int) -> dict[str, Any]:
    from lmselect.pipeline import Runner
    from lmselect.recipe import load_recipe
    from lmselect.train.checkpoint import load_checkpoint_model

    for which in ("proxy", "target"):
        if not (run / "warmup" / which / "manifest.json").is_file():
            raise SystemExit(f"{run}/warmup/{which}: no warm-up checkpoint; run `lmselect demo --out {run}` first")
    recipe = load_recipe(run / "config.yaml")
    pipe = Runner(recipe, run)
    rc = pipe.round_ctx("bliss", 0, 1)
    proxy = load_checkpoint_model(run / "warmup" / "proxy").to(torch.float64)
    target = load_checkpoint_model(run / "warmup" / "target").to(torch.float64)

    def models(head: str):
        return proxy, target, init_score_model(proxy, seed=2, head_init=head)

    return {"pool": pipe.pool, "valset": rc.selection_set, "train_ids": np.asarray(rc.candidates), "batch": batch,
            "models": models}


def measure(setup: dict[str, Any], case: str, steps: int) -> dict[str, list[dict[str, float]]]:
    """Rows ``paper``, each option alone, ``all``: per outer step, the distances from the released loop."""
    a = H.CASES[case]
    variants: dict[str, dict[str, Any]] = {"paper": {}}
    variants.update({k: {k: d} for k, (_, d) in OPTIONS.items()})
    variants["all"] = {k: d for k, (_, d) in OPTIONS.items()}
    released_models = setup["models"]("torch_default")
    p0, s0 = H.states(released_models)
    ref = None
    out = {}
    for name, kw in variants.items():
        cfg = H.config_for(a, batch_size=setup["batch"], hypergrad_impl="per_sample", **kw)
        head = kw.get("score_head_init", "torch_default")
        models = released_models if head == "torch_default" else setup["models"](head)
        got = H.run_lmselect(cfg, models, setup["pool"], setup["valset"], steps, setup["train_ids"])
        if ref is None:  # the released loop sees the validation batches lmselect drew (the same for every variant)
            ref = H.run_released(released_models, setup["pool"], H.config_for(a, batch_size=setup["batch"]), a,
                                 [g["val"] for g in got], steps, setup["train_ids"])
        out[name] = H.errors(ref, got, p0, s0)
    return out


def _pct(x: float) -> str:
    v = 100 * x
    return f"{v:.0f} %" if v >= 10 else (f"{v:.2g} %" if v >= 0.01 else f"{v:.0e} %")


def _range(vals: list[float], pct: bool) -> str:
    lo, hi = min(vals), max(vals)
    f = _pct if pct else (lambda x: f"{x:.2g}")
    return f(lo) if f(lo) == f(hi) else f"{f(lo)} – {f(hi)}"


def markdown(results: dict[str, dict[str, list[dict[str, float]]]]) -> str:
    """One row per variant: the range over settings and outer steps of each distance."""
    names = list(next(iter(results.values())))
    lines = ["| lmselect's value of | z | c | hypergradient | hypergradient signs agreeing |", "|---|---|---|---|---|"]
    for name in names:
        rows = [r for case in results.values() for r in case[name]]
        label = "nothing (paper)" if name == "paper" else ("all seven" if name == "all" else
                                                           f"`{name}: {OPTIONS[name][1]}`")
        lines.append(f"| {label} | {_range([r['z'] for r in rows], False)} | {_range([r['c'] for r in rows], True)} | "
                     f"{_range([r['hypergrad'] for r in rows], True)} | "
                     f"{_range([r['hypergrad_signs'] for r in rows], True)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("tiny", "demo"), default="tiny")
    ap.add_argument("--run", help="a finished demo run directory (--model demo)")
    ap.add_argument("--cases", default=None, help=f"comma-separated of {sorted(H.CASES)} (default: all; demo: run_sh_k1)")
    ap.add_argument("--steps", type=int, default=2, help="outer steps compared (default 2)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per batch with --model demo (default 8)")
    ap.add_argument("--json", help="also write every figure here")
    a = ap.parse_args(argv)
    cases = (a.cases or ("run_sh_k1" if a.model == "demo" else ",".join(H.CASES))).split(",")
    unknown = [c for c in cases if c not in H.CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {sorted(H.CASES)}")
    if a.model == "demo" and not a.run:
        raise SystemExit("--model demo needs --run DIR (a finished `lmselect demo` run)")
    torch.set_num_threads(1)  # float64 per-sample work on tiny tensors: a second thread only adds contention
    setup = _setup_tiny() if a.model == "tiny" else _setup_demo(Path(a.run), a.batch)
    t0 = time.perf_counter()
    results = {c: measure(setup, c, a.steps) for c in cases}
    print(f"model {a.model}, settings {', '.join(cases)}, outer steps 1–{a.steps}; relative distance from the released "
          f"loop, range over settings and steps ({time.perf_counter() - t0:.0f} s)")
    print(markdown(results))
    if a.json:
        Path(a.json).write_text(json.dumps({"model": a.model, "cases": cases, "steps": a.steps, "results": results},
                                           indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
