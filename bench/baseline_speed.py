"""Selection speed of the cheap baselines: a fastText and a DSIR selection of one shard of a pool.

What is timed (wall clock, one process): everything a round's ``select`` does for the method, on the pool's shard
``--shard`` as the candidates and the selection set's items as the target:

* decoding the candidates (and the negatives) to text with the pool's tokenizer;
* fastText: training the bigram classifier (selection set vs hold-out sample, in its child process) and predicting
  P(target) of every candidate;
* DSIR: hashing the unigrams + bigrams of target and candidates, fitting both distributions, the log importance
  weights, and Gumbel-top-k.

Documents/s counts candidate pool sequences (each ``seq_len`` tokens) per second of the whole selection. Run on a
prepared pool, e.g. the demo's (``lmselect demo`` or ``lmselect check demo`` prepare one)::

    python bench/baseline_speed.py --pool runs/demo/pool --selection src/lmselect/data/demo/lambada_select.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    from lmselect.data.pool import TokenPool
    from lmselect.data.valset import load_validation
    from lmselect.select.dsir import DsirConfig, dsir_log_weights
    from lmselect.select.fasttext import FastTextConfig, classify
    from lmselect.select.texts import pool_texts, valset_texts, words
    from lmselect.select.topk import gumbel_topk, random_fraction

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", required=True, help="prepared pool directory")
    ap.add_argument("--selection", required=True, help="selection-set file (.jsonl, LAMBADA passages)")
    ap.add_argument("--shard", type=int, default=1)
    ap.add_argument("--fraction", type=float, default=0.2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ft-epoch", type=int, default=20)
    ap.add_argument("--ft-bucket", type=int, default=200_000)
    ap.add_argument("--out", help="write the figures as JSON here")
    a = ap.parse_args()

    pool = TokenPool(a.pool)
    tok = pool.load_tokenizer()
    vs = load_validation(a.selection, tok, kind="lambada", seq_len=pool.seq_len, max_items=250)
    cand = pool.ids(a.shard)
    hold = np.setdiff1d(pool.ids(0), random_fraction(pool.ids(0), 0.5, seed=3))
    res: dict[str, list[float]] = {"fasttext": [], "dsir": []}
    for r in range(a.repeats):
        t0 = time.perf_counter()
        target = [t for t in valset_texts(vs, tok) if words(t)]
        neg = np.sort(np.random.default_rng(r).choice(hold, size=min(len(hold), len(target)), replace=False))
        p, _ = classify(target, pool_texts(pool, neg), pool_texts(pool, cand),
                        FastTextConfig(epoch=a.ft_epoch, bucket=a.ft_bucket), seed=r)
        res["fasttext"].append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        target = [t for t in valset_texts(vs, tok) if words(t)]
        logw = dsir_log_weights(target, pool_texts(pool, cand), DsirConfig())
        gumbel_topk(cand, logw, a.fraction, 1.0, seed=r)
        res["dsir"].append(time.perf_counter() - t0)
    out = {"pool": str(a.pool), "candidates": int(len(cand)), "seq_len": pool.seq_len, "target_items": len(target),
           **{m: {"seconds": float(np.median(v)), "documents_per_s": float(len(cand) / np.median(v)),
                  "all_seconds": v} for m, v in res.items()}}
    for m in ("fasttext", "dsir"):
        print(f"{m:9s} {out[m]['seconds']:7.2f} s   {out[m]['documents_per_s']:9.0f} documents/s   "
              f"({len(cand)} candidates x {pool.seq_len} tokens; median of {a.repeats})")
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
