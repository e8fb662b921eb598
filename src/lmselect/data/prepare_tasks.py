"""Prepare as independent tasks and one streaming merge (``lmselect prepare --tasks N`` / ``--task i/N``).

The per-document work -- read, prefilter, decontaminate, tokenize -- is split into N tasks over the inputs, the way
datatrove runs every step of FineWeb or DCLM: each task reads a contiguous group of *units* (a file, a folder of text
files, a hub dataset, or a contiguous row range of a ``save_to_disk`` dataset) and writes its **part**:

```
.OUT.work/                      beside the pool; removed once the pool is complete
  plan.json                     config hash, units, the units of each task, tokenizer, input fingerprints (written
                                first, atomically; every part names the plan's uuid)
  tokenizer/                    the trained BPE every task and the merge load (a given --tokenizer is used as is)
  parts/00003/                  one directory per task, built in a temp dir and renamed; part.json is its marker:
    tokens.bin                  the documents' tokens + EOS, unpacked, in the pool's dtype
    docs.parquet                doc_id, source, length (tokens with EOS), index (stream position counted from the
                                part's first document), edited (a prefilter changed the text), in stream order
    dropped.jsonl               prefilter_dropped.jsonl rows, ``index`` counted from the part's first document
    part.json                   ReadStats, prefilter and decontamination counts (+ flagged documents), tokens, CPU s
  logs/                         datatrove's logging dir: completions/00003, stats/, logs/task_00003.log
```

Tasks run under datatrove's ``LocalPipelineExecutor`` (``PrepareTask``, a ``PipelineStep``; ``--tasks N`` runs
them ``min(N, cores)`` at a time; ``--task i/N`` runs only rank i, for a Slurm array). A task whose part is complete
is skipped, so a killed run (or array task) resumes at the task level. The **merge** (one process) reads the parts in
order in fixed chunks of documents: it concatenates the tokens, packs them into rows of ``seq_len``, assigns shards
(``prepare.assign_shards``, the same seeded permutation), and streams ``docs.parquet`` (one row group per chunk) and
the per-row labels -- so its memory does not grow with the corpus, except for 3 int32 per row (shard, source,
documents; before them the permutation, 4 bytes per row): 12 bytes per row of ``seq_len`` tokens, 23 MB per billion
tokens at 512 (2.3 GB at 100B; every buffer else is a constant, see ``MERGE_CHUNK_DOCS``). Because every task's output is exactly its slice
of the single stream and the merge's chunks are cut at global document positions, the pool is byte-identical for any
N, one included (the single-process path *is* N = 1, in process).

What cannot be split: a hub dataset is streamed by one task (its row numbers -- the ids of records without one --
would otherwise depend on how the stream is sharded); a single file is one unit. ``max_docs`` (a prefix of the whole
stream) runs as one task.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import shutil
import socket
import time
import uuid
from dataclasses import asdict, replace
from itertools import chain
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from lmselect.artifacts import (
    LmselectError,
    atomic_path,
    atomic_write_json,
    read_json,
    remove_stale_tmp,
)
from lmselect.config import to_dict
from lmselect.data.decontam import Decontaminator
from lmselect.data.pool import VAL_SHARD, token_dtype
from lmselect.data.prefilter import Prefilter
from lmselect.data.readers import Document, InputSpec, ReadStats, dataset_rows, iter_documents
from lmselect.data.tokenizer import LONG_TEXT_CHARS, batch_encoder, load_tokenizer, split_long_text

log = logging.getLogger(__name__)

# Encoding batches: large enough for the Rust thread pool to spread work over cores, small enough to bound memory.
BATCH_DOCS = 2048
BATCH_CHARS = 4_000_000
PROGRESS_LOG_S = 30.0  # without a terminal (a log file), a progress line at most this often
PLAN = "plan.json"
PREFILTER_MEMO = "prefilter_memo.json"  # the BPE sample's prefilter decisions (Prefilter.memo_state), for task 0
PART_MARKER = "part.json"
AUTO_TASK_BYTES = 32 << 20  # --tasks 0 (auto): at most one task per this many input bytes, and per core
# Every buffer below is a constant, not a share of the corpus: what a task or the merge holds at once. Small enough
# to be reached by any corpus worth splitting (8,192 documents are ~8M tokens of web text), so that peak memory
# stops growing early (bench/corpus_scale.py measures it from 25M to 125M tokens).
PART_ROW_GROUP_DOCS = 1 << 13  # a task's docs.parquet: documents per row group (held as Python objects until written)
MERGE_CHUNK_DOCS = 1 << 13  # the merge reads documents in chunks of this many (one docs.parquet row group each)
SEQ_ROW_GROUP = 1 << 20  # sequences.parquet: rows per row group, written one at a time
COPY_BYTES = 8 << 20  # tokens.bin: bytes per copy through one reused buffer
ORIGINS_FILE = "doc_origins.parquet"  # per pool document: stream position of its record, edited flag


def work_dir(out_dir: Path) -> Path:
    """Where the tasks' parts of the pool ``out_dir`` live until the merge: ``.NAME.work`` beside it."""
    return out_dir.parent / f".{out_dir.name}.work"


