#!/usr/bin/env python3
"""Scoring throughput of the datatrove step with 1 vs 2 worker processes on CPU (lmselect.integrations.datatrove).

    python bench/datatrove_scaling.py                          # 2 tasks, workers 1 then 2, 400 docs, debug model
    python bench/datatrove_scaling.py --docs 2000 --tasks 4 --workers 1 2 4 --preset pythia-14m

A corpus of ``--docs`` documents (the bundled demo text, cut into ~``--words``-word records, over ``--tasks`` files)
is scored by ``LocalPipelineExecutor(JsonlReader -> LmselectScorer -> JsonlWriter, tasks, workers)`` with a fresh
score model (a SequenceScorer on the preset, untrained: throughput does not depend on the weights), one torch thread
per worker. Prints, for each worker count, documents/s of the wall time of ``executor.run()`` (start-up included:
with workers > 1 each worker process imports torch and loads the model; with 1 the tasks run in this process) and of
the scoring step alone (the scorer's own time from datatrove's per-task stats: summed over tasks for 1 worker, the
slowest task for parallel workers), and the speed-up over one worker; ``--shard i/n`` array tasks scale the same way (independent processes, no collective).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_corpus(d: Path, n_docs: int, n_files: int, words: int) -> None:
    import gzip

    texts = []
    for p in sorted((REPO / "data" / "demo" / "corpus").glob("*.jsonl.gz")):
        with gzip.open(p, "rt") as fh:
            texts += [json.loads(line)["text"] for line in fh]
    toks = " ".join(texts).split() or ("lorem ipsum " * 5000).split()
    d.mkdir(parents=True)
    per = (n_docs + n_files - 1) // n_files
    k = 0
    for f in range(n_files):
        with open(d / f"part{f}.jsonl", "w") as fh:
            for _ in range(min(per, n_docs - k)):
                s = (k * words) % max(1, len(toks) - words)
                fh.write(json.dumps({"id": f"d{k}", "text": " ".join(toks[s : s + words])}) + "\n")
                k += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=400)
    ap.add_argument("--words", type=int, default=200)
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--preset", default="debug")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    from lmselect.integrations.datatrove import LmselectScorer
    from lmselect.models.presets import build_model
    from lmselect.models.scorer import SequenceScorer
    from lmselect.testing import make_pool, make_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tok = make_tokenizer()
        pool = make_pool(work / "pool", tok)
        model = work / "scorer"
        SequenceScorer.from_causal_lm(build_model(args.preset, len(tok), seed=0), seed=0).save_pretrained(model)
        make_corpus(work / "corpus", args.docs, args.tasks, args.words)
        rows = []
        for w in args.workers:
            t0 = time.perf_counter()
            LocalPipelineExecutor(
                pipeline=[JsonlReader(str(work / "corpus")),
                          LmselectScorer(model, pool, seq_len=args.seq_len, batch_size=args.batch_size, device="cpu"),
                          JsonlWriter(str(work / f"out-{w}"))],
                tasks=args.tasks, workers=w, logging_dir=str(work / f"logs-{w}"),
            ).run()
            secs = time.perf_counter() - t0
            step_secs = []
            for f in sorted((work / f"logs-{w}" / "stats").glob("*.json")):
                for st in json.loads(f.read_text()):
                    if "lmselect scorer" in st.get("name", ""):
                        step_secs.append(float(st["time_stats"]["total"]))
            scoring = sum(step_secs) if w == 1 else max(step_secs)
            rows.append({"workers": w, "tasks": args.tasks, "docs": args.docs, "wall_s": round(secs, 2),
                         "docs_per_s_wall": round(args.docs / secs, 1), "scoring_s": round(scoring, 2),
                         "docs_per_s_scoring": round(args.docs / scoring, 1)})
        for r in rows:
            r["speedup_wall"] = round(r["docs_per_s_wall"] / rows[0]["docs_per_s_wall"], 2)
            r["speedup_scoring"] = round(r["docs_per_s_scoring"] / rows[0]["docs_per_s_scoring"], 2)
            print(json.dumps(r))
        print(json.dumps({"cpus": os.cpu_count(), "loadavg_1min": round(os.getloadavg()[0], 2),
                          "preset": args.preset, "seq_len": args.seq_len}))


if __name__ == "__main__":
    main()
