"""Tokenize and pack a corpus into a sharded token pool (``lmselect prepare``).

    lmselect prepare data/demo/corpus/*.jsonl.gz --out pools/demo --seq-len 512 --n-shards 5

Steps: read the inputs (``.jsonl[.gz|.zst]``, ``.parquet``, ``.txt`` files or folders of them, ``save_to_disk``
dataset folders, ``hf:OWNER/NAME`` hub datasets; see :mod:`lmselect.data.readers`), load ``--tokenizer DIR`` or train
a byte-level BPE on the corpus (``--vocab-size``, EOS ``<|endoftext|>``), tokenize in parallel batches, append EOS to
every document, pack the stream into rows of ``seq_len`` tokens (the last partial row is dropped and counted), and
assign rows to shards deterministically from ``--seed``: a shuffled ``--val-fraction`` / ``--val-sequences``
hold-out becomes shard -1 and the rest is split into ``--n-shards`` parts whose sizes differ by at most one (one
candidate pool per round). Documents keep their order, so most rows hold one source; a row's ``source`` is the
source contributing most of its tokens (ties: alphabetically first).

Bad input policy: malformed records (bad JSON, not an object, no text field, text not a string, a text file that is
not UTF-8) are **skipped and counted** in the manifest (``counts.skipped*``) by default; ``--strict`` makes the first
one fatal. Empty-text records are skipped and counted as ``empty``. A missing input, an unknown format, a Parquet file
or dataset without the text column, a tokenizer directory that does not load, ``seq_len < 2`` and an **empty corpus**
(no usable text) are always fatal. Every error is one line naming the file and line / record.

Prefilter (``prefilter``, ``--prefilter NAME,...``; :mod:`lmselect.data.prefilter`): datatrove's heuristic
filters (``gopher_repetition``, ``gopher_quality``, ``c4``, ``c4_datatrove``, ``fineweb_quality``) run on every
document first, in the order given; removed documents are counted per filter and per source in
``extra.prefilter`` and listed in ``prefilter_dropped.jsonl``; kept documents go on with the text the filters left
(the C4 rules remove lines). They run before decontamination, so that the overlap is measured on the text that is
actually tokenized (a line C4 removes cannot contaminate the pool), and before the tokenizer is trained, so that
removed text does not shape the vocabulary.

Decontamination (``decontaminate.protected``, ``--decontaminate PATH``; :mod:`lmselect.data.decontam`): every
document is checked for word n-grams (default 13) shared with protected texts -- the selection and report sets, the
eval task files. ``flag`` keeps it and lists it, ``drop`` removes it before the tokenizer is trained and before
tokenisation. Counts per source and per protected set go into ``extra.decontamination``, the flagged documents into
``contamination.parquet``.

The pool is built in a temporary directory beside ``--out`` and renamed into place with ``manifest.json`` written
last, so an interrupted run leaves nothing that looks complete; rerunning starts again. A complete pool whose config
hash matches is reused ("pool already complete"); a different config is an error unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from lmselect.artifacts import (
    MANIFEST,
    LmselectError,
    Manifest,
    atomic_path,
    file_checksums,
    read_json,
    save_config,
    write_manifest,
    writing,
)
from lmselect.config import (
    ConfigError,
    blame,
    config_hash,
    deep_merge,
    from_dict,
    parse_overrides,
    read_yaml,
    to_dict,
)
from lmselect.data.decontam import DecontamConfig, Decontaminator, summary_line
from lmselect.data.pool import VAL_SHARD, token_dtype
from lmselect.data.prefilter import DROPPED_FILE, Prefilter, normalize_names, validate_names
from lmselect.data.prefilter import summary_line as prefilter_summary
from lmselect.data.readers import Document, InputSpec, ReadStats, input_fingerprint, iter_documents, resolve_inputs
from lmselect.data.tokenizer import LONG_TEXT_CHARS

log = logging.getLogger(__name__)

# Encoding batches: large enough for the Rust thread pool to spread work over cores, small enough to bound memory.
BATCH_DOCS = 2048
BATCH_CHARS = 4_000_000
PROGRESS_LOG_S = 30.0  # without a terminal (a log file), a progress line at most this often
ORIGINS_FILE = "doc_origins.parquet"  # per pool document: stream position of its record, edited flag
# Config keys that do not change the pool's content and so are left out of its identity (config hash).
_NON_SEMANTIC = ("workers",)


@dataclass
class PrepareConfig:
    """Everything that determines a pool. Every key can be set in YAML or as ``--key=value``."""

    inputs: list[str] = field(default_factory=list)  # paths, globs, dataset folders or hf:OWNER/NAME[#split]
    text_field: str = "text"
    id_field: str = "id"  # kept when usable; else "<file>/<0-based line>" (readers.ID_RULE)
    source_field: str = "source"  # kept when present; else the file stem
    tokenizer: str | None = None  # HF tokenizer directory; None = train a byte-level BPE on the corpus
    vocab_size: int = 8192  # for the trained BPE (ignored with `tokenizer`)
    tokenizer_train_chars: int = 200_000_000  # train the BPE on at most this many characters (corpus order)
    seq_len: int = 1024
    n_shards: int = 5  # per-round candidate pools (shard 0 = warm-up in the pipeline)
    val_fraction: float = 0.0  # fraction of sequences held out as shard -1
    val_sequences: int | None = None  # exact hold-out size; overrides val_fraction
    seed: int = 0
    workers: int = 0  # tokenizer threads; 0 = all cores
    strict: bool = False  # malformed records are fatal instead of skipped and counted
    max_docs: int | None = None  # read at most this many documents (quick trials)
    # datatrove heuristic filters run first, in this order (lmselect.data.prefilter.FILTERS); [] / "none" = off
    prefilter: list[str] = field(default_factory=list)
    # n-gram overlap with protected texts (selection / report sets, eval tasks): flag or drop (lmselect.data.decontam)
    decontaminate: DecontamConfig = field(default_factory=DecontamConfig)

    def validate(self) -> None:
        """Raise ConfigError naming the key for values that cannot work."""
        if self.seq_len < 2:
            raise ConfigError(f"config key 'seq_len' must be >= 2 (got {self.seq_len}): a sequence needs a target token")
        if self.n_shards < 1:
            raise ConfigError(f"config key 'n_shards' must be >= 1 (got {self.n_shards})")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"config key 'val_fraction' must be in [0, 1) (got {self.val_fraction})")
        if self.val_sequences is not None and self.val_sequences < 0:
            raise ConfigError(f"config key 'val_sequences' must be >= 0 (got {self.val_sequences})")
        if self.max_docs is not None and self.max_docs < 1:
            raise ConfigError(f"config key 'max_docs' must be >= 1 (got {self.max_docs})")
        if self.workers < 0:
            raise ConfigError(f"config key 'workers' must be >= 0 (got {self.workers})")
        if not self.text_field:
            raise ConfigError("config key 'text_field' may not be empty")
        if not self.inputs:
            raise ConfigError("config key 'inputs': no corpus files given")
        self.prefilter = normalize_names(self.prefilter)
        validate_names(self.prefilter)
        self.decontaminate.validate()


def pool_config_hash(cfg: PrepareConfig) -> str:
    """Identity of the pool a config produces (worker count excluded: it does not change the output)."""
    d = to_dict(cfg)
    for k in _NON_SEMANTIC:
        d.pop(k, None)
    if not cfg.decontaminate.enabled:
        d.pop("decontaminate", None)  # off: pools prepared before the option existed keep their identity
    if not normalize_names(cfg.prefilter):
        d.pop("prefilter", None)  # likewise
    return config_hash(d)


# ----------------------------------------------------------------------------------------------------------------
# helpers


@contextlib.contextmanager
def _tokenizer_threads(workers: int) -> Iterator[int]:
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


def _describe_inputs(specs: Sequence[InputSpec], raw: Sequence[str]) -> str:
    names = [s.path for s in specs] if specs else list(raw)
    return names[0] if len(names) == 1 else f"inputs ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"


def _empty_corpus_error(where: str, stats: ReadStats, text_field: str = "text") -> LmselectError:
    return LmselectError(
        f"{where}: empty corpus: no document with usable text ({stats.records} records read, "
        f"{stats.n_skipped} malformed skipped, {stats.empty} empty){stats.text_field_hint(text_field)}"
    )


def _clean_stale_tmp(out_dir: Path) -> None:
    """Remove temp build dirs of earlier runs into ``out_dir`` that were killed (their process is gone)."""
    parent = out_dir.parent
    if not parent.is_dir():
        return
    pat = re.compile(rf"^\.{re.escape(out_dir.name)}\.tmp-(\d+)-[0-9a-f]+$")
    for p in parent.iterdir():
        m = pat.match(p.name)
        if not m:
            continue
        pid = int(m.group(1))
        alive = True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        if not alive or pid == os.getpid():
            log.info("removing leftover partial build %s", p)
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _check_existing(out_dir: Path, chash: str, overwrite: bool) -> bool:
    """True when ``out_dir`` already holds this pool; raise when it holds something else (unless overwrite)."""
    if not out_dir.exists():
        return False
    if not out_dir.is_dir():
        raise LmselectError(f"{out_dir}: exists and is not a directory")
    mpath = out_dir / MANIFEST
    if mpath.is_file():
        m = read_json(mpath)
        if m.get("kind") == "pool" and m.get("status", "complete") == "complete":
            if m.get("config_hash") == chash and not overwrite:
                return True
            if not overwrite:
                raise LmselectError(
                    f"{out_dir}: a pool with a different config already exists (config hash {m.get('config_hash')}, "
                    f"this run {chash}); pass --overwrite to replace it or choose another --out"
                )
            return False
        if not overwrite:
            raise LmselectError(f"{out_dir}: holds a '{m.get('kind')}' artifact, not a pool; pass --overwrite to replace it")
        return False
    looks_like_pool = any((out_dir / f).exists() for f in ("tokens.bin", "sequences.parquet", "docs.parquet"))
    if any(out_dir.iterdir()) and not looks_like_pool and not overwrite:
        raise LmselectError(f"{out_dir}: directory is not empty and is not a pool; pass --overwrite to replace it")
    return False  # empty, or an incomplete pool: rebuilt from scratch


def _batches(docs: Iterator[Document]) -> Iterator[list[Document]]:
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


def _documents(
    cfg: PrepareConfig, specs: Sequence[InputSpec], stats: ReadStats, pre: Prefilter | None, decon: Decontaminator | None,
    *, record: bool, count_tokens: Any = None, sink: Any = None,
) -> Iterator[Document]:
    """The corpus as the pool sees it: read, prefiltered (counted and listed when ``record``), decontaminated."""
    docs = iter_documents(specs, cfg.text_field, cfg.id_field, cfg.source_field, cfg.strict, cfg.max_docs, stats)
    if pre is not None:
        docs = pre.filter(docs, record=record, count_tokens=count_tokens, sink=sink)
    if decon is not None and (record or cfg.decontaminate.mode == "drop"):
        docs = decon.filter(docs, record=record)  # counts and lists overlapping documents; drop mode removes them
    return docs


def _get_tokenizer(
    cfg: PrepareConfig, specs: Sequence[InputSpec], where: str, decon: Decontaminator | None = None,
    pre: Prefilter | None = None,
) -> tuple[Any, dict[str, Any]]:
    from lmselect.data.tokenizer import load_tokenizer, split_long_text, train_bpe

    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
        if tok.eos_token_id is None:
            raise LmselectError(f"{cfg.tokenizer}: tokenizer has no EOS token (needed to separate documents)")
        return tok, {"path": str(cfg.tokenizer), "trained": False}
    stats = ReadStats()
    budget = [cfg.tokenizer_train_chars]

    def texts() -> Iterator[str]:
        # removed documents (prefilter, decontamination drop) do not shape the vocabulary either
        for d in _documents(cfg, specs, stats, pre, decon, record=False):
            yield from split_long_text(d.text, LONG_TEXT_CHARS)  # same word counts as the whole text, bounded memory
            budget[0] -= len(d.text)
            if budget[0] <= 0:
                return

    tok = train_bpe(texts(), cfg.vocab_size, model_max_length=cfg.seq_len)
    if stats.documents == 0:
        raise _empty_corpus_error(where, stats, cfg.text_field)
    return tok, {"trained": True, "kind": "byte-level BPE", "vocab_size": cfg.vocab_size,
                 "train_chars": min(cfg.tokenizer_train_chars, cfg.tokenizer_train_chars - budget[0])}


# ----------------------------------------------------------------------------------------------------------------
# the pipeline


def prepare(cfg: PrepareConfig, out_dir: str | Path, *, overwrite: bool = False, progress: bool = True,
            decontam_keep: Sequence[str] = ()) -> Path:
    """Build (or reuse) the pool for ``cfg`` at ``out_dir`` and return its path. See the module docstring.
    ``decontam_keep``: sources whose contaminated documents are flagged but not dropped (the known-answer check's
    planted files)."""
    path, _ = prepare_pool(cfg, out_dir, overwrite=overwrite, progress=progress, decontam_keep=decontam_keep)
    return path


def prepare_pool(
    cfg: PrepareConfig, out_dir: str | Path, *, overwrite: bool = False, progress: bool = True,
    decontam_keep: Sequence[str] = (),
) -> tuple[Path, bool]:
    """Like :func:`prepare`; also says whether an existing complete pool was reused (True) or one was built."""
    cfg.validate()
    out_dir = Path(out_dir)
    chash = pool_config_hash(cfg)
    if _check_existing(out_dir, chash, overwrite):
        log.info("%s: pool already complete (config hash %s)", out_dir, chash)
        return out_dir, True
    _clean_stale_tmp(out_dir)

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    with _tokenizer_threads(cfg.workers) as n_threads:
        specs = resolve_inputs(cfg.inputs)
        where = _describe_inputs(specs, cfg.inputs)
        t0 = time.perf_counter()
        inputs_info = [input_fingerprint(s) for s in specs]
        timings["hash_inputs_s"] = time.perf_counter() - t0

        decon = Decontaminator.build(cfg.decontaminate, decontam_keep) if cfg.decontaminate.enabled else None
        pre = Prefilter(cfg.prefilter) if cfg.prefilter else None
        t0, c0 = time.perf_counter(), time.process_time()
        tok, tok_info = _get_tokenizer(cfg, specs, where, decon, pre)
        timings["tokenizer_s"] = time.perf_counter() - t0
        timings["tokenizer_cpu_s"] = time.process_time() - c0

        with atomic_path(out_dir) as tmp:
            tmp.mkdir(parents=True)
            # CPU seconds (all threads) next to wall seconds: on a shared machine wall time depends on the load
            t0, c0 = time.perf_counter(), time.process_time()
            with writing(out_dir / "tokens.bin", tmp / "tokens.bin"):  # a full disk names tokens.bin, not the temp dir
                with contextlib.ExitStack() as stack:
                    sink = stack.enter_context(open(tmp / DROPPED_FILE, "w", encoding="utf-8")) if pre else None
                    packed = _tokenize_and_pack(cfg, specs, tok, tmp / "tokens.bin", progress, where, decon, pre, sink)
            packed["stats"].warn_malformed(log)  # a count in the manifest alone is easy to miss
            timings["tokenize_pack_s"] = time.perf_counter() - t0
            timings["tokenize_pack_cpu_s"] = time.process_time() - c0
            t0 = time.perf_counter()
            counts, extra = _write_index(cfg, tmp, tok, packed)
            tok.save_pretrained(str(tmp / "tokenizer"))
            save_config(cfg, tmp / "config.yaml")
            if decon is not None:
                decon.write(tmp)
                extra["decontamination"] = decon.manifest_info()
                timings.update(decon.timings())
            if pre is not None:
                extra["prefilter"] = pre.manifest_info()
                timings["prefilter_s"] = pre.seconds
            timings["index_write_s"] = time.perf_counter() - t0
            timings["total_s"] = time.perf_counter() - t_start
            extra.update(
                {
                    "tokenizer": tok_info,
                    "inputs": [dict(info, documents=int(packed["stats"].docs_by_input.get(s.path, 0))) for s, info in zip(specs, inputs_info)],
                    "tokenizer_threads": n_threads,
                    "tokens_per_second": counts["corpus_tokens"] / max(timings["tokenize_pack_s"], 1e-9),
                }
            )
            # the manifest goes in last: until the rename below, nothing at out_dir looks complete
            write_manifest(
                tmp,
                Manifest(kind="pool", config=to_dict(cfg), seed=cfg.seed, counts=counts, timings=timings, extra=extra,
                         config_hash=chash, checksums=file_checksums(tmp, ["tokens.bin"])),
            )
    log.info(
        "%s: %d sequences x %d tokens from %d documents in %.1fs",
        out_dir, counts["sequences"], cfg.seq_len, counts["documents"], timings["total_s"],
    )
    return out_dir, False


def _tokenize_and_pack(
    cfg: PrepareConfig, specs: Sequence[InputSpec], tok: Any, tokens_path: Path, progress: bool, where: str,
    decon: Decontaminator | None = None, pre: Prefilter | None = None, sink: Any = None,
) -> dict[str, Any]:
    """Stream documents -> token ids + EOS -> full rows of ``seq_len`` appended to ``tokens_path``.

    Only per-document metadata (id, source, length) is kept in memory; tokens go to disk as soon as a row is full,
    so memory stays bounded for corpora larger than RAM.
    """
    from tqdm import tqdm

    from lmselect.data.tokenizer import batch_encoder, split_long_text

    encode = batch_encoder(tok)
    eos = int(tok.eos_token_id)
    dtype = token_dtype(len(tok))
    L = cfg.seq_len
    stats = ReadStats()
    doc_ids: list[str] = []
    doc_index: list[int] = []  # each document's position in the reader's stream (export reads the original back)
    doc_edited: list[bool] = []  # a prefilter edited its text
    doc_src: list[int] = []
    doc_len: list[int] = []
    src_code: dict[str, int] = {}
    total = 0
    rows = 0
    bar = tqdm(desc="tokenize", unit="tok", unit_scale=True, disable=None if progress else True, leave=False)
    def count_tokens(texts: list[str]) -> list[int]:  # with the EOS, as the pool counts a document's tokens
        return [len(ids) + 1 for ids in encode(texts)]

    docs = _documents(cfg, specs, stats, pre, decon, record=True, count_tokens=count_tokens, sink=sink)
    pending = [np.empty(0, dtype=np.uint32)]  # tokens of the row being filled
    t_log = time.monotonic()

    def push(flat: np.ndarray, fout: Any) -> None:
        """Append tokens to the stream; every full row of L goes to disk at once."""
        nonlocal rows
        buf = np.concatenate([pending[0], flat]) if pending[0].size else flat
        n_full = len(buf) // L
        if n_full:
            fout.write(buf[: n_full * L].astype(dtype, copy=False).tobytes())
            rows += n_full
        pending[0] = buf[n_full * L :]

    with open(tokens_path, "wb") as fout:
        for batch in _batches(docs):
            if len(batch) == 1 and len(batch[0].text) > LONG_TEXT_CHARS:
                # one long document, encoded piece by piece (tokenizer.split_long_text): memory stays bounded by
                # the piece size instead of growing with the document (a 50 MB line took 9.5 GB whole)
                n_tok = 1
                for piece in split_long_text(batch[0].text, LONG_TEXT_CHARS):
                    flat = np.asarray(encode([piece])[0], dtype=np.uint32)
                    push(flat, fout)
                    n_tok += len(flat)
                push(np.asarray([eos], dtype=np.uint32), fout)
                d = batch[0]
                doc_ids.append(d.doc_id)
                doc_index.append(d.index)
                doc_edited.append(d.edited)
                doc_src.append(src_code.setdefault(d.source, len(src_code)))
                doc_len.append(n_tok)
            else:
                ids_lists = encode([d.text for d in batch])
                n_tok = 0
                for d, ids in zip(batch, ids_lists):
                    ids.append(eos)
                    n_tok += len(ids)
                    doc_ids.append(d.doc_id)
                    doc_index.append(d.index)
                    doc_edited.append(d.edited)
                    doc_src.append(src_code.setdefault(d.source, len(src_code)))
                    doc_len.append(len(ids))
                push(np.fromiter(chain.from_iterable(ids_lists), dtype=np.uint32, count=n_tok), fout)
            total += n_tok
            bar.update(n_tok)
            bar.set_postfix(docs=len(doc_ids), refresh=False)
            if bar.disable and progress and time.monotonic() - t_log >= PROGRESS_LOG_S:  # no terminal: log lines
                t_log = time.monotonic()
                log.info("tokenize: %d documents, %d tokens, %d sequences so far", len(doc_ids), total, rows)
        fout.flush()
        os.fsync(fout.fileno())
    bar.close()
    if stats.documents == 0:
        raise _empty_corpus_error(where, stats, cfg.text_field)
    if rows == 0:
        raise LmselectError(
            f"{where}: corpus has only {total} tokens ({stats.documents} documents), fewer than seq_len={L}"
            + (stats.text_field_hint(cfg.text_field) or "; add text or lower --seq-len")
        )
    return {
        "stats": stats,
        "doc_ids": doc_ids,
        "doc_index": np.asarray(doc_index, dtype=np.int64),
        "doc_edited": np.asarray(doc_edited, dtype=bool),
        "doc_src": np.asarray(doc_src, dtype=np.int64),
        "doc_len": np.asarray(doc_len, dtype=np.int64),
        "source_names": list(src_code),
        "rows": rows,
        "total_tokens": total,
        "dtype": dtype,
        "eos": eos,
    }


def document_spans(doc_len: np.ndarray, seq_len: int, n_rows: int) -> dict[str, np.ndarray]:
    """Spans of documents (lengths in stream order, EOS included) over rows of ``seq_len`` tokens.

    Returns arrays ``doc`` (document index), ``seq_id``, ``start`` (offset in the row) and ``length``, one entry per
    (row, document) overlap, in stream order. Tokens past ``n_rows * seq_len`` (the dropped tail) are not covered.
    """
    doc_len = np.asarray(doc_len, dtype=np.int64)
    ends = np.cumsum(doc_len)
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
    perm = np.random.default_rng(seed).permutation(n_rows)
    shard = np.empty(n_rows, dtype=np.int32)
    shard[perm[:n_val]] = VAL_SHARD
    for k, part in enumerate(np.array_split(perm[n_val:], n_shards)):
        shard[part] = k
    return shard


def _write_index(cfg: PrepareConfig, tmp: Path, tok: Any, packed: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write sequences.parquet and docs.parquet; return the manifest counts and extra info."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmselect.data.tokenizer import tokenizer_fingerprint

    L = cfg.seq_len
    n = packed["rows"]
    # sort source names so codes (and tie-breaking) do not depend on input order
    names_seen = packed["source_names"]
    names = sorted(names_seen)
    remap = np.array([names.index(s) for s in names_seen], dtype=np.int64)
    doc_src = remap[packed["doc_src"]]
    sp = document_spans(packed["doc_len"], L, n)
    span_src = doc_src[sp["doc"]]
    n_src = len(names)
    # tokens of each source in each row -> majority label
    per_row = np.bincount(sp["seq_id"] * n_src + span_src, weights=sp["length"], minlength=n * n_src).reshape(n, n_src)
    row_src = per_row.argmax(1)
    n_docs_row = np.bincount(sp["seq_id"], minlength=n)

    n_val = cfg.val_sequences if cfg.val_sequences is not None else int(round(cfg.val_fraction * n))
    if n_val >= n:
        raise LmselectError(f"validation hold-out of {n_val} sequences leaves nothing to train on ({n} sequences)")
    shard = assign_shards(n, cfg.n_shards, n_val, cfg.seed)

    names_arr = np.array(names, dtype=object)
    pq.write_table(
        pa.table(
            {
                "seq_id": np.arange(n, dtype=np.int64),
                "shard": shard,
                "source": pa.array(names_arr[row_src].tolist(), type=pa.string()),
                "n_docs": n_docs_row.astype(np.int64),
            }
        ),
        tmp / "sequences.parquet",
    )
    doc_ids = np.array(packed["doc_ids"], dtype=object)
    pq.write_table(
        pa.table(
            {
                "seq_id": sp["seq_id"].astype(np.int64),
                "doc_id": pa.array(doc_ids[sp["doc"]].tolist(), type=pa.string()),
                "source": pa.array(names_arr[span_src].tolist(), type=pa.string()),
                "start": sp["start"].astype(np.int64),
                "length": sp["length"].astype(np.int64),
                "doc": sp["doc"].astype(np.int64),  # the pool's document number (a row of ORIGINS_FILE)
            }
        ),
        tmp / "docs.parquet",
    )
    # one row per pool document: where its original record is in the reader's stream and whether a prefilter
    # edited its text (export gives back the original record's text and offsets into it)
    pq.write_table(
        pa.table(
            {
                "doc": np.arange(len(doc_ids), dtype=np.int64),
                "doc_id": pa.array(doc_ids.tolist(), type=pa.string()),
                "index": packed["doc_index"],
                "edited": pa.array(packed["doc_edited"], type=pa.bool_()),
            }
        ),
        tmp / ORIGINS_FILE,
    )

    # ---- counts for the manifest -------------------------------------------------------------------------------
    n_docs = len(doc_ids)
    span_shard = shard[sp["seq_id"]].astype(np.int64)
    doc_shard_pairs = np.unique((span_shard + 1) * max(n_docs, 1) + sp["doc"])
    docs_per_shard = np.bincount(doc_shard_pairs // max(n_docs, 1), minlength=cfg.n_shards + 1)  # index = shard + 1
    shard_ids = [VAL_SHARD] + list(range(cfg.n_shards)) if n_val else list(range(cfg.n_shards))
    per_shard = {
        str(s): {"sequences": int((shard == s).sum()), "tokens": int((shard == s).sum()) * L, "documents": int(docs_per_shard[s + 1])}
        for s in shard_ids
    }
    packed_tok_src = np.bincount(span_src, weights=sp["length"], minlength=n_src)
    per_source = {
        name: {
            "documents": int((doc_src == i).sum()),
            "tokens": int(packed["doc_len"][doc_src == i].sum()),
            "packed_tokens": int(packed_tok_src[i]),
            "sequences": int((row_src == i).sum()),
        }
        for i, name in enumerate(names)
    }
    stats: ReadStats = packed["stats"]
    counts: dict[str, Any] = {
        "sequences": int(n),
        "tokens": int(n * L),
        "sequences_per_shard": {str(s): int((shard == s).sum()) for s in range(cfg.n_shards)},
        "validation_sequences": int(n_val),
        "documents": int(n_docs),
        "documents_packed": int(len(np.unique(sp["doc"]))),
        "corpus_tokens": int(packed["total_tokens"]),
        "dropped_tail_tokens": int(packed["total_tokens"] - n * L),
        "per_shard": per_shard,
        "per_source": per_source,
    }
    read = stats.to_dict()
    counts.update(
        {
            "records": read["records"],
            "empty_records": read["empty"],
            "skipped": read["skipped"],
            "skipped_by_reason": read["skipped_by_reason"],
            "skipped_by_file": read["skipped_by_file"],
            "skipped_examples": read["skipped_examples"],
        }
    )
    extra = {
        "seq_len": int(L),
        "vocab_size": int(len(tok)),
        "eos_id": int(packed["eos"]),
        "dtype": packed["dtype"].name,
        "n_shards": int(cfg.n_shards),
        "tokenizer_fingerprint": tokenizer_fingerprint(tok),
        "source_names": names,
    }
    return counts, extra


# ----------------------------------------------------------------------------------------------------------------
# command line

_EPILOG = """\
inputs: .jsonl / .jsonl.gz / .jsonl.zst, .parquet, .txt files or folders of them, datasets.save_to_disk folders
(DIR#split), or hf:OWNER/NAME[#split] (needs network). Globs are expanded.

bad input: malformed records (bad JSON, no text field, text not a string, non-UTF-8 line or file) are skipped and
counted in the manifest; --strict makes them fatal. An empty corpus, a missing file, seq_len < 2 or a tokenizer
directory that does not load is always an error naming the file and line.

prefilter: --prefilter gopher_repetition,c4 runs datatrove's heuristic filters first (also gopher_quality,
c4_datatrove, fineweb_quality); counts go to the manifest (extra.prefilter), removed documents to
prefilter_dropped.jsonl.

