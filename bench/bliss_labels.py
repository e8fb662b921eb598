"""What BLISS's labels say and what its score model can see, on the known-answer check's planted pool.

    lmselect check demo --method bliss --rounds=1 --eval.downstream=false --out runs/check-bliss   # first
    python bench/bliss_labels.py --check runs/check-bliss [--candidates 3000] [--variants default,second_order]
                                 [--seeds 0,1,2]

The known-answer check judges the whole method: labels c_i (the bilevel signal) and the score model that has to
generalise them to the pool. When it fails, this bench says which half failed. For every variant (``--bliss.*``
overrides on the check's recipe, see VARIANTS) it runs the bilevel solver of round 1 from the check's warm-up
(same proxy, teacher, selection set, candidates and config as the pipeline) and then, on a seeded sample of the
round's candidates:

* **labels**: c_i = ⟨∇CE_i, z⟩ (÷ ‖∇CE_i‖ when ``c_normalize``) with the solver's *last* z for every sampled
  sequence — what the score model would be trained towards if it saw every candidate. The rate of each planted
  kind in the top ``select_fraction`` by c (× base rate) is the check the labels alone would get.
* **score model**: the same rates from the trained score model's scores, and Spearman(score, c).
* **what the features can separate**: a supervised logistic regression (5-fold ROC AUC) of each planted kind
  against the corpus sequences on the score model's pooled features (what its linear head sees), and on those
  features plus the proxy's mean token loss. This is an upper bound on what a linear head over those features
  could learn with perfect labels; an AUC near 0.5 means the features cannot tell that kind from prose.

CPU, a few minutes per variant at demo scale (per-sequence gradients of the sample dominate).
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

from lmselect.config import replace
from lmselect.context import STREAM_METHOD, STREAM_SCORER_INIT
from lmselect.models.losses import mean_token_ce
from lmselect.pipeline import Runner
from lmselect.recipe import load_recipe
from lmselect.select import bliss as B
from lmselect.select.bliss import BlissConfig, init_score_model, resolve_profile, score_sequences
from lmselect.stats import spearman
from lmselect.train.checkpoint import load_checkpoint_model

#: name -> overrides of the bliss section
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    # the z solve made second order: z warm-started across outer steps, 3 gradient steps each at η_z = 0.3
    # (about 1 / λ_max of the demo proxy's Hessian), so the curvature reweights v instead of z ≈ η_z v
    "second_order": {"z_warm_start": True, "z_steps": 3, "z_lr": 0.3},
    "paper": {"profile": "paper"},
}


def _rates(sources: np.ndarray, values: np.ndarray, fraction: float) -> dict[str, float]:
    """Rate (× base) of every source in the top ``fraction`` of ``values``."""
    k = max(1, int(round(fraction * len(values))))
    top = np.zeros(len(values), dtype=bool)
    top[np.argsort(-values, kind="stable")[:k]] = True
    base = top.mean()
    return {s: float(top[sources == s].mean() / base) for s in sorted(set(sources))}


def roc_auc(y: np.ndarray, s: np.ndarray) -> float:
    """ROC AUC of scores ``s`` for binary labels ``y`` (Mann–Whitney: the chance a positive outranks a negative)."""
    ranks = np.empty(len(s))
    ranks[np.argsort(s, kind="stable")] = np.arange(1, len(s) + 1)
    n1, n0 = int(y.sum()), int(len(y) - y.sum())
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / max(1, n1 * n0))


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-3) -> torch.Tensor:
    """Weights (bias last) of an L2-regularised logistic regression, full-batch L-BFGS."""
    xt, yt = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    w = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logit = xt @ w[:-1] + w[-1]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, yt) + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def probe_auc(x: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Mean held-out ROC AUC of :func:`fit_logistic` on standardised ``x`` over ``folds`` folds."""
    if min(int(y.sum()), int(len(y) - y.sum())) < folds:
        return float("nan")  # too few of one class to hold one out per fold
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    order = np.random.default_rng(seed).permutation(len(y))
    aucs = []
    for f in range(folds):
        test = order[f::folds]
        train = np.setdiff1d(order, test)
        w = fit_logistic(x[train], y[train]).numpy()
        aucs.append(roc_auc(y[test], x[test] @ w[:-1] + w[-1]))
    return float(np.mean(aucs))


@torch.no_grad()
def _pooled(scorer: Any, pool: Any, ids: np.ndarray, batch: int = 128) -> np.ndarray:
    """What the score model's linear head sees: its pooled features of every sequence."""
    scorer.eval()
    return torch.cat([scorer.pooled(pool.batch(ids[i : i + batch])).float() for i in range(0, len(ids), batch)]).numpy()


