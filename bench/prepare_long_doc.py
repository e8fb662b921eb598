"""Peak memory of ``lmselect prepare`` on one very long single-line document (issue 21, item 5).

    python bench/prepare_long_doc.py                 # a 50 MB document, BPE trained on it, then a reused tokenizer
    python bench/prepare_long_doc.py --mb 10 --json

A corpus file with one real-looking 50 MB document (English sentences from ``lmselect.testing.SAMPLE_TEXT`` in a
seeded random order, paragraphs separated by blank lines: a crawl page that never ends) and a few short ones is
written to a temporary directory, then prepared twice, each time in a fresh child process whose peak resident set
size (``ru_maxrss`` of the child, read with ``resource.getrusage(RUSAGE_CHILDREN)`` in a wrapper process) is reported:

1. ``prepare`` with a byte-level BPE trained on the corpus (the default);
2. ``prepare --tokenizer`` with the tokenizer from run 1 (tokenize + pack only).

Before the fix the same 50 MB document took 9.5 GB peak (issue 21); long texts are now encoded in pieces of
``lmselect.data.tokenizer.LONG_TEXT_CHARS`` characters cut at whitespace runs. Measured once (2 shared CPU cores,
10.3 M tokens): 347 MB peak RSS / 59 s with the BPE trained on the corpus, 250 MB / 35 s with a given tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _write_corpus(path: Path, mb: float, seed: int = 0) -> int:
    import numpy as np

    from lmselect.testing import SAMPLE_TEXT

    rng = np.random.default_rng(seed)
    target = int(mb * 1_000_000)
    parts, n = [], 0
    while n < target:
        para = " ".join(rng.choice(SAMPLE_TEXT, size=int(rng.integers(3, 12))))
        parts.append(para)
        n += len(para) + 2
    long_text = "\n\n".join(parts)[:target]
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"id": "short-0", "text": SAMPLE_TEXT[0]}) + "\n")
        f.write(json.dumps({"id": "the-long-one", "text": long_text}) + "\n")
        for i in range(1, 4):
            f.write(json.dumps({"id": f"short-{i}", "text": SAMPLE_TEXT[i]}) + "\n")
    return len(long_text)


_WRAP = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def _measure(args: list[str]) -> tuple[float, float]:
    """Run ``python -m lmselect.cli ARGS`` under a fresh wrapper interpreter whose only child it is, and return
    (wall seconds, peak RSS of that child in MB): ru_maxrss of RUSAGE_CHILDREN is a maximum over the waited-for
    children, so each measurement gets its own wrapper."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _WRAP, sys.executable, "-m", "lmselect.cli", *args], check=True,
                         capture_output=True, text=True)
    return time.perf_counter() - t0, int(out.stdout.strip().splitlines()[-1]) / 1024.0  # KiB on Linux


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=50.0, help="size of the long document in MB (characters)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    args = ap.parse_args(argv)
    env_threads = os.environ.get("RAYON_NUM_THREADS")
    with tempfile.TemporaryDirectory(prefix="lmselect-longdoc-") as d:
        d = Path(d)
        n_chars = _write_corpus(d / "corpus.jsonl", args.mb)
        common = ["--seq-len", str(args.seq_len), "--n-shards", "1", "--no-progress"]
        wall_bpe, rss_bpe = _measure(["prepare", str(d / "corpus.jsonl"), "--out", str(d / "pool"), *common])
        wall_tok, rss_tok = _measure(["prepare", str(d / "corpus.jsonl"), "--out", str(d / "pool_tok"),
                                      "--tokenizer", str(d / "pool" / "tokenizer"), *common])
        m = json.loads((d / "pool" / "manifest.json").read_text())
    res = {"document_mb": n_chars / 1e6, "seq_len": args.seq_len, "corpus_tokens": m["counts"]["corpus_tokens"],
           "train_bpe_and_prepare": {"wall_s": round(wall_bpe, 1), "peak_rss_mb": round(rss_bpe)},
           "prepare_with_tokenizer": {"wall_s": round(wall_tok, 1), "peak_rss_mb": round(rss_tok)},
           "rayon_threads": env_threads, "cpus": os.cpu_count()}
    if args.json:
        print(json.dumps(res))
    else:
        print(f"one {res['document_mb']:.0f} MB document ({res['corpus_tokens']} tokens):")
        print(f"  prepare, BPE trained on it: {rss_bpe:,.0f} MB peak RSS, {wall_bpe:.1f} s")
        print(f"  prepare --tokenizer:        {rss_tok:,.0f} MB peak RSS, {wall_tok:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
