"""Scoring raw .jsonl text: fixed-size token windows, ``score_jsonl``, and the roll-up to document scores.

Each record's ``text`` is tokenized (no special tokens) and cut into consecutive windows of at most ``seq_len``
tokens; every window is scored like a pool sequence (``seq_id`` = window number in file order) and its row carries
``doc_id`` (the record's ``id``, else its 1-based line number), ``doc_index`` (0-based record number),
``char_start`` and ``char_end``. When every part exists the windows are rolled up to one row per document in
``documents.parquet`` (:func:`rollup_documents`: mean of the finite window scores, with min, max and n_windows)
and written as a dolma attribute file (:func:`write_attributes`), before the manifest.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmselect.artifacts import LmselectError, atomic_path, is_complete, parent_ref
from lmselect.score.job import _check_vocab, _Job, _model_and_meta, _run_job
from lmselect.score.sidecar import ATTRIBUTES_DIR, DOCUMENTS_FILE

log = logging.getLogger("lmselect.score")

DEFAULT_ATTRIBUTE = "lmselect"  # dolma attribute name prefix: "<name>__score", "<name>__window_scores"


def resolve_tokenizer_dir(path: str | Path) -> Path:
    """Tokenizer directory of a pool (``tokenizer/``), a score model (``backbone/``), a checkpoint, or itself."""
    p = Path(path)
    if not p.exists():
        raise LmselectError(f"{p}: --tokenizer-from directory not found")
    for c in (p / "tokenizer", p / "backbone", p / "score_model" / "backbone", p):
        if (c / "tokenizer.json").is_file() or (c / "tokenizer_config.json").is_file():
            return c
    raise LmselectError(f"{p}: no tokenizer found (looked for tokenizer/, backbone/ and tokenizer.json)")


@dataclass(frozen=True)
class JsonlDoc:
    """One record of a .jsonl file to score."""

    doc_id: str  # the record's ``id``, else its 1-based line number
    text: str
    source: str  # the record's ``source``, else the file's name without extensions (dolma needs one)
    line: int  # 1-based line number


def _file_stem(path: Path) -> str:
    name = path.name
    for ext in (".gz", ".jsonl", ".json"):
        name = name[: -len(ext)] if name.endswith(ext) else name
    return name or path.name


def read_jsonl_docs(path: str | Path) -> list[JsonlDoc]:
    """Every record of a .jsonl / .jsonl.gz file, in file order (blank lines skipped); one-line errors name
    ``path:line`` for a record without a string ``text``."""
    from lmselect.data.readers import iter_json_records

    stem = _file_stem(Path(path))
    out: list[JsonlDoc] = []
    for lineno, rec in iter_json_records(path):
        if "text" not in rec:
            raise LmselectError(f"{path}:{lineno}: record has no 'text' field")
        if not isinstance(rec["text"], str):
            raise LmselectError(f"{path}:{lineno}: 'text' is not a string")
        doc_id = rec.get("id")
        src = rec.get("source")
        out.append(JsonlDoc(str(doc_id) if doc_id is not None else str(lineno), rec["text"],
                            str(src) if src is not None else stem, lineno))
    return out


def read_jsonl_texts(path: str | Path) -> list[tuple[str, str]]:
    """(doc_id, text) per record: ``doc_id`` = the record's ``id`` or its 1-based line number; blank lines skipped."""
    return [(d.doc_id, d.text) for d in read_jsonl_docs(path)]


@dataclass
class Windows:
    """Fixed-size token windows of documents, with their character spans in the source text."""

    tokens: np.ndarray  # flat int64
    start: np.ndarray  # offset of each window in ``tokens``
    length: np.ndarray
    doc_id: list[str]
    doc_index: np.ndarray  # position of each window's document in the ``docs`` list
    char_start: np.ndarray
    char_end: np.ndarray
    n_docs: int
    n_empty: int


