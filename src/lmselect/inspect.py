"""Summarise an artifact: a pool's manifest and sample sequences, or any other artifact's lineage.

    lmselect inspect pools/demo --n 3 --shard 0
    lmselect inspect runs/demo

``--verify`` first checks the full content hash of every checksummed file (a pool's ``tokens.bin``, a checkpoint's
``model.safetensors``) of the artifact and of every artifact below it (a run directory), and fails on the first
mismatch; the hash checked on every open samples ~1 MiB and can miss a single flipped byte.

For a pool: counts per shard and per source, tokenizer, seq_len, skipped records, inputs, then ``--n`` decoded
sequences (with the documents they contain). For anything else (a run directory, a checkpoint, scores, ...) the
lineage printer of :mod:`lmselect.provenance` is used.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from lmselect.artifacts import MANIFEST, LmselectError, is_complete, read_json, read_manifest, verify_checksums
from lmselect.data.decontam import summary_line as decontam_line
from lmselect.data.pool import TokenPool
from lmselect.data.prefilter import read_dropped, source_rows, summary_line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="pool directory, run directory or any artifact directory")
    parser.add_argument("--n", type=int, default=3, help="how many sequences to decode (pools; default 3)")
    parser.add_argument("--shard", default=None, help="decode sequences of this shard (-1 or 'val' = hold-out)")
    parser.add_argument("--seed", type=int, default=0, help="which sequences are sampled (default 0)")
    parser.add_argument("--max-chars", dest="max_chars", type=int, default=600, help="truncate each decoded sample")
    parser.add_argument(
        "--verify", action="store_true", help="check the full content hashes of the artifact (and those below it)"
    )
    parser.add_argument("--recipe", default=None,
                        help="run directories: also list the stages a rerun of this recipe (plus --key=value "
                             "overrides) would refuse as stale (default: compare with the run's config.yaml)")


def verify_tree(path: str | Path, out: TextIO | None = None) -> int:
    """Full-hash check of every complete artifact at or below ``path`` whose manifest records checksums.

    Returns the number of files checked; raises ``ChecksumError`` naming the first file whose content differs.
    """
    out = out or sys.stdout
    root = Path(path)
    n = 0
    for m in sorted([root / MANIFEST] + list(root.rglob(f"*/{MANIFEST}"))):
        d = m.parent
        if not m.is_file() or not is_complete(d):
            continue
        names = verify_checksums(d, read_json(m), full=True, fix_hint="rebuild it (lmselect prepare / train)")
        for name in names:
            out.write(f"verified {d / name}\n")
        n += len(names)
    if n == 0:
        out.write(f"{root}: no checksummed files (artifacts written before checksums existed)\n")
    return n


def _is_pool(path: Path) -> bool:
    m = path / MANIFEST
    if m.is_file():
        return read_json(m).get("kind") == "pool"
    # an incomplete pool has its data files but no manifest: report that instead of calling it a run
    return (path / "tokens.bin").exists() and (path / "sequences.parquet").exists()


def _table(rows: list[list[Any]], header: list[str], out: TextIO) -> None:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for j, r in enumerate(cells):
        out.write("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + "\n")
        if j == 0:
            out.write("  " + "  ".join("-" * w for w in widths) + "\n")


def _shard_arg(shard: str | None) -> int | None:
    if shard is None:
        return None
    if str(shard).lower() == "val":
        return -1
    try:
        return int(shard)
    except ValueError:
        raise LmselectError(f"--shard: expected an integer or 'val', got {shard!r}") from None


def print_pool_summary(path: str | Path, n: int = 3, shard: int | None = None, seed: int = 0, max_chars: int = 600,
                       out: TextIO | None = None) -> None:
    """Print a pool's manifest summary and ``n`` decoded sample sequences (from ``shard``, or from all training shards)."""
    out = out or sys.stdout
    pool = TokenPool(path)  # refuses incomplete pools with a one-line error
    m = pool.manifest
    c, x = m.get("counts", {}), m.get("extra", {})
    out.write(f"pool {pool.path}\n")
    out.write(f"  uuid {m.get('uuid')}  created {m.get('created')}  git {m.get('git_commit')}  config {m.get('config_hash')}\n")
    tok = x.get("tokenizer", {})
    tok_desc = tok.get("path") or (f"trained {tok.get('kind', 'BPE')}" if tok.get("trained") else "bundled")
    out.write(
        f"  tokenizer {tok_desc} (vocab {pool.vocab_size}, eos {pool.eos_id}, fingerprint {pool.tokenizer_fingerprint})"
        f"  seq_len {pool.seq_len}  dtype {pool.dtype.name}  seed {m.get('seed')}\n"
    )
    totals = f"  {pool.n_sequences} sequences, {c.get('tokens', pool.n_sequences * pool.seq_len)} tokens"
    if "documents" in c:
        totals += f", {c['documents']} documents, {c.get('dropped_tail_tokens', 0)} tail tokens dropped"
    out.write(totals + "\n")

    out.write("\nshards\n")
    per_shard = c.get("per_shard")
    shards = sorted(set(pool.shard.tolist()))
    rows = []
    for s in shards:
        k = int((pool.shard == s).sum())
        docs = per_shard.get(str(s), {}).get("documents", "") if per_shard else ""
        rows.append(["val (-1)" if s == -1 else str(s), k, k * pool.seq_len, docs])
    _table(rows, ["shard", "sequences", "tokens", "documents"], out)

    out.write("\nsources\n")
    per_source = c.get("per_source")
    srcs = pool.sources()
    rows = []
    for name in pool.source_names:
        info = per_source.get(name, {}) if per_source else {}
        rows.append([name, int((srcs == name).sum()), info.get("documents", ""), info.get("tokens", "")])
    _table(rows, ["source", "sequences (majority)", "documents", "tokens"], out)

    if "skipped" in c:
        out.write(f"\nrecords read {c.get('records')}, malformed skipped {c['skipped']}, empty {c.get('empty_records', 0)}\n")
        for reason, k in c.get("skipped_by_reason", {}).items():
            out.write(f"  {reason}: {k}\n")
        for ex in c.get("skipped_examples", [])[:5]:
            out.write(f"  e.g. {ex}\n")
    if x.get("prefilter"):  # datatrove heuristic filters (lmselect.data.prefilter)

        pre = x["prefilter"]
        out.write(f"\n{summary_line(pre)}\n")
        for fname, v in pre.get("by_filter", {}).items():
            out.write(f"  {fname}: {v['dropped']} ({', '.join(f'{k} {n}' for k, n in v['reasons'].items()) or '-'})\n")
        _table(source_rows(pre), ["source", "documents", "removed", "by filter", "chars kept"], out)
        dropped = read_dropped(pool.path)
        if dropped:
            ex = ", ".join(f"{r['id']} ({r['filter']}: {r['reason']})" for r in dropped[:5])
            out.write(f"  {pool.path / pre.get('file', 'prefilter_dropped.jsonl')}: {len(dropped)} rows, e.g. {ex}\n")
    if x.get("decontamination"):  # n-gram overlap with the protected sets (lmselect.data.decontam)

        dec = x["decontamination"]
        out.write(f"\n{decontam_line(dec)}\n")
        for label, ps in dec.get("per_set", {}).items():
            out.write(f"  {label}: {ps.get('n_texts')} texts, {ps.get('docs_matched')} pool documents match\n")
        for src, v in sorted(dec.get("per_source", {}).items()):
            if v.get("contaminated"):
                out.write(f"  source {src}: {v['contaminated']} of {v.get('docs')} documents overlap, "
                          f"{v.get('dropped', 0)} dropped\n")
    else:
        out.write("\ndecontamination: off (prepared without --decontaminate: the pool was not checked against the "
                  "validation, report or task texts)\n")
    if x.get("inputs"):
        out.write("\ninputs\n")
        for i in x["inputs"]:
            sha = (i.get("sha256") or "")[:12]
            out.write(f"  {i['path']}  {i.get('bytes')} bytes  sha256 {sha}  {i.get('documents', '?')} docs\n")

    ids = pool.ids(shard) if shard is not None else pool.ids()
    if shard is not None and len(ids) == 0:
        raise LmselectError(f"{pool.path}: shard {shard} has no sequences (shards: {', '.join(map(str, shards))})")
    if n <= 0 or len(ids) == 0:
        return
    pick = np.sort(np.random.default_rng(seed).choice(ids, size=min(n, len(ids)), replace=False))
    spans = pool.doc_spans()
    span_seq = spans.column("seq_id").to_numpy()
    span_doc = spans.column("doc_id").to_pylist()
    tok_obj = pool.load_tokenizer()
    out.write(f"\nsamples ({len(pick)} of {len(ids)} sequences{'' if shard is None else f' in shard {shard}'})\n")
    for sid in pick:
        docs = [span_doc[i] for i in np.flatnonzero(span_seq == sid)]
        text = tok_obj.decode(pool.tokens[int(sid)].tolist())
        if len(text) > max_chars:
            text = text[:max_chars] + " [...]"
        doc_desc = ", ".join(docs[:4]) + (f", ... ({len(docs)} docs)" if len(docs) > 4 else "")
        out.write(f"\n--- seq {int(sid)}  shard {int(pool.shard[sid])}  source {pool.sources([sid])[0]}  docs: {doc_desc}\n")
        out.write(text.replace("\r", "") + "\n")


def run(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if not path.exists():
        raise LmselectError(f"{path}: no such file or directory")
    if getattr(args, "verify", False):
        verify_tree(path)
    if _is_pool(path):
        print_pool_summary(path, n=args.n, shard=_shard_arg(args.shard), seed=args.seed, max_chars=args.max_chars)
        return 0
    try:
        from lmselect.provenance import print_lineage
    except ImportError:
        # still say what the directory is when its manifest is readable
        kind = read_manifest(path).get("kind") if (path / MANIFEST).is_file() else None
        what = f"a '{kind}' artifact" if kind else "not a pool"
        raise LmselectError(f"{path}: {what}; lineage printing needs lmselect.provenance, which is not available") from None
    recipe = None
    if getattr(args, "recipe", None):
        from lmselect.recipe import load_recipe  # torch (recipe reads TrainConfig): only with --recipe

        recipe = load_recipe(args.recipe, getattr(args, "overrides", None) or [])
    print_lineage(path, recipe)
    return 0