def parse_task(text: str) -> tuple[int, int]:
    """``"3/8"`` -> (3, 8); a one-line error otherwise."""
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise LmselectError(f"--task {text!r}: use I/N, e.g. --task 3/8 (task 3 of 8, counted from 0)") from None
    if n < 1 or not 0 <= i < n:
        raise LmselectError(f"--task {text!r}: need 0 <= I < N")
    return i, n


# ----------------------------------------------------------------------------------------------------------------
# the plan


def _unit_bytes(spec: InputSpec) -> int:
    p = Path(spec.path)
    if spec.kind == "hub":
        return 0
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def plan_units(specs: Sequence[InputSpec], n_tasks: int) -> list[dict[str, Any]]:
    """The units of work, in stream order: one per input, a ``save_to_disk`` dataset cut into up to ``n_tasks``
    contiguous row ranges. ``weight`` (bytes) balances the tasks."""
    units = []
    for i, s in enumerate(specs):
        size = _unit_bytes(s)
        if s.kind == "hf_disk" and n_tasks > 1:
            rows = dataset_rows(s)
            cuts = np.linspace(0, rows, min(n_tasks, max(rows, 1)) + 1).round().astype(int)
            for a, b in zip(cuts[:-1], cuts[1:]):
                units.append({"spec": i, "start": int(a), "stop": int(b), "weight": size * (b - a) / max(rows, 1)})
        else:
            units.append({"spec": i, "start": 0, "stop": None, "weight": float(size or 1)})
    return units