def make_windows(docs: list[tuple[str, str]], tokenizer: Any, seq_len: int, chunk: int = 1024) -> Windows:
    """Tokenize each text (no special tokens) and cut it into consecutive windows of at most ``seq_len`` tokens.

    A window's ``char_start:char_end`` is the text from its first token's start offset to its last token's end
    offset, so the spans of a document's windows tile its (tokenized) text and can be joined back to the record.
    """
    if seq_len < 1:
        raise LmselectError(f"--seq-len must be >= 1, got {seq_len}")
    toks, starts, lens, dids, dix, cs, ce = [], [], [], [], [], [], []
    pos, n_empty = 0, 0
    for c in range(0, len(docs), chunk):
        part = docs[c : c + chunk]
        enc = tokenizer([t for _, t in part], add_special_tokens=False, return_offsets_mapping=True)
        for j, ((doc_id, _), ids, offs) in enumerate(zip(part, enc["input_ids"], enc["offset_mapping"])):
            if not ids:
                n_empty += 1
                continue
            ids_a = np.asarray(ids, dtype=np.int64)
            offs_a = np.asarray(offs, dtype=np.int64).reshape(-1, 2)
            toks.append(ids_a)
            for w in range(0, len(ids_a), seq_len):
                k = min(seq_len, len(ids_a) - w)
                starts.append(pos + w)
                lens.append(k)
                dids.append(doc_id)
                dix.append(c + j)
                cs.append(int(offs_a[w, 0]))
                ce.append(int(offs_a[w + k - 1, 1]))
            pos += len(ids_a)
    return Windows(
        tokens=np.concatenate(toks) if toks else np.zeros(0, np.int64),
        start=np.asarray(starts, dtype=np.int64), length=np.asarray(lens, dtype=np.int64), doc_id=dids,
        doc_index=np.asarray(dix, dtype=np.int64),
        char_start=np.asarray(cs, dtype=np.int64), char_end=np.asarray(ce, dtype=np.int64),
        n_docs=len(docs), n_empty=n_empty,
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
) -> Path:
    """Score every ``seq_len``-token window of each record's ``text``; rows carry ``doc_id``, ``doc_index``,
    ``char_start``, ``char_end`` (``seq_id`` = window number in file order). Same sharding / resume behaviour as
    :func:`~lmselect.score.job.score_pool`. The complete sidecar also holds ``documents.parquet`` and the dolma
    attribute file ``attributes/<attribute_name>/<input name>.jsonl.gz`` (see :func:`rollup_documents`)."""
    from lmselect.data.pool import TokenPool
    from lmselect.data.tokenizer import load_tokenizer, tokenizer_fingerprint

    check_attribute_name(attribute_name)
    jsonl = Path(jsonl)
    records = read_jsonl_docs(jsonl)
    docs = [(d.doc_id, d.text) for d in records]
    tok_dir = resolve_tokenizer_dir(tokenizer_from)
    tokenizer = load_tokenizer(tok_dir)
    model, meta, model_parents = _model_and_meta(model_dir_or_scorer, lm_loss)
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
    _check_vocab(meta, tokenizer_fingerprint(tokenizer), len(tokenizer), str(tok_dir))
    if is_complete(tokenizer_from, "pool"):
        parents.append(parent_ref(tokenizer_from))
    win = make_windows(docs, tokenizer, seq_len)
    if len(win.length) == 0:
        raise LmselectError(f"{jsonl}: no text to score (all {win.n_docs} records are empty)")
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
    job = _Job(
        items=np.arange(len(win.length), dtype=np.int64),
        fetch=fetch,
        key={"input": "jsonl", "jsonl": _file_key(jsonl), "tokenizer": tokenizer_fingerprint(tokenizer),
             "seq_len": seq_len, "model": meta["path"], "score": meta["kind"], "format": 2},
        extra_columns=lambda ids: {"doc_id": doc_ids[ids].tolist(), "doc_index": win.doc_index[ids],
                                   "char_start": win.char_start[ids], "char_end": win.char_end[ids]},
        order_key=-win.length,  # longest first: short tail windows batch together, so little padding
        finish=lambda d, parts: _write_documents(d, parts, records, jsonl, attribute_name),
    )
    cfg = config if config is not None else {"model": meta["path"], "jsonl": str(jsonl),
                                               "tokenizer_from": str(tokenizer_from), "seq_len": seq_len,
                                               "lm_loss": lm_loss, "batch_size": batch_size}
    return _run_job(
        model, job, out_dir, batch_size=batch_size, shard=shard, num_parts=num_parts, device=device, dtype=dtype,
        progress=progress, checkpoint_every=checkpoint_every, config=cfg, parents=parents,
        counts={"documents": win.n_docs, "empty_documents": win.n_empty, "windows": int(len(win.length))},
        extra={"input": "jsonl", "jsonl": str(jsonl), "tokenizer": str(tok_dir), "seq_len": seq_len,
               "score": meta["kind"], "activation": meta.get("activation"), "model": meta["path"],
               "documents_file": DOCUMENTS_FILE, "attributes": attribute_path(jsonl, attribute_name)},
    )