def run_variant(check: Path, name: str, overrides: dict[str, Any], n_cand: int, out: Path, seed: int = 0) -> dict[str, Any]:
    recipe = load_recipe(check / "run" / "config.yaml")
    pipe = Runner(recipe, check / "run")
    pool = pipe.pool
    for which in ("proxy", "target"):
        if not (check / "run" / "warmup" / which / "manifest.json").is_file():
            raise SystemExit(f"{check}/run/warmup/{which}: no warm-up checkpoint; run `lmselect check ... --method bliss` first")
    rc = pipe.round_ctx("bliss", seed, 1)  # run seed `seed`, round 1: the seeds of the pipeline's BLISS there
    base: BlissConfig = recipe.bliss
    cfg = resolve_profile(replace(base, seed=rc.derived_seed(STREAM_METHOD), **overrides))
    proxy = load_checkpoint_model(check / "run" / "warmup" / "proxy")
    target = load_checkpoint_model(check / "run" / "warmup" / "target")
    scorer = init_score_model(proxy, seed=rc.derived_seed(STREAM_SCORER_INIT, per_round=False),
                              activation=cfg.score_activation)
    cand = rc.candidates
    t0 = time.perf_counter()
    # solve_round's loop (its solver, and so the last z, is internal to it), on the same batch stream
    solver = B.BilevelSolver(cfg, proxy, target, scorer, rc.selection_set, "cpu")
    stream = B.train_stream(cfg, len(cand))
    while solver.step < cfg.outer_steps:
        solver.outer_step(B.step_batches(pool, cand, stream, cfg, solver.step))
    solve_s = time.perf_counter() - t0
    z = solver.last.z
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(cand, min(n_cand, len(cand)), replace=False))
    sources = np.asarray(pool.sources(sample))
    t0 = time.perf_counter()
    c = np.concatenate([solver.compute_c(pool.batch(sample[i : i + 32]), z).detach().double().numpy()
                        for i in range(0, len(sample), 32)])
    label_s = time.perf_counter() - t0
    scores = score_sequences(scorer, pool, sample, 128, "cpu")
    feats, loss = _pooled(scorer, pool, sample), mean_token_ce(solver.proxy, pool, sample, 128)[:, None]
    corpus = np.array([not s.startswith("planted") for s in sources])
    auc = {}
    for kind in sorted({s for s in sources if s.startswith("planted")}):
        m = corpus | (sources == kind)
        y = (sources[m] == kind).astype(int)
        auc[kind] = {"features": probe_auc(feats[m], y),
                     "features+loss": probe_auc(np.concatenate([feats[m], loss[m]], 1), y)}
    frac = recipe.select_fraction
    res = {"variant": name, "seed": seed, "overrides": overrides, "n": int(len(sample)), "solve_s": solve_s, "label_s": label_s,
           "labels": _rates(sources, c, frac), "scores": _rates(sources, scores, frac),
           "spearman_score_c": spearman(scores, c), "auc": auc,
           "last": {k: v for k, v in (solver.last.diag or {}).items()}}
    (out / f"{name}-seed{seed}.json").write_text(json.dumps(res, indent=2) + "\n")
    np.savez(out / f"{name}-seed{seed}.npz", seq_id=sample, source=sources, c=c, score=scores)  # per sequence
    return res


def markdown(results: list[dict[str, Any]]) -> str:
    kinds = sorted({k for r in results for k in r["auc"]})
    lines = ["| variant | seed | ranked by | " + " | ".join(k.replace("planted_", "") + " ×base" for k in kinds) + " | Spearman(score, c) |",
             "|---|---|---|" + "---|" * (len(kinds) + 1)]
    for r in results:
        for what in ("labels", "scores"):
            sp = f"{r['spearman_score_c']:+.2f}" if what == "scores" else ""
            lines.append(f"| {r['variant']} | {r['seed']} | {'labels c (last z)' if what == 'labels' else 'score model'} | "
                         + " | ".join(f"{r[what].get(k, float('nan')):.2f}" for k in kinds) + f" | {sp} |")
    lines += ["", "Supervised linear-probe ROC AUC of each planted kind against corpus sequences (5-fold): the score "
              "model's pooled features / + the proxy's mean token loss", "",
              "| variant | seed | " + " | ".join(k.replace("planted_", "") for k in kinds) + " |",
              "|---|---|" + "---|" * len(kinds)]
    for r in results:
        lines.append(f"| {r['variant']} | {r['seed']} | " + " | ".join(
            f"{r['auc'][k]['features']:.2f} / {r['auc'][k]['features+loss']:.2f}" for k in kinds) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", required=True, help="output directory of `lmselect check ... --method bliss`")
    ap.add_argument("--variants", default="default,second_order", help=f"comma-separated, of {sorted(VARIANTS)}")
    ap.add_argument("--candidates", type=int, default=3000, help="round-1 candidates labelled (default 3000)")
    ap.add_argument("--seeds", default="0", help="comma-separated run seeds of the solve (default 0)")
    ap.add_argument("--out", help="where the JSON and markdown go (default CHECK/labels)")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    check = Path(a.check)
    out = Path(a.out or check / "labels")
    out.mkdir(parents=True, exist_ok=True)
    names = [v for v in a.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {sorted(VARIANTS)}")
    results = []
    for name in names:
        for seed in (int(x) for x in a.seeds.split(",") if x.strip()):
            r = run_variant(check, name, VARIANTS[name], a.candidates, out, seed)
            print(f"{name} seed {seed}: solve {r['solve_s']:.0f} s, labels {r['label_s']:.0f} s", flush=True)
            results.append(r)
    md = markdown(results)
    (out / "labels.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