def auto_tasks(specs: Sequence[InputSpec], requested: int, max_docs: int | None) -> int:
    """Tasks to run: ``requested``, or for 0 (auto) one per core but at most one per ``AUTO_TASK_BYTES`` of input
    (a small corpus is not worth starting processes for); always 1 with ``max_docs`` (a prefix of the whole stream)."""
    if max_docs is not None:
        return 1
    if requested:
        return requested
    total = sum(_unit_bytes(s) for s in specs)
    return max(1, min(os.cpu_count() or 1, total // AUTO_TASK_BYTES))


def assign_units(weights: Sequence[float], n_tasks: int) -> list[list[int]]:
    """Contiguous groups of units, one per task, that keep the heaviest task as light as possible: the smallest
    capacity (bisection) for which packing the units in order, a new task whenever the next unit would overflow,
    needs at most ``n_tasks`` tasks. Tasks past the last group are empty (fewer units than tasks, or one unit that
    outweighs the rest)."""
    w = [float(x) for x in weights]

    def pack(cap: float) -> list[list[int]]:
        groups: list[list[int]] = [[]]
        load = 0.0
        for u, x in enumerate(w):
            if groups[-1] and load + x > cap:
                groups.append([])
                load = 0.0
            groups[-1].append(u)
            load += x
        return groups

    if not w:
        return [[] for _ in range(n_tasks)]
    lo, hi = max(w), sum(w)
    for _ in range(60):
        mid = (lo + hi) / 2
        if len(pack(mid)) <= n_tasks:
            hi = mid
        else:
            lo = mid
    groups = pack(hi)
    return groups + [[] for _ in range(n_tasks - len(groups))]


def _plan_matches(plan: dict[str, Any], chash: str, n_tasks: int | None, keep: Sequence[str] = ()) -> bool:
    return (plan.get("config_hash") == chash and n_tasks in (None, plan.get("n_tasks"))
            and plan.get("decontam_keep", []) == sorted(keep))


def load_or_make_plan(work: Path, cfg: Any, chash: str, specs: Sequence[InputSpec], n_tasks: int, make_tokenizer: Any,
                      inputs_info: Any, *, keep_other: bool, decontam_keep: Sequence[str] = ()) -> dict[str, Any]:
    """The plan of ``work``: reused when it was made for this config and task count; else made (the tokenizer
    trained or loaded by ``make_tokenizer(tok_dir) -> info``). Several array tasks may start at once: one makes the
    plan under ``plan.lock`` (O_EXCL), the others wait for ``plan.json``. ``keep_other``: refuse, rather than
    replace, a plan made for another config (an array task must not wipe its siblings' parts). ``decontam_keep``:
    sources decontamination flags but never drops (the known-answer check's planted files; part of the plan's
    identity, not of the config's)."""
    plan_path = work / PLAN
    while True:
        if plan_path.is_file():
            plan = read_json(plan_path)
            # a plan of this config is resumed with its own task count (the pool does not depend on it), unless an
            # array task names another count: then the parts would not fit together
            if _plan_matches(plan, chash, n_tasks if keep_other else None, decontam_keep):
                if plan["n_tasks"] != n_tasks:
                    log.info("%s: resuming the %d tasks planned before (asked for %d)", work, plan["n_tasks"], n_tasks)
                return plan
            if keep_other:
                raise LmselectError(
                    f"{work}: holds the parts of another prepare (config hash {plan.get('config_hash')}, "
                    f"{plan.get('n_tasks')} tasks; this one {chash}, {n_tasks} tasks); remove it or use the same "
                    "settings")
            log.info("%s: parts of another config or task count; starting again", work)
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        lock = work / "plan.lock"
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            _wait_for_plan(work, lock)
            continue
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
            return _make_plan(work, cfg, chash, specs, n_tasks, make_tokenizer, inputs_info, decontam_keep)
        finally:
            lock.unlink(missing_ok=True)


def _wait_for_plan(work: Path, lock: Path) -> None:
    """Wait while another process makes the plan; take over a lock whose process died (same host)."""
    t0 = time.monotonic()
    while lock.exists() and not (work / PLAN).is_file():
        try:
            holder = read_json(lock)
        except Exception:  # noqa: BLE001 - being written right now
            holder = {}
        if holder.get("host") == socket.gethostname() and holder.get("pid"):
            try:
                os.kill(int(holder["pid"]), 0)
            except ProcessLookupError:
                log.warning("%s: the process that was making the plan (pid %s) is gone; taking over", work,
                            holder["pid"])
                lock.unlink(missing_ok=True)
                return
            except PermissionError:
                pass
        if time.monotonic() - t0 > 5:
            log.info("%s: waiting for another task to make the plan (train the tokenizer)", work)
            t0 = time.monotonic()
        time.sleep(0.5)


def _make_plan(work: Path, cfg: Any, chash: str, specs: Sequence[InputSpec], n_tasks: int, make_tokenizer: Any,
               inputs_info: Any, decontam_keep: Sequence[str] = ()) -> dict[str, Any]:
    for p in ("parts", "logs", "tokenizer"):
        shutil.rmtree(work / p, ignore_errors=True)
    (work / PREFILTER_MEMO).unlink(missing_ok=True)
    units = plan_units(specs, n_tasks)
    tok_dir = work / "tokenizer"
    t0, c0 = time.perf_counter(), time.process_time()
    tok_info = make_tokenizer(tok_dir)
    timings = {"tokenizer_s": time.perf_counter() - t0, "tokenizer_cpu_s": time.process_time() - c0}
    t0 = time.perf_counter()
    inputs = inputs_info() if callable(inputs_info) else inputs_info
    timings["hash_inputs_s"] = time.perf_counter() - t0
    plan = {
        "uuid": uuid.uuid4().hex,
        "config_hash": chash,
        "config": to_dict(cfg),
        "n_tasks": n_tasks,
        "decontam_keep": sorted(decontam_keep),
        "specs": [asdict(s) for s in specs],
        "units": units,
        "tasks": assign_units([u["weight"] for u in units], n_tasks),
        "tokenizer_dir": str(cfg.tokenizer) if cfg.tokenizer else None,  # None: WORK/tokenizer (tokenizer_dir)
        "tokenizer": tok_info,
        "inputs": inputs,
        "timings": timings,
        "created": time.time(),
    }
    atomic_write_json(work / PLAN, plan)
    return plan


def tokenizer_dir(work: Path, plan: dict[str, Any]) -> Path:
    """The tokenizer the tasks and the merge load: the given one, or the BPE trained into ``WORK/tokenizer`` (found
    relative to the work dir, so a work dir seen at another path on another node still works)."""
    return Path(plan["tokenizer_dir"]) if plan.get("tokenizer_dir") else work / "tokenizer"


def part_dir(work: Path, rank: int) -> Path:
    return work / "parts" / f"{rank:05d}"


def part_done(work: Path, plan: dict[str, Any], rank: int) -> bool:
    m = part_dir(work, rank) / PART_MARKER
    return m.is_file() and read_json(m).get("plan") == plan["uuid"]


def incomplete(work: Path, plan: dict[str, Any]) -> list[int]:
    return [r for r in range(plan["n_tasks"]) if not part_done(work, plan, r)]


# ----------------------------------------------------------------------------------------------------------------
# one task

@contextlib.contextmanager
def tokenizer_threads(workers: int) -> Iterator[int]:
    """Let the Rust tokenizer use ``workers`` threads for the duration of the call, then restore the environment.

    ``RAYON_NUM_THREADS`` only takes effect if the Rust thread pool has not started yet in this process (a fresh CLI
    run); ``TOKENIZERS_PARALLELISM`` is read on every batch call, so it always applies.
    """
    n = workers or os.cpu_count() or 1
    keys = ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")
    old = {k: os.environ.get(k) for k in keys}
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if n > 1 else "false"
    os.environ["RAYON_NUM_THREADS"] = str(n)
    try:
        yield n
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def document_batches(docs: Iterator[Document]) -> Iterator[list[Document]]:
    batch: list[Document] = []
    chars = 0
    for d in docs:
        if len(d.text) > LONG_TEXT_CHARS:  # a long document goes alone: it is tokenized piece by piece
            if batch:
                yield batch
            yield [d]
            batch, chars = [], 0
            continue
        batch.append(d)
        chars += len(d.text)
        if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch





def task_specs(plan: dict[str, Any], rank: int) -> list[InputSpec]:
    specs = [InputSpec(**s) for s in plan["specs"]]
    out = []
    for u in plan["tasks"][rank]:
        unit = plan["units"][u]
        out.append(replace(specs[unit["spec"]], start=unit["start"], stop=unit["stop"]))
    return out


def run_task(work: Path, rank: int, cfg: Any, *, threads: int = 1, progress: bool = False) -> dict[str, Any]:
    """Build part ``rank`` of the plan in ``work`` (skipped when complete): read its units, prefilter, decontaminate,
    tokenize; write the part in a temp dir and rename it, ``part.json`` last. Returns the part's ``part.json``."""
    work = Path(work)
    plan = read_json(work / PLAN)
    out = part_dir(work, rank)
    if part_done(work, plan, rank):
        return read_json(out / PART_MARKER)
    remove_stale_tmp(out, log)  # what a killed attempt of this task left
    t0, c0 = time.perf_counter(), time.process_time()
    with tokenizer_threads(threads):
        tok = load_tokenizer(tokenizer_dir(work, plan))
        encode = batch_encoder(tok)
        eos = int(tok.eos_token_id)
        dtype = token_dtype(len(tok))
        stats = ReadStats()
        pre = Prefilter(cfg.prefilter) if cfg.prefilter else None
        if pre is not None and rank == 0 and (work / PREFILTER_MEMO).is_file():
            pre.load_memo(read_json(work / PREFILTER_MEMO))  # task 0's stream is the sample's: no filter twice
        decon = (Decontaminator.build(cfg.decontaminate, plan.get("decontam_keep", ()))
                 if cfg.decontaminate.enabled else None)

        def count_tokens(texts: list[str]) -> list[int]:  # with the EOS, as the pool counts a document's tokens
            return [len(ids) + 1 for ids in encode(texts)]

        def on_drop(d: Any) -> None:  # dropped by decontamination after the prefilter kept it: still counted
            if pre is not None:
                pieces = encode(list(split_long_text(d.text, LONG_TEXT_CHARS)))
                pre.count_kept(d, sum(len(x) for x in pieces) + 1)

        with atomic_path(out) as tmp:
            tmp.mkdir(parents=True)
            docs: Iterator[Any] = iter_documents(task_specs(plan, rank), cfg.text_field, cfg.id_field,
                                                 cfg.source_field, cfg.strict, cfg.max_docs, stats)
            sink = open(tmp / "dropped.jsonl", "w", encoding="utf-8") if pre is not None else None
            if pre is not None:
                docs = pre.filter(docs, record=True, count_tokens=count_tokens, sink=sink, final=False,
                                  kept_tokens_later=True)
            if decon is not None:
                docs = decon.filter(docs, record=True, final=False, on_drop=on_drop)
            n_docs = n_tokens = 0
            sources: set[str] = set()
            writer = _DocWriter(tmp / "docs.parquet")
            from tqdm import tqdm

            bar = tqdm(desc=f"task {rank}", unit="tok", unit_scale=True, disable=None if progress else True,
                       leave=False)
            t_log = time.monotonic()
            with open(tmp / "tokens.bin", "wb") as fout:
                for batch in document_batches(docs):
                    if len(batch) == 1 and len(batch[0].text) > LONG_TEXT_CHARS:
                        # one long document, encoded piece by piece (bounded memory; tokenizer.split_long_text)
                        n = 0
                        for piece in split_long_text(batch[0].text, LONG_TEXT_CHARS):
                            ids = np.asarray(encode([piece])[0], dtype=dtype)
                            fout.write(ids.tobytes())
                            n += len(ids)
                        fout.write(np.asarray([eos], dtype=dtype).tobytes())
                        lens = [n + 1]
                    else:
                        ids_lists = encode([d.text for d in batch])
                        for x in ids_lists:
                            x.append(eos)
                        lens = [len(x) for x in ids_lists]
                        flat = np.fromiter(chain.from_iterable(ids_lists), dtype=dtype, count=sum(lens))
                        fout.write(flat.tobytes())
                    for d, n in zip(batch, lens):
                        if pre is not None:
                            pre.count_kept(d, n)
                        sources.add(d.source)
                    writer.add(batch, lens)
                    n_docs += len(batch)
                    n_tokens += sum(lens)
                    bar.update(sum(lens))
                    if bar.disable and progress and time.monotonic() - t_log >= PROGRESS_LOG_S:  # a log file
                        t_log = time.monotonic()
                        log.info("tokenize: %d documents, %d tokens so far (task %d)", n_docs, n_tokens, rank)
                fout.flush()
                os.fsync(fout.fileno())
            bar.close()
            writer.close()
            if sink is not None:
                sink.close()
            info = {
                "plan": plan["uuid"], "rank": rank, "documents": n_docs, "tokens": n_tokens,
                "sources": sorted(sources), "dtype": np.dtype(dtype).name, "read": stats.state(),
                "prefilter": pre.state() if pre is not None else None,
                "decontamination": decon.state() if decon is not None else None,
                "decontam_index_s": decon.index_s if decon is not None else 0.0,
                "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                # peak RSS of the task's process (Linux: KiB); a task in its own process is invisible to the caller
                "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
            atomic_write_json(tmp / PART_MARKER, info)
    return info


class _DocWriter:
    """docs.parquet of a part (doc_id, source, length, index, edited), one row group per batch of documents.
    ``index`` is the document's position in the part's reader stream (``Document.index``; the merge adds the
    documents of the parts before), ``edited`` whether a prefilter changed its text: the pool's ORIGINS_FILE."""

    def __init__(self, path: Path):
        import pyarrow as pa

        self.path = path
        self.schema = pa.schema([("doc_id", pa.string()), ("source", pa.string()), ("length", pa.int64()),
                                 ("index", pa.int64()), ("edited", pa.bool_())])
        self.ids: list[str] = []
        self.src: list[str] = []
        self.len: list[int] = []
        self.index: list[int] = []
        self.edited: list[bool] = []
        self.writer: Any = None

    def add(self, batch: Sequence[Any], lens: Sequence[int]) -> None:
        self.ids += [d.doc_id for d in batch]
        self.src += [d.source for d in batch]
        self.len += list(lens)
        self.index += [d.index for d in batch]
        self.edited += [d.edited for d in batch]
        if len(self.ids) >= PART_ROW_GROUP_DOCS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, self.schema)
        self.writer.write_table(pa.table({"doc_id": self.ids, "source": self.src, "length": self.len,
                                          "index": self.index, "edited": self.edited}, schema=self.schema))
        self.ids, self.src, self.len, self.index, self.edited = [], [], [], [], []

    def close(self) -> None:
        if self.ids or self.writer is None:
            self._flush()
        self.writer.close()


# ----------------------------------------------------------------------------------------------------------------
# the merge

def document_spans(doc_len: np.ndarray, seq_len: int, n_rows: int, offset: int = 0) -> dict[str, np.ndarray]:
    """Spans of documents (lengths in stream order, EOS included) over rows of ``seq_len`` tokens.

    Returns arrays ``doc`` (document index), ``seq_id``, ``start`` (offset in the row) and ``length``, one entry per
    (row, document) overlap, in stream order. Tokens past ``n_rows * seq_len`` (the dropped tail) are not covered.
    ``offset``: the stream position of the first document's first token (the merge computes spans chunk by chunk).
    """
    doc_len = np.asarray(doc_len, dtype=np.int64)
    ends = offset + np.cumsum(doc_len)
    starts = ends - doc_len
    limit = n_rows * seq_len
    ends_c = np.minimum(ends, limit)
    keep = (starts < limit) & (doc_len > 0)
    first = starts // seq_len
    last = (ends_c - 1) // seq_len
    nspan = np.where(keep, last - first + 1, 0)
    doc = np.repeat(np.arange(len(doc_len)), nspan)
    offs = np.arange(int(nspan.sum())) - np.repeat(np.cumsum(nspan) - nspan, nspan)
    seq = first[doc] + offs
    s = np.maximum(starts[doc], seq * seq_len)
    e = np.minimum(ends_c[doc], (seq + 1) * seq_len)
    return {"doc": doc, "seq_id": seq, "start": s - seq * seq_len, "length": e - s}


def assign_shards(n_rows: int, n_shards: int, n_val: int, seed: int) -> np.ndarray:
    """Shard of each row: a seeded permutation; its first ``n_val`` rows are the hold-out (-1), the rest is cut into
    ``n_shards`` contiguous parts whose sizes differ by at most one."""
    if n_rows - n_val < n_shards:
        raise LmselectError(
            f"only {n_rows} sequences ({n_val} held out for validation): not enough for {n_shards} shards; "
            "add text, lower --seq-len, --n-shards or the validation hold-out"
        )
    # = rng.permutation(n_rows) (the same shuffle of arange; tests/data/test_data_prepare.py), in 4 bytes per row, not 8:
    # with the shard column it is the merge's only per-row memory
    perm = np.arange(n_rows, dtype=np.int32 if n_rows < 2**31 else np.int64)
    np.random.default_rng(seed).shuffle(perm)
    shard = np.empty(n_rows, dtype=np.int32)
    shard[perm[:n_val]] = VAL_SHARD
    for k, part in enumerate(np.array_split(perm[n_val:], n_shards)):
        shard[part] = k
    return shard




def merged_parts(work: Path, plan: dict[str, Any]) -> list[dict[str, Any]]:
    missing = incomplete(work, plan)
    if missing:
        raise LmselectError(f"{work}: parts {missing} of {plan['n_tasks']} are not complete; run the missing tasks "
                            "(--task I/N) or rerun with --tasks N")
    return [read_json(part_dir(work, r) / PART_MARKER) for r in range(plan["n_tasks"])]


def _doc_chunks(work: Path, parts: Sequence[dict[str, Any]]) -> Iterator[Any]:
    """The documents of every part, in order, as arrow tables of exactly MERGE_CHUNK_DOCS rows (the last shorter):
    the cuts fall at global document positions, whatever the parts. ``index`` is made global: the documents the
    parts before this one read (as :func:`write_dropped` does for the dropped list)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    buf: list[Any] = []
    have = 0
    offset = 0
    for p in parts:
        pf = pq.ParquetFile(part_dir(work, p["rank"]) / "docs.parquet")
        for b in pf.iter_batches(batch_size=MERGE_CHUNK_DOCS):
            k = b.schema.get_field_index("index")
            b = b.set_column(k, "index", pc.add(b.column(k), pa.scalar(offset, pa.int64())))
            buf.append(b)
            have += b.num_rows
            while have >= MERGE_CHUNK_DOCS:
                t = pa.Table.from_batches(buf)
                yield t.slice(0, MERGE_CHUNK_DOCS)
                rest = t.slice(MERGE_CHUNK_DOCS)
                buf, have = rest.to_batches(), rest.num_rows
        offset += p["read"]["documents"]
    if have:
        yield pa.Table.from_batches(buf)


def write_tokens(work: Path, n_tasks: int, dest: Path, nbytes: int) -> None:
    """tokens.bin = the parts' token streams, concatenated, cut at ``nbytes`` (whole rows; the tail is dropped)."""
    left = nbytes
    buf = memoryview(bytearray(COPY_BYTES))  # one buffer for the whole copy: no allocation per chunk
    with open(dest, "wb") as fout:
        for r in range(n_tasks):
            with open(part_dir(work, r) / "tokens.bin", "rb") as fin:
                while left > 0:
                    got = fin.readinto(buf[: min(COPY_BYTES, left)])
                    if not got:
                        break
                    fout.write(buf[:got])
                    left -= got
        fout.flush()
        os.fsync(fout.fileno())


def write_dropped(work: Path, parts: Sequence[dict[str, Any]], dest: Path) -> None:
    """prefilter_dropped.jsonl: the parts' rows in order, ``index`` made global (documents read before the part)."""
    offset = 0
    with open(dest, "w", encoding="utf-8") as fout:
        for p in parts:
            with open(part_dir(work, p["rank"]) / "dropped.jsonl", encoding="utf-8") as fin:
                for line in fin:
                    row = json.loads(line)
                    row["index"] += offset
                    fout.write(json.dumps(row, ensure_ascii=False) + "\n")
            offset += p["read"]["documents"]


def write_index(cfg: Any, work: Path, plan: dict[str, Any], parts: Sequence[dict[str, Any]], tmp: Path,
                n_rows: int, names: list[str]) -> dict[str, Any]:
    """Stream docs.parquet and write sequences.parquet; return the manifest counts that come from the index.

    Documents come in chunks of MERGE_CHUNK_DOCS (every span of a document in its chunk); a row whose tokens run on
    into the next chunk carries its per-source token counts over. A row's source is the one with most of its tokens
    (ties: alphabetically first, as ``argmax`` over sorted names)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    L = cfg.seq_len
    n_src = len(names)
    n_val = cfg.val_sequences if cfg.val_sequences is not None else int(round(cfg.val_fraction * n_rows))
    if n_val >= n_rows:
        raise LmselectError(f"validation hold-out of {n_val} sequences leaves nothing to train on ({n_rows} sequences)")
    shard = assign_shards(n_rows, cfg.n_shards, n_val, cfg.seed)
    row_src = np.zeros(n_rows, dtype=np.int32)
    row_docs = np.zeros(n_rows, dtype=np.int32)
    carry_row, carry_tok = -1, np.zeros(n_src)
    docs_per_shard = np.zeros(cfg.n_shards + 1, dtype=np.int64)
    src_docs = np.zeros(n_src, dtype=np.int64)
    src_tokens = np.zeros(n_src, dtype=np.int64)
    src_packed = np.zeros(n_src, dtype=np.int64)
    n_docs = packed_docs = 0
    tok_off = 0
    names_arr = pa.array(names, type=pa.string())
    schema = pa.schema([("seq_id", pa.int64()), ("doc_id", pa.string()), ("source", pa.string()),
                        ("start", pa.int64()), ("length", pa.int64()),
                        ("doc", pa.int64())])  # the pool's document number (a row of ORIGINS_FILE)
    # one row per pool document: where its original record is in the reader's stream and whether a prefilter
    # edited its text (export gives back the original record's text and offsets into it)
    origins_schema = pa.schema([("doc", pa.int64()), ("doc_id", pa.string()), ("index", pa.int64()),
                                ("edited", pa.bool_())])
    with pq.ParquetWriter(tmp / "docs.parquet", schema) as writer, \
            pq.ParquetWriter(tmp / ORIGINS_FILE, origins_schema) as origins:
        for chunk in _doc_chunks(work, parts):
            lens = chunk.column("length").to_numpy().astype(np.int64)
            src = pc.index_in(chunk.column("source"), value_set=names_arr).to_numpy().astype(np.int64)
            sp = document_spans(lens, L, n_rows, offset=tok_off)
            span_src = src[sp["doc"]]
            writer.write_table(pa.table({
                "seq_id": sp["seq_id"].astype(np.int64),
                "doc_id": chunk.column("doc_id").take(pa.array(sp["doc"])),
                "source": names_arr.take(pa.array(span_src)),
                "start": sp["start"].astype(np.int64),
                "length": sp["length"].astype(np.int64),
                "doc": (n_docs + sp["doc"]).astype(np.int64),
            }, schema=schema))
            origins.write_table(pa.table({
                "doc": np.arange(n_docs, n_docs + len(lens), dtype=np.int64),
                "doc_id": chunk.column("doc_id"),
                "index": chunk.column("index"),
                "edited": chunk.column("edited"),
            }, schema=origins_schema))
            # rows touched by this chunk: per-source tokens (majority label) and documents per row
            if sp["seq_id"].size:
                r0, r1 = int(sp["seq_id"][0]), int(sp["seq_id"][-1])
                local = sp["seq_id"] - r0
                per_row = np.bincount(local * n_src + span_src, weights=sp["length"],
                                      minlength=(r1 - r0 + 1) * n_src).reshape(r1 - r0 + 1, n_src)
                ndoc = np.bincount(local, minlength=r1 - r0 + 1)
                if carry_row == r0:
                    per_row[0] += carry_tok
                    ndoc[0] += row_docs[r0]
                end_tok = tok_off + int(lens.sum())
                last_done = r1 if end_tok >= (r1 + 1) * L else r1 - 1  # r1 is full, or runs on into the next chunk
                done = last_done - r0 + 1
                row_src[r0 : last_done + 1] = per_row[:done].argmax(1)
                row_docs[r0 : r1 + 1] = ndoc
                if last_done < r1:
                    carry_row, carry_tok = r1, per_row[-1].copy()
                else:
                    carry_row = -1
                span_shard = shard[sp["seq_id"]].astype(np.int64)
                pairs = np.unique((span_shard + 1) * len(lens) + sp["doc"])
                docs_per_shard += np.bincount(pairs // len(lens), minlength=cfg.n_shards + 1)
                packed_docs += len(np.unique(sp["doc"]))
                src_packed += np.bincount(span_src, weights=sp["length"], minlength=n_src).astype(np.int64)
            src_docs += np.bincount(src, minlength=n_src)
            src_tokens += np.bincount(src, weights=lens, minlength=n_src).astype(np.int64)
            n_docs += len(lens)
            tok_off += int(lens.sum())
    if carry_row >= 0:  # the last row ends exactly where the kept tokens end
        row_src[carry_row] = carry_tok.argmax()
    seq_schema = pa.schema([("seq_id", pa.int64()), ("shard", pa.int32()), ("source", pa.string()),
                            ("n_docs", pa.int64())])
    with pq.ParquetWriter(tmp / "sequences.parquet", seq_schema) as writer:  # one row group at a time
        for a in range(0, n_rows, SEQ_ROW_GROUP):
            b = min(a + SEQ_ROW_GROUP, n_rows)
            writer.write_table(pa.table({
                "seq_id": np.arange(a, b, dtype=np.int64),
                "shard": shard[a:b],
                "source": names_arr.take(pa.array(row_src[a:b])),
                "n_docs": row_docs[a:b].astype(np.int64),
            }, schema=seq_schema))

    shard_ids = [VAL_SHARD] + list(range(cfg.n_shards)) if n_val else list(range(cfg.n_shards))
    per_shard = {
        str(s): {"sequences": int((shard == s).sum()), "tokens": int((shard == s).sum()) * L,
                 "documents": int(docs_per_shard[s + 1])}
        for s in shard_ids
    }
    row_src_count = np.bincount(row_src, minlength=n_src)
    per_source = {
        name: {"documents": int(src_docs[i]), "tokens": int(src_tokens[i]), "packed_tokens": int(src_packed[i]),
               "sequences": int(row_src_count[i])}
        for i, name in enumerate(names)
    }
    return {
        "sequences": int(n_rows),
        "tokens": int(n_rows * L),
        "sequences_per_shard": {str(s): int((shard == s).sum()) for s in range(cfg.n_shards)},
        "validation_sequences": int(n_val),
        "documents": int(n_docs),
        "documents_packed": int(packed_docs),
        "corpus_tokens": int(tok_off),
        "dropped_tail_tokens": int(tok_off - n_rows * L),
        "per_shard": per_shard,
        "per_source": per_source,
    }
