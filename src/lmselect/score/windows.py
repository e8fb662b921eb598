"""Scoring raw .jsonl text: fixed-size token windows, ``score_jsonl`` (streamed, sharded) and the roll-up to
document scores.

Each record's ``text`` is tokenized (no special tokens) and cut into consecutive windows of at most ``seq_len``
tokens; every window is scored like a pool sequence (``seq_id`` = window number in file order) and its row carries
``doc_id`` (the record's ``id``; without one, "<file>/<0-based line>": ``ID_POLICY``), ``doc_index`` (0-based
record number over all input files), ``char_start`` and ``char_end``. The input is a file, a folder or a glob, read
by prepare's reader (:mod:`lmselect.data.readers`: ``.gz`` / ``.zst``, malformed lines skipped and counted but kept
as rows). It is streamed in blocks of lines (at most :data:`BLOCK_LINES` lines or :data:`BLOCK_BYTES`), each
scored and rolled up to its documents (:func:`rollup_documents`: mean of the finite window scores, with min, max and n_windows) as soon as it is read;
``--shard i/n`` reads only its own files (:func:`shard_owners`). Once every shard is done the blocks are merged, in
file order, into the parts, ``documents.parquet`` and the dolma attribute files mirroring the input files' relative
names (:func:`attribute_path`; written by :mod:`lmselect.data.records`), before the manifest.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import yaml
from torch import nn

from lmselect.artifacts import (
    LmselectError,
    Manifest,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    is_complete,
    parent_ref,
    read_json,
    read_manifest,
    write_manifest,
)
from lmselect.data.pool import TokenPool
from lmselect.data.readers import (
    ID_POLICY,
    JsonlDoc,
    ReadStats,
    iter_jsonl_docs,
    read_jsonl_docs,
    resolve_jsonl_inputs,
)
from lmselect.data.records import (
    DEFAULT_ATTRIBUTE,
    attribute_lines,
    check_attribute_name,
    open_for_write,
    write_attributes,
)
from lmselect.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from lmselect.log import Progress
from lmselect.score.job import (
    JOB_FILE,
    check_job,
    check_vocab,
    finalize_job,
    forward_scores,
    model_and_meta,
    my_parts,
    resolve_amp_dtype,
    torch_device,
)
from lmselect.score.sidecar import ATTRIBUTES_DIR, DOCUMENTS_FILE, part_name, write_part_table
from lmselect.select.base import is_text_scorer, load_text_scorer
from lmselect.train.distributed import rank_world

log = logging.getLogger("lmselect.score")

__all__ = ["DEFAULT_ATTRIBUTE", "ID_POLICY", "JsonlDoc", "Windows", "attribute_path", "check_attribute_name",
           "make_windows", "resolve_jsonl_inputs", "resolve_tokenizer_dir", "rollup_documents", "score_jsonl",
           "score_jsonl_texts", "write_attributes"]


def resolve_tokenizer_dir(path: str | Path) -> Path:
    """Tokenizer directory of a pool (``tokenizer/``), a score model (``backbone/``), a checkpoint, or itself."""
    p = Path(path)
    if not p.exists():
        raise LmselectError(f"{p}: --tokenizer-from directory not found")
    for c in (p / "tokenizer", p / "backbone", p / "score_model" / "backbone", p):
        if (c / "tokenizer.json").is_file() or (c / "tokenizer_config.json").is_file():
            return c
    raise LmselectError(f"{p}: no tokenizer found (looked for tokenizer/, backbone/ and tokenizer.json)")


@dataclass
class Windows:
    """Fixed-size token windows of documents, with their character spans in the source text."""

    tokens: np.ndarray  # flat token ids (int32: half of int64's memory; batches are built as int64)
    start: np.ndarray  # offset of each window in ``tokens``
    length: np.ndarray
    doc_id: list[str]
    doc_index: np.ndarray  # position of each window's document in the ``docs`` list
    char_start: np.ndarray
    char_end: np.ndarray
    n_docs: int
    n_empty: int


WINDOW_CHUNK_CHARS = 1 << 20  # texts encoded per tokenizer call (with offsets: ~40 Python objects per token)


def make_windows(docs: list[tuple[str, str]], tokenizer: Any, seq_len: int, chunk: int = 1024) -> Windows:
    """Tokenize each text (no special tokens) and cut it into consecutive windows of at most ``seq_len`` tokens.

    A window's ``char_start:char_end`` is the text from its first token's start offset to its last token's end
    offset, so the spans of a document's windows tile its (tokenized) text and can be joined back to the record.
    Texts are encoded ``chunk`` documents but at most ``WINDOW_CHUNK_CHARS`` characters at a time, and each call's
    Python lists (ids, offsets) are turned into arrays and dropped before the next: the tokenizer's output, which
    dominated the peak, no longer grows with the input (the flat int32 token array still does).
    """
    if seq_len < 1:
        raise LmselectError(f"--seq-len must be >= 1, got {seq_len}")
    dtype = np.int32 if len(tokenizer) < 2**31 else np.int64
    toks, starts, lens, dix, cs, ce = [], [], [], [], [], []
    dids: list[str] = []
    pos, n_empty = 0, 0
    c = 0
    while c < len(docs):
        end, chars = c, 0
        while end < len(docs) and end - c < chunk and (end == c or chars + len(docs[end][1]) <= WINDOW_CHUNK_CHARS):
            chars += len(docs[end][1])
            end += 1
        part = docs[c:end]
        enc = tokenizer([t for _, t in part], add_special_tokens=False, return_offsets_mapping=True)
        for j, (doc_id, _) in enumerate(part):
            ids = enc["input_ids"][j]
            if not ids:
                n_empty += 1
                continue
            ids_a = np.asarray(ids, dtype=dtype)
            offs_a = np.asarray(enc["offset_mapping"][j], dtype=np.int64).reshape(-1, 2)
            toks.append(ids_a)
            w = np.arange(0, len(ids_a), seq_len, dtype=np.int64)
            k = np.minimum(seq_len, len(ids_a) - w)
            starts.append(pos + w)
            lens.append(k)
            dids.extend([doc_id] * len(w))
            dix.append(np.full(len(w), c + j, dtype=np.int64))
            cs.append(offs_a[w, 0])
            ce.append(offs_a[w + k - 1, 1])
            pos += len(ids_a)
        del enc, part  # before the next call: never two chunks' Python lists at once
        c = end

    def cat(xs: list[np.ndarray], dt: Any = np.int64) -> np.ndarray:
        return np.concatenate(xs).astype(dt, copy=False) if xs else np.zeros(0, dt)

    return Windows(
        tokens=cat(toks, dtype), start=cat(starts), length=cat(lens), doc_id=dids, doc_index=cat(dix),
        char_start=cat(cs), char_end=cat(ce), n_docs=len(docs), n_empty=n_empty,
    )


def _file_key(p: Path) -> dict[str, Any]:
    st = p.stat()
    return {"path": str(p.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


BLOCK_LINES = 4096  # lines per block of a .jsonl file at most: the unit of memory, batching, resume and --shard sharing
BLOCK_BYTES = 8 << 20  # ... and a block ends after the line that brings it to 8 MiB of (decompressed) text
BLOCKS_DIR = "blocks"  # score --jsonl's per-block work inside the sidecar (kept: a rerun resumes from it)


def shard_owners(n_files: int, n: int) -> list[list[int]]:
    """Which of ``n`` shards read each of ``n_files`` files (``out[f]``, ascending).

    With at least as many files as shards every file has one shard: contiguous, near-equal runs of the sorted files,
    so a shard opens only its own files. With fewer files than shards each file is shared by a contiguous run of
    ``g`` shards that take its blocks (:class:`_Blocks`) in turn (block ``j`` goes to the ``j mod g``-th);
    each of them reads the file's lines but decodes, tokenizes and scores only its own blocks. Either way the blocks,
    and so the batches, the scores and the merged output, are the same for every ``n``."""
    out: list[list[int]] = [[] for _ in range(n_files)]
    if n <= n_files:
        for s, run in enumerate(np.array_split(np.arange(n_files), n)):
            for f in run:
                out[int(f)].append(s)
    else:
        for s in range(n):
            out[s * n_files // n].append(s)
    return out


def window_batch(win: Windows, b: np.ndarray, pad_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids [len(b), width] of windows ``b`` (right padding with ``pad_id``) and their attention mask (None
    when no window of the batch is padded: the pool's code path)."""
    lens = win.length[b]
    width = int(lens.max())
    x = np.full((len(b), width), pad_id, dtype=np.int64)
    for r, (s, k) in enumerate(zip(win.start[b], lens)):
        x[r, :k] = win.tokens[s : s + k]
    if int(lens.min()) == width:
        return torch.from_numpy(x), None
    return torch.from_numpy(x), torch.from_numpy((np.arange(width)[None, :] < lens[:, None]).astype(np.int64))