decontamination: --decontaminate PATH (repeatable; files, folders, globs, bundled:REL) lists protected texts;
documents sharing a --decontam-n word n-gram (default 13) with them are flagged in contamination.parquet and the
manifest, or removed with --decontam-mode drop.

Any config key may also be set as --key=value (e.g. --tokenizer_train_chars=1e7) or in --config YAML.
A complete pool with the same config is reused ("pool already complete"); a different config needs --overwrite."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``lmselect prepare``. Flags left unset fall back to ``--config`` YAML, then the defaults."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EPILOG
    S = argparse.SUPPRESS
    parser.add_argument("inputs", nargs="*", default=S, help="corpus files, folders, globs or hf:OWNER/NAME")
    parser.add_argument("-o", "--out", required=True, help="output pool directory")
    parser.add_argument("--config", default=None, help="YAML file with PrepareConfig keys")
    parser.add_argument("--tokenizer", default=S, help="HF tokenizer directory (default: train a byte-level BPE)")
    parser.add_argument("--vocab-size", dest="vocab_size", type=int, default=S, help="BPE vocabulary size (default 8192)")
    parser.add_argument("--seq-len", dest="seq_len", type=int, default=S, help="tokens per sequence (default 1024)")
    parser.add_argument("--n-shards", dest="n_shards", type=int, default=S, help="candidate-pool shards (default 5)")
    parser.add_argument("--val-fraction", dest="val_fraction", type=float, default=S, help="validation hold-out fraction (default 0)")
    parser.add_argument("--val-sequences", dest="val_sequences", type=int, default=S, help="validation hold-out size (overrides --val-fraction)")
    parser.add_argument("--seed", type=int, default=S, help="seed of the shard assignment (default 0)")
    parser.add_argument("--workers", type=int, default=S, help="tokenizer threads (default: all cores)")
    parser.add_argument("--strict", action="store_true", default=S, help="malformed records are fatal (default: skip and count)")
    parser.add_argument("--max-docs", dest="max_docs", type=int, default=S, help="read at most this many documents")
    parser.add_argument("--text-field", dest="text_field", default=S, help="record field with the text (default 'text')")
    parser.add_argument("--id-field", dest="id_field", default=S, help="record field with the document id (default 'id')")
    parser.add_argument("--source-field", dest="source_field", default=S, help="record field with the source label (default 'source')")
    parser.add_argument(
        "--decontaminate", action="append", metavar="PATH", default=S,
        help="protected file/folder/glob (bundled:REL allowed; repeatable): flag pool documents sharing n-grams with it",
    )
    parser.add_argument("--decontam-n", dest="decontam_n", type=int, default=S, help="n-gram length in words (default 13)")
    parser.add_argument("--decontam-mode", dest="decontam_mode", choices=("flag", "drop"), default=S,
                        help="flag: keep and list overlapping documents (default); drop: remove them before tokenizing")
    parser.add_argument("--decontam-min-fraction", dest="decontam_min_fraction", type=float, default=S,
                        help="contaminated when at least this fraction of a document's n-grams overlap (default 0: any)")
    parser.add_argument("--prefilter", default=S, metavar="NAME,...",
                        help="datatrove heuristic filters run first, in order: gopher_repetition, gopher_quality, c4 "
                        "(TFDS constants), c4_datatrove, fineweb_quality; 'none' = off (default)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing pool built with a different config")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


