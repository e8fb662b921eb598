#!/usr/bin/env python3
"""The cost curve of lmselect from a laptop pool to a 100B-token corpus (issue 31): every corpus-sized step run on
corpora of several sizes, with its throughput, wall time, peak memory, fitted growth and projections.

    python bench/corpus_scale.py --sizes 2.5M                      # the smallest size only (a few minutes)
    python bench/corpus_scale.py --sizes 2.5M 25M 125M             # the full curve: hours; needs an idle machine

Corpora: the bundled demo corpus (``lmselect.paths.DEMO_DIR / "corpus"``, 1,444 documents of eight kinds of English
text) copied until the size is reached, each copy perturbed (3 % of the words replaced by another word of the
corpus, 2 % of adjacent word pairs swapped; seeded by the copy number) so that no two documents are equal, written
as 8 ``.jsonl.zst`` shards. Sizes are in tokens of a byte-level BPE (vocab 8,192) trained once on the bundled text.

Steps, each one process under ``/usr/bin/time -v`` (CPU seconds = user + system of the process and its children,
because the machine may be shared; wall seconds; peak RSS = the largest process of the step):

* ``prepare`` without a prefilter and with the demo's (``gopher_repetition,c4``), each at ``--tasks 1`` and ``2``
  (seq_len 512, 5 shards, the given tokenizer); with 2 tasks the workers are datatrove's forkserver processes, which
  ``time`` does not see: their CPU seconds and peak RSS come from the pool manifest (``tokenize_pack_cpu_s``,
  ``task_max_rss_mb``, measured inside each task) and are added / maxed in;
* ``score pool``: ``lmselect score --lm-loss`` with an untrained ``debug``-preset model on pool shard 1 (a fifth of
  the pool): the scoring job, not the model, is what is measured;
* ``score jsonl``: the same model on the raw shards, ``--shard 0/5`` (shard 0 reads 2 of the 8 files, streamed in
  blocks of lines; the merge waits for the other shards, so it is not in this step);
* ``select`` (top 10 % of the pool scores) and ``export`` of that selection.

Per step it prints tokens (of the corpus) per CPU-second, wall, peak RSS; with two or more sizes the fitted growth
(log-log slope of CPU seconds in tokens; RSS slope in MB per million tokens and the ratio of the two largest sizes)
and the projection to 1B and 100B tokens: CPU hours on one core, and wall hours on a 64-task array (the parallel
steps -- prepare's tasks, scoring -- divided by 64; prepare's merge, select and export stay serial). The table goes
to ``benchmarks/results/YYYY-MM-corpus-scale.md`` (appended, with the commit, the machine and the command).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
N_SHARDS_FILES = 8
SEQ_LEN = 512
VOCAB = 8192
PREFILTER = "gopher_repetition,c4"
ARRAY_TASKS = 64


def parse_size(s: str) -> int:
    m = re.fullmatch(r"([\d.]+)\s*([kKmMbB]?)", s.strip())
    if not m:
        raise SystemExit(f"--sizes: cannot read {s!r} (use 2.5M, 25M, 1B)")
    mult = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def bundled_docs() -> list[dict]:
    from lmselect.paths import DEMO_DIR

    docs = []
    for p in sorted((DEMO_DIR / "corpus").glob("*.jsonl.gz")):
        with gzip.open(p, "rt", encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                docs.append({"id": r.get("id") or f"{p.name}:{len(docs)}", "text": r["text"],
                             "source": r.get("source") or p.name.split(".")[0]})
    return docs


def perturb(text: str, rng: np.random.Generator, vocab: np.ndarray) -> str:
    """3 % of the words replaced by a corpus word, 2 % of adjacent pairs swapped; line breaks kept (C4 reads lines)."""
    lines = text.split("\n")
    out = []
    for line in lines:
        w = line.split(" ")
        n = len(w)
        if n > 1:
            rep = np.flatnonzero(rng.random(n) < 0.03)
            for i in rep:
                w[i] = str(vocab[rng.integers(len(vocab))])
            for i in np.flatnonzero(rng.random(n - 1) < 0.02):
                w[i], w[i + 1] = w[i + 1], w[i]
        out.append(" ".join(w))
    return "\n".join(out)


def train_tokenizer(work: Path, docs: list[dict]) -> Path:
    tok_dir = work / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file():
        return tok_dir
    from lmselect.data.tokenizer import train_bpe

    tok = train_bpe((d["text"] for d in docs), VOCAB, model_max_length=SEQ_LEN)
    tok.save_pretrained(str(tok_dir))
    return tok_dir


def build_corpus(work: Path, target_tokens: int, docs: list[dict], tok_dir: Path) -> tuple[Path, int]:
    """8 .jsonl.zst shards of perturbed copies of the bundled corpus, about ``target_tokens`` tokens."""
    import zstandard

    from lmselect.data.tokenizer import batch_encoder, load_tokenizer

    d = work / f"corpus-{target_tokens}"
    meta = d / "corpus.json"
    if meta.is_file():
        return d, json.loads(meta.read_text())["tokens"]
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    encode = batch_encoder(load_tokenizer(tok_dir))
    base_tokens = sum(len(x) + 1 for x in encode([x["text"] for x in docs]))
    copies = max(1, math.ceil(target_tokens / base_tokens))
    vocab = np.array(sorted({w for x in docs[:400] for w in x["text"].split() if w.isalpha()}))
    writers = [zstandard.ZstdCompressor(level=3).stream_writer(open(d / f"shard-{i:02d}.jsonl.zst", "wb"))
               for i in range(N_SHARDS_FILES)]
    k = 0
    for c in range(copies):
        rng = np.random.default_rng(c)
        for x in docs:
            text = x["text"] if c == 0 else perturb(x["text"], rng, vocab)
            rec = {"id": f"c{c}-{x['id']}", "text": text, "source": x["source"]}
            writers[k % N_SHARDS_FILES].write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
            k += 1
    for w in writers:
        w.close()
    tokens = base_tokens * copies  # perturbation changes the count by a little; the pools' manifests say exactly
    meta.write_text(json.dumps({"copies": copies, "documents": k, "tokens": tokens}))
    return d, tokens


def make_model(work: Path, tok_dir: Path) -> Path:
    """An untrained ``debug``-preset causal LM saved with the tokenizer: scoring cost does not depend on weights."""
    m = work / "model"
    if (m / "config.json").is_file():
        return m
    from lmselect.models.presets import build_model, get_preset

    lm = build_model(get_preset("debug"), VOCAB, seed=0, device="cpu")
    lm.save_pretrained(str(m))
    for f in tok_dir.iterdir():
        shutil.copy(f, m / f.name)
    return m


def timed(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` under /usr/bin/time -v: wall, CPU (user + sys, children included), peak RSS; fail loudly."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    log.write_text(f"$ {shlex.join(cmd)}\n{r.stdout}\n{r.stderr}")
    if r.returncode != 0:
        raise SystemExit(f"step failed (exit {r.returncode}): {shlex.join(cmd)}; see {log}")

    def field(name: str) -> str:
        m = re.search(rf"{re.escape(name)}: (.+)", r.stderr)
        return m.group(1).strip() if m else "0"

    return {"wall_s": wall, "cpu_s": float(field("User time (seconds)")) + float(field("System time (seconds)")),
            "rss_mb": int(field("Maximum resident set size (kbytes)")) / 1024}


def run_size(work: Path, size: int, docs: list[dict], tok_dir: Path, model: Path, steps: list[str]) -> dict:
    corpus, _ = build_corpus(work, size, docs, tok_dir)
    py = [sys.executable, "-m", "lmselect.cli"]
    shards = sorted(str(p) for p in corpus.glob("*.jsonl.zst"))
    out = work / f"runs-{size}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    res: dict = {"size": size, "steps": {}}
    prep = [*shards, "--tokenizer", str(tok_dir), "--seq-len", str(SEQ_LEN), "--n-shards", "5", "--no-progress"]
    pool = None
    for pf in ("none", PREFILTER):
        for tasks in (1, 2):
            name = f"prepare {'prefilter' if pf != 'none' else 'plain'} x{tasks}"
            if name not in steps:
                continue
            dest = out / f"pool-{'pf' if pf != 'none' else 'plain'}-{tasks}"
            r = timed([*py, "prepare", *prep, "--prefilter", pf, "--tasks", str(tasks), "--out", str(dest)],
                      out / f"{name.replace(' ', '_')}.log")
            m = json.loads((dest / "manifest.json").read_text())
            r["merge_s"] = m["timings"].get("index_write_s", 0.0)  # the serial part (prepare's merge)
            if tasks > 1:  # tasks run in datatrove's worker processes, which /usr/bin/time does not see
                r["cpu_s"] += m["timings"]["tokenize_pack_cpu_s"]
                r["rss_mb"] = max(r["rss_mb"], m["timings"]["task_max_rss_mb"])
            res["steps"][name] = r
            if pf == "none":
                pool = dest
                res["tokens"] = m["counts"]["corpus_tokens"]
    if pool is None:
        raise SystemExit("a plain prepare step is needed (the pool the other steps read, and the corpus's tokens)")
    tokens = res["tokens"]  # every step's figures are per token of the corpus (with EOS), whatever it reads
    for r in res["steps"].values():
        r["tokens"] = tokens
    scores = out / "scores-pool"
    if "score pool" in steps:
        r = timed([*py, "score", "--model", str(model), "--lm-loss", "--pool", str(pool), "--pool-shard", "1",
                   "--out", str(scores), "--device", "cpu", "--batch-size", "16", "--no-progress"],
                  out / "score_pool.log")
        res["steps"]["score pool"] = dict(r, tokens=tokens)
    if "score jsonl" in steps:
        r = timed([*py, "score", "--model", str(model), "--lm-loss", "--jsonl", str(corpus), "--tokenizer-from",
                   str(pool), "--seq-len", str(SEQ_LEN), "--shard", "0/5", "--num-parts", "5",
                   "--out", str(out / "scores-jsonl"), "--device", "cpu", "--batch-size", "16", "--no-progress"],
                  out / "score_jsonl.log")
        res["steps"]["score jsonl"] = dict(r, tokens=tokens)
    if "select" in steps and scores.is_dir():
        r = timed([*py, "select", "--scores", str(scores), "--fraction", "0.1", "--out", str(out / "sel")],
                  out / "select.log")
        res["steps"]["select"] = dict(r, tokens=tokens)
    if "export" in steps and (out / "sel").is_dir():
        r = timed([*py, "export", str(out / "sel"), "--out", str(out / "export")], out / "export.log")
        res["steps"]["export"] = dict(r, tokens=tokens)
    return res


def fit(results: list[dict], step: str) -> dict:
    pts = [(r["steps"][step]["tokens"], r["steps"][step]) for r in results if step in r["steps"]]
    pts.sort(key=lambda x: x[0])
    t = np.array([p[0] for p in pts], dtype=float)
    cpu = np.array([p[1]["cpu_s"] for p in pts])
    rss = np.array([p[1]["rss_mb"] for p in pts])
    out: dict = {"n": len(pts), "tok_per_cpu_s": t[-1] / max(cpu[-1], 1e-9)}
    slope = 1.0
    if len(pts) >= 2:
        slope = float(np.polyfit(np.log(t), np.log(np.maximum(cpu, 1e-3)), 1)[0])
        b = float(np.polyfit(t / 1e6, rss, 1)[0])
        out.update(cpu_exponent=slope, rss_mb_per_mtok=b, rss_ratio=float(rss[-1] / rss[-2]))
    serial = 1.0 if step in ("select", "export") else 0.0
    for target, label in ((1e9, "1B"), (1e11, "100B")):
        cpu_t = cpu[-1] * (target / t[-1]) ** slope
        merge = pts[-1][1].get("merge_s", 0.0) * target / t[-1]
        out[f"core_h_{label}"] = cpu_t / 3600
        par = cpu_t if serial else (cpu_t - merge) / ARRAY_TASKS + merge
        out[f"array_h_{label}"] = par / 3600
        if len(pts) >= 2:
            out[f"rss_gb_{label}"] = (rss[-1] + out["rss_mb_per_mtok"] * (target - t[-1]) / 1e6) / 1024
    return out


def machine() -> str:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.node()}: {os.cpu_count()} CPUs ({model}), {mem:.0f} GiB RAM, load average "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end, Python {platform.python_version()}")


def report(results: list[dict], steps: list[str]) -> str:
    lines = ["| step | " + " | ".join(f"{r['tokens'] / 1e6:.1f}M tok: tok/CPU-s, wall s, peak RSS MB" for r in results)
             + " | CPU exponent | RSS MB per M tok (ratio of the 2 largest) | 1B: core h / 64-task h / RSS GB "
             "| 100B: core h / 64-task h / RSS GB |", "|" + "---|" * (len(results) + 5)]
    for s in steps:
        if not any(s in r["steps"] for r in results):
            continue
        cells = []
        for r in results:
            x = r["steps"].get(s)
            cells.append("–" if x is None else f"{x['tokens'] / max(x['cpu_s'], 1e-9) / 1e3:,.0f}k, "
                                                f"{x['wall_s']:.1f}, {x['rss_mb']:,.0f}")
        f = fit(results, s)
        growth = (f"{f['cpu_exponent']:.2f}", f"{f['rss_mb_per_mtok']:+.2f} ({f['rss_ratio']:.2f}x)") \
            if "cpu_exponent" in f else ("n/a (one size)", "n/a (one size)")
        proj = []
        for label in ("1B", "100B"):
            rss = f"{f[f'rss_gb_{label}']:.1f}" if f"rss_gb_{label}" in f else "n/a"
            proj.append(f"{f[f'core_h_{label}']:,.1f} / {f[f'array_h_{label}']:,.2f} / {rss}")
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {growth[0]} | {growth[1]} | {proj[0]} | {proj[1]} |")
    return "\n".join(lines)


STEPS = ["prepare plain x1", "prepare plain x2", "prepare prefilter x1", "prepare prefilter x2", "score pool",
         "score jsonl", "select", "export"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["2.5M"], help="corpus sizes in tokens (2.5M 25M 125M)")
    ap.add_argument("--work", default="/tmp/lmselect-corpus-scale", help="corpora and runs (kept for reruns)")
    ap.add_argument("--steps", nargs="+", default=STEPS, choices=STEPS, metavar="STEP",
                    help=f"steps to run (default all: {', '.join(STEPS)})")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results"),
                    help="folder of the dated results file (YYYY-MM-corpus-scale.md, appended)")
    ap.add_argument("--no-results", action="store_true", help="print only")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    docs = bundled_docs()
    tok_dir = train_tokenizer(work, docs)
    model = make_model(work, tok_dir)
    results = []
    for s in sorted(args.sizes, key=parse_size):
        print(f"corpus of ~{s} tokens ...", flush=True)
        results.append(run_size(work, parse_size(s), docs, tok_dir, model, args.steps))
        print(report(results, args.steps), flush=True)
    table = report(results, args.steps)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    cmd = "python bench/corpus_scale.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    now = dt.datetime.now(dt.timezone.utc)
    text = (f"\n## {now:%Y-%m-%d %H:%M} UTC: {', '.join(args.sizes)} tokens\n\n"
            f"- command: `{cmd}`\n- commit: {commit}{' (with uncommitted changes)' if dirty else ''}\n"
            f"- machine: {machine()}\n- corpora: bundled demo corpus, perturbed copies, {N_SHARDS_FILES} .jsonl.zst "
            f"shards; seq_len {SEQ_LEN}; BPE vocab {VOCAB}; prefilter `{PREFILTER}`; score model: untrained "
            f"`debug` preset, --lm-loss, CPU; score pool = shard 1 of 5, score jsonl = --shard 0/5\n"
            f"- cells: tokens of the corpus per CPU-second (user + sys, children included), wall seconds, peak RSS "
            f"(largest process); projections: CPU exponent fitted over the sizes (1.0 with one size), RSS linear; "
            f"64-task array = parallel part / 64 + serial part (prepare's merge, select, export)\n\n{table}\n")
    print(text)
    if not args.no_results:
        res_dir = Path(args.results)
        res_dir.mkdir(parents=True, exist_ok=True)
        path = res_dir / f"{now:%Y-%m}-corpus-scale.md"
        if not path.exists():  # the results folder's header (benchmarks/results/README.md): the file's first run
            path.write_text(f"# Corpus-scale cost curve (bench/corpus_scale.py)\n\n- **Date:** {now:%Y-%m-%d}\n"
                            f"- **Commit:** {commit}\n- **Machine:** {machine()}\n- **Command:** `{cmd}`\n\n"
                            "Each run below is appended with its own date, commit, machine and command.\n")
        with open(path, "a") as f:
            f.write(text)
        print(f"results appended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