def score_windows(model: nn.Module, win: Windows, *, batch_size: int, device: torch.device, amp_dtype: torch.dtype,
                  pad_id: int) -> np.ndarray:
    """Scores (float32) of every window of ``win``, ``batch_size`` at a time, longest first (short tail windows
    batch together, so little padding): ``score --jsonl`` and :class:`~lmselect.score.documents.DocumentScorer`."""
    n = len(win.length)
    scores = np.full(n, np.nan, dtype=np.float32)
    order = np.lexsort((np.arange(n), -win.length))
    for s in range(0, n, batch_size):
        b = order[s : s + batch_size]
        x, m = window_batch(win, b, pad_id)
        scores[b] = forward_scores(model, x, m, device, amp_dtype)
    return scores


class _BlockStats:
    """The reader's counts routed to the ReadStats of the block being read (``cur``, swapped by the line filter,
    which sees each line before it is counted), so that each block carries its own and the merge adds them up in
    file order: the counts of one process reading every file."""

    def __init__(self) -> None:
        object.__setattr__(self, "cur", ReadStats())

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "cur"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "cur":
            object.__setattr__(self, name, value)
        else:
            setattr(self.cur, name, value)


def _block_name(f: int, j: int, what: str) -> str:
    return f"{f:06d}-{j:06d}.{what}.parquet"


def _shard_marker(s: int, n: int) -> str:
    return f"shard-{s:05d}-of-{n:05d}.json"


def _file_marker(f: int) -> str:
    return f"file-{f:06d}.json"