# ----------------------------------------------------------------------------------------------------------------
# document roll-up


def check_attribute_name(name: str) -> str:
    """A dolma attribute name: letters, digits, ``_ - .``, no ``__`` (dolma joins ``name__key`` with it)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", str(name)) or "__" in str(name):
        raise LmselectError(f"--attribute-name must be letters, digits, _ - . without '__'; got {name!r}")
    return str(name)


def attribute_path(jsonl: str | Path, name: str) -> str:
    """Where the attribute file of ``jsonl`` goes inside the sidecar: ``attributes/<name>/<stem>.jsonl.gz`` (dolma
    mirrors the documents' file names under ``attributes/<name>/``)."""
    return f"{ATTRIBUTES_DIR}/{name}/{_file_stem(Path(jsonl))}.jsonl.gz"


def rollup_documents(windows: Any, docs: list[JsonlDoc]) -> Any:
    """One row per document (every record of the file, in file order) from the window rows of a sidecar.

    ``windows`` is a pyarrow Table with ``doc_index`` and ``score``. Columns: ``doc_index`` (0-based record number),
    ``doc_id``, ``source``, ``line``, ``n_chars`` (``len(text)``), ``n_windows``, ``score`` (mean of the document's
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
        "source": pa.array([d.source for d in docs], type=pa.string()),
        "line": pa.array(np.asarray([d.line for d in docs], dtype=np.int64)),
        "n_chars": pa.array(np.asarray([len(d.text) for d in docs], dtype=np.int64)),
        "n_windows": pa.array(n_windows.astype(np.int64)),
        "score": pa.array(mean.astype(np.float32)),
        "score_min": pa.array(np.where(has, lo, np.nan).astype(np.float32)),
        "score_max": pa.array(np.where(has, hi, np.nan).astype(np.float32)),
    })


def write_attributes(path: Path, documents: Any, windows: Any, name: str) -> None:
    """Write the dolma attribute file: one gzipped json line per document, in the documents' order::

        {"id": ..., "source": ..., "attributes": {"<name>__score": [[0, len(text), mean]],
                                                  "<name>__window_scores": [[char_start, char_end, score], ...]}}

    Spans are character offsets into the record's ``text``; a document without a finite score gets ``[]``
    (JSON has no NaN). The gzip header carries no name or timestamp, so a rerun writes identical bytes.
    """
    by_doc: dict[int, list[list[float]]] = {}
    idx = windows.column("doc_index").to_numpy()
    order = np.lexsort((windows.column("char_start").to_numpy(), idx))
    cs, ce = windows.column("char_start").to_numpy(), windows.column("char_end").to_numpy()
    sc = windows.column("score").to_numpy()
    for r in order:
        if np.isfinite(sc[r]):
            by_doc.setdefault(int(idx[r]), []).append([int(cs[r]), int(ce[r]), float(sc[r])])
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz:
        for d in documents.to_pylist():
            score = d["score"]
            doc_span = [[0, int(d["n_chars"]), float(score)]] if score is not None and np.isfinite(score) else []
            rec = {"id": d["doc_id"], "source": d["source"],
                   "attributes": {f"{name}__score": doc_span,
                                  f"{name}__window_scores": by_doc.get(int(d["doc_index"]), [])}}
            gz.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))


def _write_documents(out_dir: Path, parts: list[Path], docs: list[JsonlDoc], jsonl: Path, name: str) -> dict[str, Any]:
    """The ``finish`` step of a jsonl job: documents.parquet and the attribute file, before the manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = ["seq_id", "score", "doc_index", "char_start", "char_end"]
    windows = pa.concat_tables([pq.read_table(p, columns=cols) for p in parts]).sort_by("seq_id")
    documents = rollup_documents(windows, docs)
    with atomic_path(out_dir / DOCUMENTS_FILE) as tmp:
        pq.write_table(documents, tmp)
    write_attributes(out_dir / attribute_path(jsonl, name), documents, windows, name)
    scored = int(np.isfinite(documents.column("score").to_numpy(zero_copy_only=False)).sum())
    log.info("documents: %s (%d of %d documents scored)", out_dir / DOCUMENTS_FILE, scored, len(docs))
    return {"documents_scored": scored}
