"""Scoring raw .jsonl text: fixed-size token windows, ``score_jsonl``, and the roll-up to document scores.

Each record's ``text`` is tokenized (no special tokens) and cut into consecutive windows of at most ``seq_len``
tokens; every window is scored like a pool sequence (``seq_id`` = window number in file order) and its row carries
``doc_id`` (the record's ``id``; without one, "<file>/<0-based line>": ``ID_POLICY``), ``doc_index`` (0-based
record number over all input files), ``char_start`` and ``char_end``. The input is a file, a folder or a glob, read
by prepare's reader (``.gz`` / ``.zst``, malformed lines skipped and counted). When every part exists the windows
are rolled up to one row per document in ``documents.parquet`` (:func:`rollup_documents`: mean of the finite
window scores, with min, max and n_windows) and written as dolma attribute files mirroring the input files'
relative names (:func:`write_attributes`, :func:`attribute_path`), before the manifest.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmselect.artifacts import (
    LmselectError,
    Manifest,
    atomic_path,
    is_complete,
    parent_ref,
    read_manifest,
    write_manifest,
)
from lmselect.data.pool import TokenPool
from lmselect.data.readers import ID_POLICY, JsonlDoc, ReadStats, read_jsonl_docs, resolve_jsonl_inputs
from lmselect.data.records import DEFAULT_ATTRIBUTE, check_attribute_name, write_attributes
from lmselect.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from lmselect.score.job import ScoreJob, check_vocab, model_and_meta, run_job
from lmselect.score.sidecar import ATTRIBUTES_DIR, DOCUMENTS_FILE, part_name, write_part_table
from lmselect.select.base import is_text_scorer, load_text_scorer

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
    """Score every ``seq_len``-token window of each record's ``text``; rows carry ``doc_id``, ``doc_index``,
    ``char_start``, ``char_end`` (``seq_id`` = window number in file order). Same sharding / resume behaviour as
    :func:`~lmselect.score.job.score_pool`. The complete sidecar also holds ``documents.parquet`` and the dolma
    attribute file of every input file, ``attributes/<attribute_name>/<its relative name>`` (see
    :func:`rollup_documents`, :func:`attribute_path`). ``jsonl`` is a file, a folder or a glob
    (:func:`resolve_jsonl_inputs`); records without an id follow ``ID_POLICY``.
    A text scorer (the ``scores/text_scorer`` of a ``fasttext`` / ``dsir`` round) scores each whole record instead:
    :func:`score_jsonl_texts`, no tokenizer and no windows."""
    if not lm_loss and isinstance(model_dir_or_scorer, (str, Path)):
        if is_text_scorer(model_dir_or_scorer):
            return score_jsonl_texts(model_dir_or_scorer, jsonl, out_dir, shard=shard, config=config,
                                     attribute_name=attribute_name, text_field=text_field)
    check_attribute_name(attribute_name)
    files = resolve_jsonl_inputs(jsonl)
    read_stats = ReadStats()
    records = read_jsonl_docs(jsonl, text_field=text_field, stats=read_stats)
    read_stats.warn_malformed(log)
    _warn_missing_ids(records)
    docs = [(d.doc_id, d.text) for d in records]
    n_blank = sum(d.blank for d in records)
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
    if meta.get("max_positions") and seq_len > int(meta["max_positions"]):
        raise LmselectError(f"--seq-len {seq_len} exceeds the model's {meta['max_positions']} positions")
    check_vocab(meta, tokenizer_fingerprint(tokenizer), len(tokenizer), str(tok_dir), trust=trust_tokenizer)
    if is_complete(tokenizer_from, "pool"):
        parents.append(parent_ref(tokenizer_from))
    win = make_windows(docs, tokenizer, seq_len)
    if len(win.length) == 0:
        raise LmselectError(f"{jsonl}: no text to score (all {win.n_docs - n_blank} records are empty or malformed)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    def fetch(b: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        lens = win.length[b]
        width = int(lens.max())
        x = np.full((len(b), width), pad_id, dtype=np.int64)
        for r, (s, k) in enumerate(zip(win.start[b], lens)):
            x[r, :k] = win.tokens[s : s + k]
        if int(lens.min()) == width:  # no padding: same code path as pool scoring
            return torch.from_numpy(x), None
        mask = (np.arange(width)[None, :] < lens[:, None]).astype(np.int64)
        return torch.from_numpy(x), torch.from_numpy(mask)

    doc_ids = np.asarray(win.doc_id, dtype=object)
    job = ScoreJob(
        items=np.arange(len(win.length), dtype=np.int64),
        fetch=fetch,
        key={"input": "jsonl", "jsonl": [_file_key(f) for f, _ in files], "text_field": text_field,
             "tokenizer": tokenizer_fingerprint(tokenizer), "seq_len": seq_len, "model": meta["path"],
             "score": meta["kind"], "format": 3},
        extra_columns=lambda ids: {"doc_id": doc_ids[ids].tolist(), "doc_index": win.doc_index[ids],
                                   "char_start": win.char_start[ids], "char_end": win.char_end[ids]},
        order_key=-win.length,  # longest first: short tail windows batch together, so little padding
        finish=lambda d, parts: _write_documents(d, parts, records, attribute_name),
    )
    cfg = config if config is not None else {"model": meta["path"], "jsonl": str(jsonl),
                                               "tokenizer_from": str(tokenizer_from), "seq_len": seq_len,
                                               "lm_loss": lm_loss, "batch_size": batch_size, "text_field": text_field}
    read = read_stats.to_dict()
    return run_job(
        model, job, out_dir, batch_size=batch_size, shard=shard, num_parts=num_parts, device=device, dtype=dtype,
        progress=progress, checkpoint_every=checkpoint_every, config=cfg, parents=parents,
        counts={"documents": win.n_docs - n_blank, "empty_documents": win.n_empty - n_blank, "blank_lines": n_blank,
                "windows": int(len(win.length)),
                "files": len(files), "skipped": read["skipped"], "skipped_by_reason": read["skipped_by_reason"],
                "documents_without_id": sum(d.id_derived for d in records)},
        extra={"input": "jsonl", "jsonl": str(jsonl), "tokenizer": str(tok_dir), "seq_len": seq_len,
               "score": meta["kind"], "activation": meta.get("activation"), "model": meta["path"],
               "documents_file": DOCUMENTS_FILE, "text_field": text_field,
               "jsonl_files": [{"path": str(f.resolve()), "file": rel} for f, rel in files],
               "attributes": attribute_path(files[0][1], attribute_name),
               "attribute_files": [attribute_path(rel, attribute_name) for _, rel in files],
               "skipped_examples": read["skipped_examples"]},
    )




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
    _warn_missing_ids(records)
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


def _warn_missing_ids(docs: list[JsonlDoc]) -> None:
    by_file: dict[str, int] = {}
    for d in docs:
        if d.id_derived:
            by_file[d.file] = by_file.get(d.file, 0) + 1
    for f, n in by_file.items():
        log.warning("%s: %d record(s) have no id; documents.parquet keys them '%s/<0-based line>' (datatrove's "
                    "default id), the attribute file keeps their id as in the file (dolma matches by line)",
                    f, n, f)


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