@dataclass
class _Scoring:
    """What every block of a ``score --jsonl`` run is scored with."""

    model: nn.Module
    tokenizer: Any
    seq_len: int
    batch_size: int
    device: torch.device
    amp_dtype: torch.dtype
    pad_id: int
    text_field: str


def _score_block(blocks: Path, f: int, j: int, docs: list[JsonlDoc], stats: ReadStats, sc: _Scoring,
                 win: Windows | None = None) -> int:
    """Score one block's lines (``win``: their windows, when already made) and write its window rows and its
    documents (local ``doc_index``; ``raw_id``: the record's id as JSON text), windows first and the documents file
    last, each atomically: the documents file is the block's completion marker. Returns the number of windows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if win is None:
        win = make_windows([(d.doc_id, d.text) for d in docs], sc.tokenizer, sc.seq_len)
    scores = score_windows(sc.model, win, batch_size=sc.batch_size, device=sc.device, amp_dtype=sc.amp_dtype,
                           pad_id=sc.pad_id)
    windows = pa.table({"doc_index": pa.array(win.doc_index, pa.int64()), "char_start": pa.array(win.char_start, pa.int64()),
                        "char_end": pa.array(win.char_end, pa.int64()), "score": pa.array(scores, pa.float32())})
    documents = rollup_documents(windows, docs).append_column(
        "raw_id", pa.array([json.dumps(d.raw_id, ensure_ascii=False) for d in docs], pa.string()))
    meta = {"stats": stats.state(), "n_empty": int(win.n_empty), "lines": len(docs)}
    documents = documents.replace_schema_metadata({b"lmselect": json.dumps(meta).encode()})
    with atomic_path(blocks / _block_name(f, j, "windows")) as tmp:
        pq.write_table(windows, tmp)
    with atomic_path(blocks / _block_name(f, j, "docs")) as tmp:
        pq.write_table(documents, tmp)
    return len(scores)


_END = object()


def _one_ahead(items: Iterator[Any], fn: Callable[[Any], Any]) -> Iterator[Any]:
    """``fn(x)`` of every item, in order, each computed in a worker thread while the caller works on the previous
    one (the iterator is advanced in that thread only). Memory: two results at a time."""
    def step() -> Any:
        x = next(items, _END)
        return _END if x is _END else fn(x)

    with cf.ThreadPoolExecutor(max_workers=1) as ex:
        fut = ex.submit(step)
        while True:
            r = fut.result()
            if r is _END:
                return
            fut = ex.submit(step)
            yield r


class _Blocks:
    """Cuts one file's lines into blocks as they are read: a block ends after :data:`BLOCK_LINES` lines, or after
    the line that brings it to :data:`BLOCK_BYTES` bytes (decompressed), whichever comes first. The cut depends on
    the file's content only, so every shard that reads the file finds the same blocks."""

    def __init__(self) -> None:
        self.block, self.lines_in, self.bytes_in, self.lines = 0, 0, 0, 0

    def place(self, line: int, nbytes: int) -> int:
        """The block of ``line`` (lines come in order, each once)."""
        if self.lines_in >= BLOCK_LINES or self.bytes_in >= BLOCK_BYTES:
            self.block, self.lines_in, self.bytes_in = self.block + 1, 0, 0
        self.lines_in += 1
        self.bytes_in += nbytes
        self.lines = line
        return self.block

    @property
    def n_blocks(self) -> int:
        return self.block + 1  # an empty file: one empty block


def _score_file(f: int, path: Path, rel: str, g: int, p: int, blocks: Path,
                sc: _Scoring) -> tuple[int, ReadStats, int]:
    """Score the blocks ``j`` with ``j mod g == p`` of file ``f`` that are not on disk yet, each as soon as its lines
    are read; the ``p == 0`` reader also writes the file's marker (lines, blocks). Returns (windows scored, the
    blocks' read counts added up, records without an id)."""
    router, per_block, cut = _BlockStats(), {}, _Blocks()
    state = {"block": -1, "mine": False}

    def keep(line: int, nbytes: int) -> bool:
        j = cut.place(line, nbytes)
        if j != state["block"]:  # decided once per block: this shard's, and not on disk yet
            state["block"] = j
            state["mine"] = j % g == p and not (blocks / _block_name(f, j, "docs")).is_file()
            if state["mine"]:
                router.cur = per_block[j] = ReadStats()
        return state["mine"]

    counted = {"no_id": 0}

    def read_blocks() -> Iterator[tuple[int, list[JsonlDoc]]]:
        cur_j, cur = -1, []
        for d in iter_jsonl_docs(path, rel, sc.text_field, stats=router, keep=keep):  # type: ignore[arg-type]
            counted["no_id"] += d.id_derived
            j = state["block"]  # keep() has just placed this line (and no later one)
            if j != cur_j and cur:
                yield cur_j, cur
                cur = []
            cur_j = j
            cur.append(d)
        if cur:
            yield cur_j, cur

    def windowed(item: tuple[int, list[JsonlDoc]]) -> tuple[int, list[JsonlDoc], Windows]:
        j, docs = item
        return j, docs, make_windows([(d.doc_id, d.text) for d in docs], sc.tokenizer, sc.seq_len)

    computed, read = 0, ReadStats()
    # the next block is read and tokenized in a thread while this one is scored (the tokenizer releases the GIL)
    for j, docs, win in _one_ahead(read_blocks(), windowed):
        computed += _score_block(blocks, f, j, docs, per_block[j], sc, win)
        read = ReadStats.merged([read.state(), per_block.pop(j).state()])
    no_id = counted["no_id"]
    if p == 0:
        if not (blocks / _block_name(f, 0, "docs")).is_file():  # an empty file: one empty block
            _score_block(blocks, f, 0, [], ReadStats(), sc)
        atomic_write_json(blocks / _file_marker(f), {"file": rel, "lines": cut.lines, "blocks": cut.n_blocks})
    return computed, read, no_id


