"""Throughput of ``lmselect prepare`` on the bundled demo corpus (or any corpus), in tokens per second.

    python bench/prepare_throughput.py                       # demo corpus, seq_len 1024, all cores
    python bench/prepare_throughput.py --inputs 'my/*.jsonl.gz' --workers 2

Two runs into a temporary directory:

1. end to end with a freshly trained byte-level BPE (read + hash inputs + train tokenizer + tokenize + pack + write);
2. end to end with the tokenizer from run 1 (``--tokenizer``), i.e. without training.

For each it prints the tokenization+packing rate (documents read, encoded, EOS appended, rows written; timed inside
prepare, in wall seconds and per CPU-second summed over threads) and the end-to-end rate (wall time of the whole
``prepare`` call, imports excluded). Wall numbers depend on the machine's load, which is printed too.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from lmselect.data.prepare import PrepareConfig, prepare
    from lmselect.paths import DEMO_DIR

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", nargs="*", default=[str(DEMO_DIR / "corpus" / "*.jsonl.gz")])
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--workers", type=int, default=0, help="tokenizer threads (0 = all cores)")
    ap.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    args = ap.parse_args(argv)
    if not any(glob.glob(i) for i in args.inputs):
        print(f"no input matches {args.inputs}", file=sys.stderr)
        return 2

    results = {}
    with tempfile.TemporaryDirectory(prefix="lmselect-bench-") as tmp:
        runs = [("trained_bpe", None), ("given_tokenizer", str(Path(tmp) / "trained_bpe" / "tokenizer"))]
        for name, tok in runs:
            cfg = PrepareConfig(inputs=list(args.inputs), tokenizer=tok, vocab_size=args.vocab_size,
                                seq_len=args.seq_len, n_shards=5, workers=args.workers)
            t0 = time.perf_counter()
            out = prepare(cfg, Path(tmp) / name, progress=False)
            wall = time.perf_counter() - t0
            m = json.loads((out / "manifest.json").read_text())
            tokens = m["counts"]["corpus_tokens"]
            tim = m["timings"]
            results[name] = {
                "tokens": tokens,
                "documents": m["counts"]["documents"],
                "sequences": m["counts"]["sequences"],
                "tokenizer_s": round(tim["tokenizer_s"], 3),
                "tokenize_pack_s": round(tim["tokenize_pack_s"], 3),
                "wall_s": round(wall, 3),
                "tokenize_pack_cpu_s": round(tim["tokenize_pack_cpu_s"], 3),
                "tokenize_pack_tok_per_s": round(tokens / tim["tokenize_pack_s"]),
                "tokenize_pack_tok_per_cpu_s": round(tokens / tim["tokenize_pack_cpu_s"]),
                "end_to_end_tok_per_s": round(tokens / wall),
                "threads": m["extra"]["tokenizer_threads"],
            }
    info = {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), "seq_len": args.seq_len, "vocab_size": args.vocab_size, "runs": results}
    if args.json:
        print(json.dumps(info))
        return 0
    print(
        f"prepare throughput ({info['cpus']} CPUs visible, load average {info['load_avg_1m']}, "
        f"seq_len {args.seq_len}, vocab {args.vocab_size})"
    )
    for name, r in results.items():
        print(
            f"  {name:16s} {r['tokens'] / 1e6:6.2f} M tokens, {r['documents']} docs | tokenize+pack "
            f"{r['tokenize_pack_tok_per_s'] / 1e6:5.2f} M tok/s ({r['tokenize_pack_s']:.2f}s wall, "
            f"{r['tokenize_pack_tok_per_cpu_s'] / 1e6:.2f} M tok per CPU-s) | end to end "
            f"{r['end_to_end_tok_per_s'] / 1e6:5.2f} M tok/s ({r['wall_s']:.2f}s, tokenizer {r['tokenizer_s']:.2f}s, "
            f"{r['threads']} threads)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