_RUN_FLAGS = ("out", "config", "overwrite", "no_progress", "debug", "overrides", "command")
# flat decontamination flags -> keys of PrepareConfig.decontaminate
_DECONTAM_FLAGS = {"decontaminate": "protected", "decontam_n": "n", "decontam_mode": "mode", "decontam_min_fraction": "min_fraction"}


def config_from_args(args: argparse.Namespace) -> PrepareConfig:
    """Defaults <- --config YAML <- explicit flags <- --key=value overrides."""
    data: dict[str, Any] = read_yaml(args.config) if getattr(args, "config", None) else {}
    flags = {k: v for k, v in vars(args).items() if k not in _RUN_FLAGS}
    decon = {key: flags.pop(flag) for flag, key in _DECONTAM_FLAGS.items() if flag in flags}
    if decon:
        flags["decontaminate"] = decon
    data = deep_merge(data, flags)
    overrides = list(getattr(args, "overrides", []) or [])
    data = deep_merge(data, parse_overrides(overrides))
    try:
        return from_dict(PrepareConfig, data)
    except ConfigError as e:
        raise blame(e, getattr(args, "config", None), overrides) from None


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    path, reused = prepare_pool(cfg, args.out, overwrite=args.overwrite, progress=not args.no_progress)
    if reused:
        print(f"{path}: pool already complete")
        return 0
    m = read_json(path / MANIFEST)
    c = m["counts"]
    print(
        f"{path}: {c['sequences']} sequences x {m['extra']['seq_len']} tokens "
        f"({c['documents']} documents, {c['corpus_tokens']} tokens, {c['skipped']} malformed records skipped) "
        f"in {m['timings']['total_s']:.1f}s"
    )
    if "prefilter" in m["extra"]:
        print(prefilter_summary(m["extra"]["prefilter"]))
    if "decontamination" in m["extra"]:
        print(summary_line(m["extra"]["decontamination"]))
    return 0