def _run_shard(s: int, n: int, files: list[tuple[Path, str]], owners: list[list[int]], blocks: Path,
               sc: _Scoring, progress: bool) -> None:
    """Shard ``s`` of ``n``: read its files (its blocks of shared ones) line by line, score each block of
    lines (:class:`_Blocks`) as soon as it is read (a block already on disk is passed over undecoded), and write the
    shard's marker (its timing record). Memory: two blocks' records, tokens and windows at a time."""
    mine = [f for f in range(len(files)) if s in owners[f]]
    t0, started, computed = time.perf_counter(), time.time(), 0
    shard_stats = ReadStats()
    bar = Progress(len(mine), unit="file", desc=f"score part {s}/{n}", enabled=progress)
    try:
        for f in mine:
            path, rel = files[f]
            g, p = len(owners[f]), owners[f].index(s)
            marker = blocks / _file_marker(f)
            if marker.is_file() and all((blocks / _block_name(f, j, "docs")).is_file()
                                        for j in range(p, read_json(marker)["blocks"], g)):
                bar.update(1)
                continue  # done by an earlier run
            done, read, no_id = _score_file(f, path, rel, g, p, blocks, sc)
            computed += done
            shard_stats = ReadStats.merged([shard_stats.state(), read.state()])
            if no_id:
                _warn_missing_ids(rel, no_id)
            bar.update(1)
    finally:
        bar.close()
    shard_stats.warn_malformed(log)
    seconds = time.perf_counter() - t0
    atomic_write_json(blocks / _shard_marker(s, n), {
        "part": s, "of": n, "computed_now": int(computed), "seconds": float(seconds), "started": started,
        "finished": time.time(), "device": str(sc.device), "dtype": str(sc.amp_dtype).replace("torch.", ""),
        "host": os.uname().nodename, "rank": rank_world()[0], "files": len(mine)})
    log.info("part %d/%d: %d windows scored in %.2f s on %s (%d file(s))", s, n, computed, seconds, sc.device,
             len(mine))


_PART_SCHEMA_FIELDS = [("seq_id", "int64"), ("score", "float32"), ("doc_id", "string"), ("doc_index", "int64"),
                       ("char_start", "int64"), ("char_end", "int64")]


def _merge_blocks(out: Path, n: int, files: list[tuple[Path, str]], owners: list[list[int]], name: str,
                  where: str) -> tuple[int, dict[str, Any]]:
    """Once every shard's marker exists: the blocks, in file order, become the sidecar's parts (window rows with
    ``seq_id`` = window number in file order and ``doc_index`` = record number over all files; part ``s`` holds shard
    ``s``'s blocks), ``documents.parquet`` and one attribute file per input file, written block by block (memory: one
    block at a time) and each atomically. Returns (windows, manifest counts)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    blocks = out / BLOCKS_DIR
    plan = []  # (f, j, shard, windows) in file order
    part_rows = [0] * n
    for f in range(len(files)):
        fm = read_json(blocks / _file_marker(f))
        for j in range(int(fm["blocks"])):
            s = owners[f][j % len(owners[f])]
            rows = pq.read_metadata(blocks / _block_name(f, j, "windows")).num_rows
            part_rows[s] += rows
            plan.append((f, j, s, rows))
    total = sum(part_rows)
    read_acc = ReadStats()  # the read counts of every block, added up in file order (memory: one state)
    n_empty = n_lines = n_blank = no_id = 0
    if total == 0:
        for f, j, _, _ in plan:
            blank = pq.read_table(blocks / _block_name(f, j, "docs"), columns=["blank"]).column("blank")
            n_lines += len(blank)
            n_blank += int(np.sum(blank.to_numpy(zero_copy_only=False)))
        raise LmselectError(f"{where}: no text to score (all {n_lines - n_blank} records are empty or malformed)")
    part_schema = pa.schema([(k, getattr(pa, t)()) for k, t in _PART_SCHEMA_FIELDS])
    writers: dict[int, Any] = {}
    stack = contextlib.ExitStack()
    seq = offset = 0
    with stack:
        doc_tmp = stack.enter_context(atomic_path(out / DOCUMENTS_FILE))
        doc_writer = None
        attr = None
        attr_f = -1
        for f, j, s, rows in plan:
            if f != attr_f:
                if attr is not None:
                    attr.close()
                attr = stack.enter_context(contextlib.ExitStack())  # closed on error too: no rename then
                path = out / attribute_path(files[f][1], name)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = attr.enter_context(atomic_path(path))
                aw = attr.enter_context(open_for_write(tmp, path.name))
                attr_f = f
            docs = pq.read_table(blocks / _block_name(f, j, "docs"))
            wins = pq.read_table(blocks / _block_name(f, j, "windows"))
            meta = json.loads((docs.schema.metadata or {}).get(b"lmselect", b"{}"))
            read_acc = ReadStats.merged([read_acc.state(), meta["stats"]])
            n_empty += int(meta["n_empty"])
            n_lines += docs.num_rows
            n_blank += int(np.sum(docs.column("blank").to_numpy(zero_copy_only=False)))
            no_id += int(np.sum(docs.column("id_derived").to_numpy(zero_copy_only=False)))
            raw_ids = [json.loads(x) for x in docs.column("raw_id").to_pylist()]
            for line in attribute_lines(docs, wins, name, raw_ids):
                aw.write(line)
            local = wins.column("doc_index").to_numpy().astype(np.int64)
            gdocs = docs.drop(["raw_id"]).replace_schema_metadata(None)
            gdocs = gdocs.set_column(0, "doc_index", pa.array(gdocs.column("doc_index").to_numpy() + offset, pa.int64()))
            if doc_writer is None:
                doc_writer = stack.enter_context(pq.ParquetWriter(doc_tmp, gdocs.schema))
            doc_writer.write_table(gdocs)
            if s not in writers:
                ptmp = stack.enter_context(atomic_path(out / part_name(s, n)))
                meta_s = read_json(blocks / _shard_marker(s, n))
                meta_s["sequences"] = part_rows[s]
                schema = part_schema.with_metadata({b"lmselect": json.dumps(meta_s).encode()})
                writers[s] = stack.enter_context(pq.ParquetWriter(ptmp, schema))
            ids = docs.column("doc_id").to_numpy(zero_copy_only=False)
            writers[s].write_table(pa.table({
                "seq_id": pa.array(np.arange(seq, seq + rows, dtype=np.int64)), "score": wins.column("score"),
                "doc_id": pa.array(ids[local].tolist() if rows else [], pa.string()),
                "doc_index": pa.array(local + offset, pa.int64()), "char_start": wins.column("char_start"),
                "char_end": wins.column("char_end")}, schema=writers[s].schema))
            seq += rows
            offset += docs.num_rows
        if attr is not None:
            attr.close()
        for s in range(n):  # a shard with no block (more shards than blocks): an empty part
            if s not in writers:
                meta_s = {**read_json(blocks / _shard_marker(s, n)), "sequences": 0}
                with atomic_path(out / part_name(s, n)) as ptmp:
                    pq.write_table(part_schema.with_metadata({b"lmselect": json.dumps(meta_s).encode()}).empty_table(),
                                   ptmp)
    read = read_acc.to_dict()
    scored = 0
    for f in pq.ParquetFile(out / DOCUMENTS_FILE).iter_batches(columns=["score"]):
        scored += int(np.isfinite(f.column(0).to_numpy(zero_copy_only=False)).sum())
    log.info("documents: %s (%d of %d documents scored, %d attribute file(s))", out / DOCUMENTS_FILE, scored,
             n_lines, len(files))
    return total, {"documents": n_lines - n_blank, "empty_documents": n_empty - n_blank, "blank_lines": n_blank,
                   "windows": total, "files": len(files), "skipped": read["skipped"],
                   "skipped_by_reason": read["skipped_by_reason"], "documents_without_id": no_id,
                   "documents_scored": scored, "_skipped_examples": read["skipped_examples"]}


def score_jsonl(
    model_dir_or_scorer: str | Path | nn.Module,
    jsonl: str | Path,
    tokenizer_from: str | Path,
    out_dir: str | Path,
    *,
    seq_len: int | None = None,
    batch_size: int = 64,
    shard: tuple[int, int] | None = None,
    num_parts: int | None = None,
    device: Any = None,
    dtype: Any = None,
    progress: bool = True,
    lm_loss: bool = False,
    checkpoint_every: int = 500,
    config: dict[str, Any] | None = None,
    attribute_name: str = DEFAULT_ATTRIBUTE,
    text_field: str = "text",
    trust_tokenizer: bool = False,
) -> Path:
    """Score every ``seq_len``-token window of each record's ``text``, streamed: the input files (a file, a folder or
    a glob: :func:`~lmselect.data.readers.resolve_jsonl_inputs`) are read line by line in blocks of
    lines (at most :data:`BLOCK_LINES` lines or :data:`BLOCK_BYTES` bytes: :class:`_Blocks`); each block is
    tokenized, windowed, scored and rolled up to its documents at once and
    written to ``blocks/`` (atomically; a rerun passes finished blocks over), so memory holds two blocks at most (the
    next is read and tokenized in a thread) whatever the input's size. ``shard=(i, n)`` (``--shard i/n``) takes only shard ``i``'s files (:func:`shard_owners`); without
    it this process runs all ``num_parts`` shards (default: the split already in ``out_dir``, else 1); under torchrun
    each rank takes its own shard. Whichever process finds every shard done merges the blocks, in file order, into
    the sidecar (:func:`_merge_blocks`): parts with rows ``seq_id`` (window number in file order), ``score``,
    ``doc_id``, ``doc_index``, ``char_start``, ``char_end``; ``documents.parquet``; the dolma attribute file of every
    input file at ``attributes/<attribute_name>/<its relative name>`` (:func:`attribute_path`); then the manifest.
    Blocks never span files and batches never span blocks, so the merged output is the same for every ``n``.
    Records without an id follow ``ID_POLICY``. ``checkpoint_every`` is unused here (a block is the checkpoint).
    A text scorer (the ``scores/text_scorer`` of a ``fasttext`` / ``dsir`` round) scores each whole record instead:
    :func:`score_jsonl_texts`, no tokenizer and no windows."""
    if not lm_loss and isinstance(model_dir_or_scorer, (str, Path)) and is_text_scorer(model_dir_or_scorer):
        return score_jsonl_texts(model_dir_or_scorer, jsonl, out_dir, shard=shard, config=config,
                                 attribute_name=attribute_name, text_field=text_field)
    check_attribute_name(attribute_name)
    out = Path(out_dir)
    if batch_size < 1:
        raise LmselectError(f"--batch-size must be >= 1, got {batch_size}")
    if out.exists() and not out.is_dir():
        raise LmselectError(f"{out}: exists and is not a directory")
    if out.is_dir() and is_complete(out) and not is_complete(out, "scores"):
        raise LmselectError(f"{out}: holds a '{read_manifest(out).get('kind')}' artifact; choose another --out")
    files = resolve_jsonl_inputs(jsonl)
    tok_dir = resolve_tokenizer_dir(tokenizer_from)
    tokenizer = load_tokenizer(tok_dir)
    model, meta, model_parents = model_and_meta(model_dir_or_scorer, lm_loss)
    parents = list(model_parents)
    if seq_len is None:
        seq_len = meta.get("seq_len")
    if seq_len is None and is_complete(tokenizer_from, "pool"):
        seq_len = TokenPool(tokenizer_from).seq_len
    if seq_len is None:
        seq_len = meta.get("max_positions")
    if seq_len is None:
        raise LmselectError(f"{jsonl}: cannot tell the window length; pass --seq-len")
    seq_len = int(seq_len)
    if seq_len < 1:
        raise LmselectError(f"--seq-len must be >= 1, got {seq_len}")
    if meta.get("max_positions") and seq_len > int(meta["max_positions"]):
        raise LmselectError(f"--seq-len {seq_len} exceeds the model's {meta['max_positions']} positions")
    check_vocab(meta, tokenizer_fingerprint(tokenizer), len(tokenizer), str(tok_dir), trust=trust_tokenizer)
    if is_complete(tokenizer_from, "pool"):
        parents.append(parent_ref(tokenizer_from))
    key = {"input": "jsonl", "jsonl": [_file_key(f) for f, _ in files], "text_field": text_field,
           "tokenizer": tokenizer_fingerprint(tokenizer), "seq_len": seq_len, "model": meta["path"],
           "score": meta["kind"], "format": 4, "block_lines": BLOCK_LINES,
           "block_bytes": BLOCK_BYTES}
    have = int(read_json(out / JOB_FILE).get("n_parts", 0)) if (out / JOB_FILE).is_file() else None
    n, mine = my_parts(shard, num_parts, have)
    if have is not None and have != n:
        raise LmselectError(f"{out}: already split into {have} parts, this run asks for {n}; use --num-parts {have} "
                            "(or matching --shard) or a fresh --out")
    out.mkdir(parents=True, exist_ok=True)
    check_job(out, {**key, "n_parts": n})
    cfg = config if config is not None else {"model": meta["path"], "jsonl": str(jsonl),
                                               "tokenizer_from": str(tokenizer_from), "seq_len": seq_len,
                                               "lm_loss": lm_loss, "batch_size": batch_size, "text_field": text_field}
    atomic_write_text(out / "config.yaml", yaml.safe_dump(json.loads(json.dumps(cfg, default=str)), sort_keys=False))
    if is_complete(out, "scores"):
        return out
    blocks = out / BLOCKS_DIR
    blocks.mkdir(exist_ok=True)
    owners = shard_owners(len(files), n)
    dev = torch_device(device)
    amp_dtype = resolve_amp_dtype(dtype, dev)
    todo = [s for s in mine if not (blocks / _shard_marker(s, n)).is_file()]
    if todo:
        model.to(dev).eval()
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        sc = _Scoring(model, tokenizer, seq_len, batch_size, dev, amp_dtype, pad_id, text_field)
        for s in todo:
            _run_shard(s, n, files, owners, blocks, sc, progress)
    else:
        log.info("%s: part(s) %s already done", out, ", ".join(map(str, mine)))
    left = [s for s in range(n) if not (blocks / _shard_marker(s, n)).is_file()]
    if left:
        log.info("%s: waiting for part(s) %s of %d; the last to finish merges them and writes the manifest", out,
                 ", ".join(map(str, left[:10])) + (" ..." if len(left) > 10 else ""), n)
        return out
    total, counts = _merge_blocks(out, n, files, owners, attribute_name, str(jsonl))
    examples = counts.pop("_skipped_examples")
    finalize_job(
        out, n, total, config=cfg, parents=parents, counts=counts,
        extra={"input": "jsonl", "jsonl": str(jsonl), "tokenizer": str(tok_dir), "seq_len": seq_len,
               "score": meta["kind"], "activation": meta.get("activation"), "model": meta["path"],
               "documents_file": DOCUMENTS_FILE, "text_field": text_field, "block_lines": BLOCK_LINES,
               "block_bytes": BLOCK_BYTES,
               "jsonl_files": [{"path": str(f.resolve()), "file": rel} for f, rel in files],
               "attributes": attribute_path(files[0][1], attribute_name),
               "attribute_files": [attribute_path(rel, attribute_name) for _, rel in files],
               "skipped_examples": examples, "device": str(dev),
               "amp_dtype": str(amp_dtype).replace("torch.", ""), "batch_size": batch_size})
    return out


def score_jsonl_texts(
    model_dir: str | Path,
    jsonl: str | Path,
    out_dir: str | Path,
    *,
    shard: tuple[int, int] | None = None,
    config: dict[str, Any] | None = None,
    attribute_name: str = DEFAULT_ATTRIBUTE,
    text_field: str = "text",
) -> Path:
    """``score --jsonl`` with a text scorer (a ``fasttext`` / ``dsir`` round's ``scores/text_scorer``, loaded through
    the registry): one score per record for its whole text, in one pass (the scorers are cheap; fastText retrains its
    round's classifier once per call). The sidecar has the layout of :func:`score_jsonl`'s with one "window" per
    record (chars 0 … len), so ``documents.parquet``, the dolma attribute files and ``select`` read it the same way; a
    malformed line keeps its row with no score. Written atomically; a complete sidecar of the same model and inputs is
    reused, one of another is refused."""
    out = Path(out_dir)
    check_attribute_name(attribute_name)
    if shard is not None and shard != (0, 1):
        raise LmselectError(f"{model_dir}: a text scorer (fasttext / dsir) scores the whole input in one pass; "
                            "drop --shard (give each array task its own --jsonl files instead)")
    files = resolve_jsonl_inputs(jsonl)
    key = {"input": "jsonl", "jsonl": [_file_key(f) for f, _ in files], "text_field": text_field,
           "model": str(Path(model_dir).resolve()), "score": "text", "format": 3}
    if is_complete(out, "scores"):
        if read_manifest(out, kind="scores").get("extra", {}).get("key") == key:
            return out
        raise LmselectError(f"{out}: holds scores of another model or input; use a fresh --out")
    scorer = load_text_scorer(model_dir)
    read_stats = ReadStats()
    records = read_jsonl_docs(jsonl, text_field=text_field, stats=read_stats)
    read_stats.warn_malformed(log)
    for rel, k in Counter(d.file for d in records if d.id_derived).items():
        _warn_missing_ids(rel, k)
    ok = [i for i, d in enumerate(records) if not d.malformed and not d.blank]
    n_blank = sum(d.blank for d in records)
    if not ok:
        raise LmselectError(f"{jsonl}: no text to score (all {len(records) - n_blank} records are malformed)")
    t0 = time.perf_counter()
    scores = np.asarray(scorer.score_texts([records[i].text for i in ok]), dtype=np.float64)
    seconds = time.perf_counter() - t0
    idx = np.asarray(ok, dtype=np.int64)
    src = Path(model_dir) if is_complete(model_dir, "scores") else Path(model_dir).parent
    parents = [parent_ref(src)] if is_complete(src, "scores") else []
    read = read_stats.to_dict()
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        part = tmp / part_name(0, 1)
        write_part_table(part, idx, scores, {"doc_id": [records[i].doc_id for i in ok], "doc_index": idx,
                                             "char_start": np.zeros(len(ok), dtype=np.int64),
                                             "char_end": np.asarray([len(records[i].text) for i in ok], dtype=np.int64)},
                         {"part": 0, "of": 1, "sequences": len(ok)})
        info = _write_documents(tmp, [part], records, attribute_name)
        write_manifest(tmp, Manifest(
            kind="scores", config=config or {"model": str(model_dir), "jsonl": str(jsonl), "text_field": text_field},
            parents=parents,
            counts={"sequences": len(ok), "parts": 1, "documents": len(records) - n_blank, "blank_lines": n_blank,
                    "windows": len(ok),
                    "files": len(files), "skipped": read["skipped"], "skipped_by_reason": read["skipped_by_reason"],
                    "documents_without_id": sum(d.id_derived for d in records), **info},
            extra={"n_parts": 1, "input": "jsonl", "key": key, "jsonl": str(jsonl), "score": scorer.description,
                   "scorer_kind": "text", "model": str(model_dir), "documents_file": DOCUMENTS_FILE,
                   "text_field": text_field, "jsonl_files": [{"path": str(f.resolve()), "file": rel} for f, rel in files],
                   "attributes": attribute_path(files[0][1], attribute_name),
                   "attribute_files": [attribute_path(rel, attribute_name) for _, rel in files],
                   "skipped_examples": read["skipped_examples"]},
            timings={"score_s": seconds, "sequences_per_s": len(ok) / seconds if seconds > 0 else 0.0}))
    log.info("scores: %s (%d documents, text scorer %s, %.1f s)", out, len(ok), scorer.description, seconds)
    return out


# ----------------------------------------------------------------------------------------------------------------
# document roll-up


def attribute_path(jsonl: str | Path, name: str) -> str:
    """Where the attribute file of an input goes inside the sidecar: ``attributes/<name>/<relative name>``, the
    input's own relative name (``x.json.gz`` stays ``x.json.gz``, ``sub/y.jsonl.zst`` stays so). dolma finds the
    attribute file of ``.../documents/<rel>`` at ``.../attributes/<name>/<rel>`` (its mixer substitutes the path and
    picks the compression by extension), so the name must be the document file's, whatever it is."""
    rel = Path(jsonl).as_posix() if not Path(jsonl).is_absolute() else Path(jsonl).name
    return f"{ATTRIBUTES_DIR}/{name}/{rel}"


def _warn_missing_ids(file: str, n: int) -> None:
    log.warning("%s: %d record(s) have no id; documents.parquet keys them '%s/<0-based line>' (datatrove's "
                "default id), the attribute file keeps their id as in the file (dolma matches by line)", file, n, file)


def rollup_documents(windows: Any, docs: list[JsonlDoc]) -> Any:
    """One row per document (every line of the file, blank and malformed ones included, in file order) from the
    window rows of a sidecar.

    ``windows`` is a pyarrow Table with ``doc_index`` and ``score``. Columns: ``doc_index`` (0-based record number),
    ``doc_id`` (derived when ``id_derived``: ``ID_POLICY``), ``file`` (relative name of its input file), ``source``,
    ``line``, ``malformed`` (a skipped line: no text, no score), ``blank`` (an empty line: no record, no score), ``n_chars`` (``len(text)``), ``n_windows``, ``score`` (mean of the document's
    finite window scores; NaN when it has none, e.g. an empty text), ``score_min``, ``score_max``. The mean is
    unweighted: every window counts once, whatever its length (the last window of a document may be short).
    """
    import pyarrow as pa

    n = len(docs)
    idx = windows.column("doc_index").to_numpy().astype(np.int64)
    sc = windows.column("score").to_numpy().astype(np.float64)
    if len(idx) and (idx.min() < 0 or idx.max() >= n):
        raise LmselectError(f"window rows name document {int(idx.max())}, but the file has {n} records")
    ok = np.isfinite(sc)
    n_windows = np.bincount(idx, minlength=n)
    n_finite = np.bincount(idx[ok], minlength=n)
    total = np.bincount(idx[ok], weights=sc[ok], minlength=n)
    lo = np.full(n, np.inf)
    hi = np.full(n, -np.inf)
    np.minimum.at(lo, idx[ok], sc[ok])
    np.maximum.at(hi, idx[ok], sc[ok])
    has = n_finite > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(has, total / np.maximum(n_finite, 1), np.nan)
    return pa.table({
        "doc_index": pa.array(np.arange(n, dtype=np.int64)),
        "doc_id": pa.array([d.doc_id for d in docs], type=pa.string()),
        "id_derived": pa.array([d.id_derived for d in docs], type=pa.bool_()),
        "file": pa.array([d.file for d in docs], type=pa.string()),
        "source": pa.array([d.source for d in docs], type=pa.string()),
        "line": pa.array(np.asarray([d.line for d in docs], dtype=np.int64)),
        "n_chars": pa.array(np.asarray([len(d.text) for d in docs], dtype=np.int64)),
        "n_windows": pa.array(n_windows.astype(np.int64)),
        "score": pa.array(mean.astype(np.float32)),
        "score_min": pa.array(np.where(has, lo, np.nan).astype(np.float32)),
        "score_max": pa.array(np.where(has, hi, np.nan).astype(np.float32)),
        "malformed": pa.array([d.malformed for d in docs], type=pa.bool_()),
        "blank": pa.array([d.blank for d in docs], type=pa.bool_()),
    })


def _write_documents(out_dir: Path, parts: list[Path], docs: list[JsonlDoc], name: str) -> dict[str, Any]:
    """The ``finish`` step of a jsonl job: documents.parquet and one attribute file per input file, before the
    manifest."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    cols = ["seq_id", "score", "doc_index", "char_start", "char_end"]
    windows = pa.concat_tables([pq.read_table(p, columns=cols) for p in parts]).sort_by("seq_id")
    documents = rollup_documents(windows, docs)
    with atomic_path(out_dir / DOCUMENTS_FILE) as tmp:
        pq.write_table(documents, tmp)
    files = list(dict.fromkeys(d.file for d in docs))
    file_col = documents.column("file")
    for rel in files:
        mask = pc.equal(file_col, rel)
        sub = documents.filter(mask)
        first, last = int(sub.column("doc_index")[0].as_py()), int(sub.column("doc_index")[-1].as_py())
        w = windows.filter(pc.and_(pc.greater_equal(windows.column("doc_index"), first),
                                   pc.less_equal(windows.column("doc_index"), last)))
        write_attributes(out_dir / attribute_path(rel, name), sub, w, name,
                         ids=[d.raw_id for d in docs[first : last + 1]])
    scored = int(np.isfinite(documents.column("score").to_numpy(zero_copy_only=False)).sum())
    log.info("documents: %s (%d of %d documents scored, %d attribute file(s))", out_dir / DOCUMENTS_FILE, scored,
             len(docs), len(files))
    return {"documents_scored": scored}
