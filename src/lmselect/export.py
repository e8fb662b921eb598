"""``lmselect export``: take a selection out of lmselect, as documents and as flat tokens for any trainer.

    lmselect export RUN/bliss/seed0/round2/selection --out exported/            # one selection
    lmselect export RUN --out exported/                                         # every method/seed, final round
    lmselect export RUN --round 1 --format parquet --out exported/

An export directory (manifest kind="export", written last; the directory is built in a temporary place and
renamed, so it is all or nothing; staging directories of killed exports are removed on the next export into the
same place; replacing an export of another selection, run, round or format needs ``--overwrite``) holds:

* ``documents.jsonl.gz`` (``--format jsonl``) or ``documents.parquet``: one row per piece of a document inside the
  selected sequences, in pool order: ``id`` (unique in the export: the document's own id when the row is the whole
  document, else ``"<doc_id>:<char_start>-<char_end>"``), ``doc_id`` and ``source`` (the corpus record's own, from
  ``docs.parquet``), ``complete`` (the whole record is in the row), ``char_start`` / ``char_end`` (the row's
  character offsets in the original record's text; 0 and its length when complete), ``doc_token_start`` (tokens of
  the document before the row), ``seq_ids`` (the selected pool sequences the piece spans), ``token_start`` (offset
  in the first of them), ``n_tokens``, ``edited`` (the prefilter changed the document's text), ``scores`` and
  ``score`` (their mean; when the selection was made from a scores sidecar) and ``text``: **the original record's
  text** at ``char_start:char_end``, read back from the pool's inputs (:class:`_Originals`; refused in one line when
  an input is gone or changed). ``--text both`` adds ``pool_text`` (the piece's tokens decoded with the pool's
  tokenizer, end-of-document token left out: the text the methods saw) with ``pool_char_start`` /
  ``pool_char_end``.
  A document whose sequences were all selected comes back whole, as one row. A document that continues across
  sequences is exported only where it lies inside selected sequences: one piece per run of consecutive selected
  sequences, so a document whose middle sequence was not selected gives two rows, each with ``complete`` false and
  its offsets (for a document the prefilter edited, mapped into the original: :func:`offset_blocks`). A pool piece
  cut at a sequence boundary may start or end inside a multi-byte character, which decodes as U+FFFD in
  ``pool_text``. ``id`` / ``text`` are the keys datatrove's ``JsonlReader`` and
  ``ParquetReader`` read by default.
* ``tokens.bin``: the selected sequences' tokens, row after row in pool order, as one flat little-endian array of
  uint16 (when the vocabulary fits) or uint32 — the layout nanoGPT (``np.memmap(path, dtype=np.uint16, mode="r")``)
  and litgpt read — with ``seq_ids.npy`` (row i = pool sequence id) and ``tokens.json`` (dtype, seq_len,
  n_sequences, n_tokens, vocab_size, eos_id, tokenizer fingerprint, the source selection's uuid).
* ``tokenizer/``: the pool's tokenizer directory, copied, so the tokens can be decoded without the pool.

From a run directory every method/seed's final round (the highest round with a complete selection; ``--round R``
picks one) is exported to ``OUT/<method>/seed<k>/round<r>/``, and ``OUT/manifest.json`` lists them. Token-level
methods (rho1, blade) select whole shards: their export is the shard (the per-token loss masks are not exported).
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from lmselect.artifacts import (
    LmselectError,
    Manifest,
    atomic_path,
    atomic_save_npy,
    atomic_write_json,
    check_replaceable,
    is_complete,
    parent_ref,
    read_manifest,
    remove_stale_tmp,
    write_manifest,
)
from lmselect.data.pool import TokenPool, token_dtype
from lmselect.data.prefilter import export_dropped
from lmselect.data.prepare import ORIGINS_FILE
from lmselect.data.readers import reread_documents
from lmselect.layout import RunLayout, RunPath
from lmselect.select.selection import read_selection

log = logging.getLogger("lmselect.export")

FORMATS = ("jsonl", "parquet")
DOCUMENT_FILES = {"jsonl": "documents.jsonl.gz", "parquet": "documents.parquet"}
TOKENS_FILE = "tokens.bin"
TOKENS_META = "tokens.json"
SEQ_IDS_FILE = "seq_ids.npy"
_CHUNK = 4096  # pieces decoded and written at a time (bounds memory for large selections)
SEGMENT_SPANS = 1 << 16  # docs.parquet spans read at a time (occurrence_segments)


# ----------------------------------------------------------------------------------------------------------------
# documents of a selection


@dataclass
class Pieces:
    """Runs of consecutive selected spans of one document occurrence, in pool (stream) order."""

    doc_id: list[str]
    source: list[str]
    span_ptr: np.ndarray  # piece p covers spans span_ptr[p]:span_ptr[p+1] of the arrays below
    seq: np.ndarray  # per span: pool sequence id
    start: np.ndarray  # per span: offset in the sequence
    length: np.ndarray  # per span: tokens
    complete: np.ndarray  # per piece: the whole document occurrence is in the piece
    ends_document: np.ndarray  # per piece: its last span is the document's last (ends with the EOS token)
    # where each piece lies in its document: the spans of the occurrence before it (in the all_* arrays, which hold
    # every span of the pool in stream order) are all_first[p] - occ_first[p] spans starting at occ_first[p]
    occ_first: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    all_first: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    all_seq: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    all_start: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    all_length: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    doc: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # per piece: pool document number (-1: old pool)
    all_doc: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # per span (all_*): its document

    def __len__(self) -> int:
        return len(self.doc_id)


def document_pieces(docs: Any, selected: np.ndarray, seq_len: int) -> Pieces:
    """Pieces of documents inside ``selected`` sequences, from a pool's ``docs.parquet`` table.

    A document occurrence is a maximal chain of spans with one (doc_id, source) where each continues the previous
    one: the next sequence, from offset 0, after a span that ran to the end of its sequence. (Matching on the chain
    rather than on doc_id alone keeps two different documents with the same id apart.)
    """
    seq = docs.column("seq_id").to_numpy().astype(np.int64)
    start = docs.column("start").to_numpy().astype(np.int64)
    length = docs.column("length").to_numpy().astype(np.int64)
    import pyarrow as pa

    has_doc = "doc" in docs.column_names  # pools prepared since issue 29 number their documents
    dnum = docs.column("doc").to_numpy().astype(np.int64) if has_doc else np.full(len(seq), -1, np.int64)
    order = np.lexsort((start, seq))  # stream order (docs.parquet is written in it; sort to be sure)
    seq, start, length, dnum = seq[order], start[order], length[order], dnum[order]
    cont = np.zeros(len(seq), dtype=bool)
    if len(seq) > 1 and has_doc:
        cont[1:] = dnum[1:] == dnum[:-1]
    elif len(seq) > 1:  # an older pool: ids compared as Python strings, every span of the segment
        doc_id = np.asarray(docs.column("doc_id").to_pylist(), dtype=object)[order]
        source = np.asarray(docs.column("source").to_pylist(), dtype=object)[order]
        cont[1:] = ((doc_id[1:] == doc_id[:-1]) & (source[1:] == source[:-1]) & (seq[1:] == seq[:-1] + 1)
                    & (start[1:] == 0) & (start[:-1] + length[:-1] == seq_len))
    occ = np.cumsum(~cont) - 1  # document occurrence of each span
    occ_size = np.bincount(occ) if len(occ) else np.zeros(0, np.int64)
    last_of_occ = np.ones(len(seq), dtype=bool)
    last_of_occ[:-1] = occ[1:] != occ[:-1]

    keep = np.isin(seq, selected)
    k_seq, k_start, k_len, k_occ = seq[keep], start[keep], length[keep], occ[keep]
    k_glob = np.flatnonzero(keep)  # position of each kept span in the full (stream-ordered) arrays
    occ_first_span = np.flatnonzero(~cont)  # first span of every occurrence
    new_piece = np.ones(len(k_seq), dtype=bool)
    if len(k_seq) > 1:
        new_piece[1:] = (k_occ[1:] != k_occ[:-1]) | (k_seq[1:] != k_seq[:-1] + 1)
    first = np.flatnonzero(new_piece)
    ptr = np.append(first, len(k_seq)).astype(np.int64)
    n_spans = np.diff(ptr)
    last = ptr[1:] - 1
    # ids and sources of the pieces only, taken in arrow: a Python string per span of a 65k-span segment, made and
    # dropped segment after segment, grew the export's resident memory with the pool (fragmented allocator arenas)
    rows = pa.array(order[k_glob[first]]) if len(first) else pa.array([], pa.int64())
    return Pieces(
        doc_id=[str(x) for x in docs.column("doc_id").take(rows).to_pylist()],
        source=[str(x) for x in docs.column("source").take(rows).to_pylist()],
        span_ptr=ptr, seq=k_seq, start=k_start, length=k_len,
        complete=n_spans == occ_size[k_occ[first]] if len(first) else np.zeros(0, bool),
        ends_document=last_of_occ[keep][last] if len(first) else np.zeros(0, bool),
        occ_first=occ_first_span[k_occ[first]] if len(first) else np.zeros(0, np.int64),
        all_first=k_glob[first] if len(first) else np.zeros(0, np.int64),
        all_seq=seq, all_start=start, all_length=length,
        doc=dnum[keep][first] if len(first) else np.zeros(0, np.int64), all_doc=dnum,
    )


TEXT_MODES = ("original", "both")  # both: also the text the methods saw (pool_text)


def offset_blocks(original: str, edited: str) -> list[tuple[int, int, int]]:
    """Where the pieces of ``edited`` lie in ``original``: sorted blocks ``(o, e, n)`` with
    ``edited[e:e+n] == original[o:o+n]``. A prefilter that edits (C4 drops lines, strips the kept ones and joins them
    with newlines) leaves the kept lines in order, so each line of ``edited`` is found after the previous one; any
    other edit falls back to ``difflib``'s matching blocks."""
    blocks: list[tuple[int, int, int]] = []
    pos = e = 0
    for line in edited.split("\n"):
        if line:
            k = original.find(line, pos)
            if k < 0:
                import difflib

                sm = difflib.SequenceMatcher(None, original, edited, autojunk=False)
                return [(b.a, b.b, b.size) for b in sm.get_matching_blocks() if b.size]
            blocks.append((k, e, len(line)))
            pos = k + len(line)
        e += len(line) + 1
    return blocks


def map_offsets(blocks: list[tuple[int, int, int]], start: int, end: int, n_original: int) -> tuple[int, int]:
    """Map the span ``[start, end)`` of an edited text to the original through :func:`offset_blocks`: the start to
    where its first kept character is, the end to just after its last kept character (removed text between two kept
    pieces lies inside the span, so the original span holds the whole passage)."""
    if not blocks:
        return 0, 0
    o_start = next((o + max(0, start - e) for o, e, n in blocks if e + n > start), n_original)
    o_end = next((o + min(n, end - e) for o, e, n in reversed(blocks) if e < end), 0)
    return o_start, max(o_start, o_end)


class _Originals:
    """The original records of a pool's documents, read back in stream order (pieces come in pool order, which is
    the reader's order): ``get(doc)`` -> (original text, edited). ``doc_origins.parquet`` is read a row group at a
    time as the document numbers grow (memory flat in the pool's size, like the segmented ``docs.parquet``)."""

    def __init__(self, pool: Any):
        import pyarrow.parquet as pq


        self.batches = pq.ParquetFile(pool.path / ORIGINS_FILE).iter_batches(
            batch_size=SEGMENT_SPANS, columns=["doc", "index", "edited", "doc_id"])
        self.first = 0  # document number of the current batch's first row
        self.index = np.zeros(0, np.int64)
        self.edited = np.zeros(0, bool)
        self.ids: Any = None
        self.where = str(pool.path)
        self.docs = reread_documents(pool.manifest["config"], pool.manifest.get("extra", {}).get("inputs", []),
                                     self.where)
        self.last: Any = None

    def _row(self, doc: int) -> tuple[int, bool, str]:
        while doc >= self.first + len(self.index):
            b = next(self.batches, None)
            if b is None:
                raise LmselectError(f"{self.where}: document {doc} is not in its doc_origins.parquet; prepare the "
                                    "pool again")
            self.first += len(self.index)
            self.index = b.column("index").to_numpy().astype(np.int64)
            self.edited = b.column("edited").to_numpy(zero_copy_only=False).astype(bool)
            self.ids = b.column("doc_id")
        if doc < self.first:  # pieces come in stream order: a document number never goes back
            raise LmselectError(f"{self.where}: document {doc} asked for after {self.first}")  # pragma: no cover
        k = doc - self.first
        return int(self.index[k]), bool(self.edited[k]), str(self.ids[k].as_py())

    def get(self, doc: int) -> tuple[str, bool]:
        want, edited, doc_id = self._row(doc)
        while self.last is None or self.last.index < want:
            self.last = next(self.docs, None)
            if self.last is None:
                raise LmselectError(f"{self.where}: document {doc} ({doc_id}) is no longer in the pool's "
                                    "inputs; the original records cannot be read back")
        if self.last.index != want or self.last.doc_id != doc_id:
            raise LmselectError(f"{self.where}: the inputs hold {self.last.doc_id!r} where the pool has "
                                f"{doc_id!r}; the original records cannot be read back")
        return self.last.text, edited


def occurrence_segments(docs_parquet: Path, seq_len: int, batch_rows: int | None = None) -> Iterator[Any]:
    """A pool's ``docs.parquet`` as consecutive tables of about ``batch_rows`` spans, cut only where a document
    occurrence starts (the :func:`document_pieces` rule), so every occurrence lies whole in one table: the export
    holds one such table at a time, whatever the pool's size (plus one occurrence, however long)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    carry = None
    for b in pq.ParquetFile(docs_parquet).iter_batches(batch_size=batch_rows or SEGMENT_SPANS):
        t = pa.Table.from_batches([b]) if carry is None else pa.concat_tables([carry, pa.Table.from_batches([b])])
        n = t.num_rows
        if n < 2:
            carry = t
            continue
        if "doc" in t.column_names:  # pools that number their documents: one occurrence = one document number
            dnum = t.column("doc").to_numpy()
            cont = dnum[1:] == dnum[:-1]
        else:
            seq = t.column("seq_id").to_numpy()
            start = t.column("start").to_numpy()
            length = t.column("length").to_numpy()
            ids, src = t.column("doc_id"), t.column("source")
            cont = (pc.and_(pc.equal(ids.slice(1), ids.slice(0, n - 1)),
                            pc.equal(src.slice(1), src.slice(0, n - 1))).to_numpy(zero_copy_only=False)
                    & (seq[1:] == seq[:-1] + 1) & (start[1:] == 0) & (start[:-1] + length[:-1] == seq_len))
        starts = np.flatnonzero(~cont) + 1  # spans (index >= 1) that begin an occurrence
        if not len(starts):
            carry = t
            continue
        cut = int(starts[-1])
        yield t.slice(0, cut)
        carry = t.slice(cut)
    if carry is not None and carry.num_rows:
        yield carry


def selected_pieces(docs_parquet: Path, selected: np.ndarray, seq_len: int) -> Iterator[Pieces]:
    """:func:`document_pieces` segment by segment (:func:`occurrence_segments`); segments without a selected
    sequence are passed over without building any Python object."""
    selected = np.asarray(selected, dtype=np.int64)
    for seg in occurrence_segments(docs_parquet, seq_len):
        seq = seg.column("seq_id").to_numpy()
        if len(selected) and np.isin(seq, selected).any():
            yield document_pieces(seg, selected, seq_len)


def _piece_rows(pieces: Pieces, span: Callable[[int, int, int], np.ndarray], tokenizer: Any, eos_id: int,
                score_of: ScoreLookup | None, originals: _Originals | None = None,
                text: str = "original", seen: dict[str, int] | None = None) -> Iterator[list[dict[str, Any]]]:
    """Export rows of the pieces, ``_CHUNK`` at a time (texts decoded in one batch per chunk).

    Every row gets a unique ``id``: the document's own id when the row is the whole document, else
    ``"<doc_id>:<char_start>-<char_end>"`` (its character offsets in the document), with ``~<k>`` appended should
    that still repeat (the same document twice in the corpus). The pool text's offsets count the characters of the
    document's tokens before the piece, decoded sequence span by sequence span: exact, except that a span boundary
    inside a multi-byte character can shift them by a character (such a character decodes as U+FFFD).

    With ``originals`` (the pool records where its documents came from) ``text`` / ``char_start`` / ``char_end`` are
    the original record's text and offsets into it: the whole record for a complete piece; for a part, the pool
    offsets mapped through :func:`offset_blocks` when a prefilter edited the document (or when the tokenizer does not
    give the text back exactly). ``edited`` says whether a prefilter changed the document (null for a pool that does
    not record it). ``text="both"`` also writes the text the methods saw (the pool's tokens decoded) as ``pool_text``
    with ``pool_char_start`` / ``pool_char_end``, its offsets in the document as the pool holds it. ``span(seq,
    start, length)`` reads a span's tokens (``TokenPool.span``).
    """
    span_chars: dict[int, int] = {}  # global span index -> decoded length (each span decoded at most once)
    full_text: dict[int, str] = {}  # pool document -> its whole decoded text (edited parts only; the last one)

    def chars_before(p: int) -> tuple[int, int]:
        a, b = int(pieces.occ_first[p]), int(pieces.all_first[p])
        todo = [i for i in range(a, b) if i not in span_chars]
        if todo:
            ids = [span(pieces.all_seq[i], pieces.all_start[i], pieces.all_length[i]).astype(np.int64).tolist()
                   for i in todo]
            for i, t in zip(todo, tokenizer.batch_decode(ids, skip_special_tokens=False,
                                                         clean_up_tokenization_spaces=False)):
                span_chars[i] = len(t)
        return sum(span_chars[i] for i in range(a, b)), int(pieces.all_length[a:b].sum())

    def decoded_document(doc: int) -> str:
        if doc not in full_text:
            full_text.clear()
            # spans are in stream order, so a document's spans are one run of the sorted all_doc
            idx = range(int(np.searchsorted(pieces.all_doc, doc, "left")),
                        int(np.searchsorted(pieces.all_doc, doc, "right")))
            toks = np.concatenate([span(pieces.all_seq[i], pieces.all_start[i], pieces.all_length[i])
                                   for i in idx]).astype(np.int64)
            if len(toks) and toks[-1] == eos_id:
                toks = toks[:-1]
            full_text[doc] = tokenizer.decode(toks.tolist(), skip_special_tokens=False,
                                              clean_up_tokenization_spaces=False)
        return full_text[doc]

    seen = {} if seen is None else seen  # ids handed out so far (shared by the segments of one export)
    for c0 in range(0, len(pieces), _CHUNK):
        ids_batch, rows = [], []
        for p in range(c0, min(c0 + _CHUNK, len(pieces))):
            a, b = pieces.span_ptr[p], pieces.span_ptr[p + 1]
            toks = np.concatenate([span(s, st, ln) for s, st, ln in
                                   zip(pieces.seq[a:b], pieces.start[a:b], pieces.length[a:b])]).astype(np.int64)
            if pieces.ends_document[p] and len(toks) and toks[-1] == eos_id:
                toks = toks[:-1]  # prepare appends EOS to every document; it is not part of the text
            elif pieces.complete[p]:
                pieces.complete[p] = False  # the pool's last document, cut by the dropped tail: not all of it
            ids_batch.append(toks.tolist())
            seqs = [int(s) for s in pieces.seq[a:b]]
            c_start, t_start = (0, 0) if pieces.complete[p] else chars_before(p)
            row: dict[str, Any] = {"id": "", "doc_id": pieces.doc_id[p], "source": pieces.source[p],
                                   "complete": bool(pieces.complete[p]), "char_start": c_start, "char_end": c_start,
                                   "doc_token_start": t_start, "seq_ids": seqs,
                                   "token_start": int(pieces.start[a]), "n_tokens": int(len(toks)),
                                   "edited": None}
            if score_of is not None:
                sc = [score_of.get(s, float("nan")) for s in seqs]
                row["scores"] = sc
                row["score"] = float(np.mean(sc))
            rows.append(row)
        texts = tokenizer.batch_decode(ids_batch, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        for p, row, pool_text in zip(range(c0, c0 + len(rows)), rows, texts):
            pool_start, pool_end = row["char_start"], row["char_start"] + len(pool_text)
            if originals is not None:
                orig, edited = originals.get(int(pieces.doc[p]))
                row["edited"] = edited
                if row["complete"]:
                    o_start, o_end = 0, len(orig)
                elif orig[pool_start:pool_end] == pool_text:  # not edited, and the tokenizer gives it back
                    o_start, o_end = pool_start, pool_end
                else:
                    blocks = offset_blocks(orig, decoded_document(int(pieces.doc[p])))
                    o_start, o_end = map_offsets(blocks, pool_start, pool_end, len(orig))
                row["char_start"], row["char_end"] = o_start, o_end
                row["text"] = orig[o_start:o_end]
            else:
                row["char_start"], row["char_end"] = pool_start, pool_end
                row["text"] = pool_text  # a pool without doc_origins.parquet: only its decoded text exists
            if text == "both":
                row["pool_text"], row["pool_char_start"], row["pool_char_end"] = pool_text, pool_start, pool_end
            base = row["doc_id"] if row["complete"] else f"{row['doc_id']}:{row['char_start']}-{row['char_end']}"
            k = seen.get(base, 0)
            seen[base] = k + 1
            row["id"] = base if k == 0 else f"{base}~{k}"
        yield rows


def _write_documents(path: Path, fmt: str, chunks: Iterator[list[dict[str, Any]]], with_scores: bool,
                      text: str = "original") -> int:
    """Stream the rows to ``documents.jsonl.gz`` (no name/time in the gzip header: same input, same bytes) or
    ``documents.parquet``; returns the number of rows."""
    n = 0
    if fmt == "jsonl":
        with open(path, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz:
            for rows in chunks:
                for r in rows:
                    if with_scores and not np.isfinite(r["score"]):  # JSON has no NaN
                        r["score"], r["scores"] = None, [s if np.isfinite(s) else None for s in r["scores"]]
                    gz.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
                n += len(rows)
        return n
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = [("id", pa.string()), ("doc_id", pa.string()), ("source", pa.string()), ("complete", pa.bool_()),
              ("char_start", pa.int64()), ("char_end", pa.int64()), ("doc_token_start", pa.int64()),
              ("seq_ids", pa.list_(pa.int64())), ("token_start", pa.int64()), ("n_tokens", pa.int64()),
              ("edited", pa.bool_())]
    if with_scores:
        fields += [("scores", pa.list_(pa.float32())), ("score", pa.float32())]
    fields += [("text", pa.string())]
    if text == "both":
        fields += [("pool_text", pa.string()), ("pool_char_start", pa.int64()), ("pool_char_end", pa.int64())]
    schema = pa.schema(fields)
    with pq.ParquetWriter(path, schema) as w:
        for rows in chunks:
            w.write_table(pa.Table.from_pylist(rows, schema=schema))
            n += len(rows)
    return n


# ----------------------------------------------------------------------------------------------------------------
# one selection


def _selection_pool(sel_dir: Path, man: dict[str, Any], pool_arg: str | Path | None) -> Any:
    """The pool a selection's sequence ids refer to: ``--pool``, else the one its manifest names."""
    pool_parents = [p for p in man.get("parents", []) if p.get("kind") == "pool"]
    candidates = [pool_arg] if pool_arg is not None else [man.get("extra", {}).get("pool")] + [
        p.get("path") for p in pool_parents]
    path = next((Path(c) for c in candidates if c and is_complete(c, "pool")), None)
    if path is None:
        where = f"--pool {pool_arg}" if pool_arg is not None else "the pool its manifest names"
        raise LmselectError(f"{sel_dir}: {where} is not a complete pool; pass --pool POOL")
    pool = TokenPool(path)
    if pool_parents and pool_parents[0].get("uuid") != pool.manifest.get("uuid"):
        raise LmselectError(f"{sel_dir}: selected from pool {pool_parents[0].get('path')} "
                            f"(uuid {pool_parents[0].get('uuid')}), not {path}")
    return pool


class ScoreLookup:
    """seq_id -> score of a scores sidecar, as two sorted arrays: 12 bytes per scored sequence where a dict of
    Python numbers takes ~100 (a sidecar may score the whole pool); of a repeated id the last score counts."""

    def __init__(self, ids: np.ndarray, scores: np.ndarray):
        order = np.argsort(np.asarray(ids, dtype=np.int64), kind="stable")
        self.ids = np.asarray(ids, dtype=np.int64)[order]
        self.scores = np.asarray(scores, dtype=np.float64)[order]

    def get(self, seq_id: int, default: float = float("nan")) -> float:
        i = int(np.searchsorted(self.ids, seq_id, side="right")) - 1
        return float(self.scores[i]) if i >= 0 and self.ids[i] == seq_id else default


def _selection_scores(man: dict[str, Any]) -> ScoreLookup | None:
    """seq_id -> score from the scores sidecar the selection was made from (None when it has none)."""
    from lmselect.score import read_scores  # torch (the score package): export runs without it

    refs = [p for p in man.get("parents", []) if p.get("kind") == "scores"]
    if not refs or not is_complete(refs[0]["path"], "scores"):
        return None
    ids, scores = read_scores(refs[0]["path"])
    return ScoreLookup(ids, scores)


def _check_text(text: str) -> dict[str, str]:
    if text not in TEXT_MODES:
        raise LmselectError(f"--text must be one of {', '.join(TEXT_MODES)}; got {text!r}")
    return {} if text == "original" else {"text": text}


def export_selection(sel_dir: str | Path, out_dir: str | Path, *, fmt: str = "jsonl",
                     pool: str | Path | None = None, overwrite: bool = False, text: str = "original") -> Path:
    """Export one selection artifact to ``out_dir`` (see the module docstring); returns ``out_dir``."""
    sel_dir, out = Path(sel_dir), Path(out_dir)
    if fmt not in FORMATS:
        raise LmselectError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    config = {"selection": str(sel_dir), "format": fmt, **_check_text(text)}
    _check_out(out, config, overwrite)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        info = _export_into(sel_dir, tmp, fmt, pool, text)
        write_manifest(tmp, Manifest(kind="export", config=config,
                                     parents=info.pop("parents"), counts=info.pop("counts"), extra=info))
    return out


def _export_into(sel_dir: Path, tmp: Path, fmt: str, pool_arg: str | Path | None,
                 text: str = "original") -> dict[str, Any]:
    """Write the files of one export into ``tmp``; returns its manifest parts (parents, counts, extra)."""
    man = read_manifest(sel_dir, kind="selection")
    if man.get("extra", {}).get("unit") == "documents":
        raise LmselectError(f"{sel_dir}: a selection of .jsonl documents; its records are already in "
                            "selected.jsonl.gz, there are no pool sequences to export")
    selected = read_selection(sel_dir)
    pool = _selection_pool(sel_dir, man, pool_arg)
    if len(selected) and (selected[0] < 0 or selected[-1] >= len(pool)):
        raise LmselectError(f"{sel_dir}: seq_id {int(selected[-1])} is not in pool {pool.path}")
    score_of = _selection_scores(man)

    # (b) flat tokens, row after row, copied in chunks so that memory stays bounded
    dtype = token_dtype(pool.vocab_size)
    with open(tmp / TOKENS_FILE, "wb") as f:
        for c0 in range(0, len(selected), 8192):
            f.write(np.ascontiguousarray(pool.rows(selected[c0 : c0 + 8192]), dtype=dtype.newbyteorder("<")).tobytes())
    atomic_save_npy(tmp / SEQ_IDS_FILE, selected)
    tokens_meta = {
        "file": TOKENS_FILE, "dtype": dtype.name, "byte_order": "little", "seq_len": pool.seq_len,
        "n_sequences": int(len(selected)), "n_tokens": int(len(selected) * pool.seq_len),
        "vocab_size": pool.vocab_size, "eos_id": pool.eos_id, "tokenizer": "tokenizer",
        "tokenizer_fingerprint": pool.tokenizer_fingerprint, "seq_ids": SEQ_IDS_FILE,
        "selection": str(sel_dir), "selection_uuid": man.get("uuid"), "pool": str(pool.path),
        "pool_uuid": pool.manifest.get("uuid"),
    }
    atomic_write_json(tmp / TOKENS_META, tokens_meta)
    shutil.copytree(pool.tokenizer_dir, tmp / "tokenizer")

    # (a) documents with their text
    # docs.parquet is read one segment at a time (memory flat in the pool's size); only segments that hold a
    # selected sequence become Python objects; the original records are read back in the same (stream) order
    import pyarrow.parquet as pq


    originals = None
    if (pool.path / ORIGINS_FILE).is_file() and "doc" in pq.read_schema(pool.path / "docs.parquet").names:
        originals = _Originals(pool)
    else:
        log.warning("%s: prepared before pools recorded where their documents come from; the exported text is the "
                    "pool's decoded text (edited by the prefilter, if it ran), not the original records; prepare the "
                    "pool again for the original text", pool.path)
    seen: dict[str, int] = {}
    complete = [0]

    def rows() -> Iterator[list[dict[str, Any]]]:
        tok = pool.load_tokenizer()
        for pieces in selected_pieces(pool.path / "docs.parquet", selected, pool.seq_len):
            yield from _piece_rows(pieces, pool.span, tok, pool.eos_id, score_of, originals, text, seen)
            complete[0] += int(pieces.complete.sum())  # after the rows: a piece cut by the dropped tail is not

    n_rows = _write_documents(tmp / DOCUMENT_FILES[fmt], fmt, rows(), score_of is not None, text)
    counts = {"sequences": int(len(selected)), "tokens": tokens_meta["n_tokens"], "documents": n_rows,
              "complete_documents": complete[0]}
    log.info("export: %s (%d sequences, %d document pieces)", sel_dir, len(selected), n_rows)
    return {"parents": [parent_ref(sel_dir), parent_ref(pool.path)], "counts": counts,
            "format": fmt, "documents": DOCUMENT_FILES[fmt], "tokens": TOKENS_FILE, "has_scores": score_of is not None,
            "text": "original" if originals is not None else "pool", "pool_text": text == "both",
            "selection": str(sel_dir), "method": man.get("extra", {}).get("method")}


def _check_out(out: Path, config: dict[str, Any], overwrite: bool) -> None:
    """Refuse to replace a directory that is not an export (it may be someone's data), or, without ``overwrite``,
    an export of another selection, run, round or format (a rerun of the same export replaces it). Leftover staging
    directories of killed exports into ``out`` are removed first."""
    remove_stale_tmp(out, log)
    check_replaceable(out, "export")
    if is_complete(out, "export") and not overwrite:
        have = read_manifest(out, kind="export").get("config", {})
        if {k: have.get(k) for k in config} != config:
            def show(k: str, v: Any) -> str:
                return f"{k} {'final' if k == 'round' and v is None else v}"  # --round unset = each final round

            what = ", ".join(show(k, have.get(k)) for k in config if have.get(k) != config[k])
            raise LmselectError(f"{out}: holds an export of another {what.split(' ')[0]} ({what}); pass --overwrite "
                                "to replace it or choose another --out")


# ----------------------------------------------------------------------------------------------------------------
# a run directory


def run_selections(run_dir: str | Path, round_: int | None = None) -> list[tuple[str, int, int, Path]]:
    """(method, seed, round, selection dir) of each method/seed of a run: its highest round with a complete
    selection, or round ``round_``. Sorted by method, then seed."""
    run = Path(run_dir)
    layout = RunLayout(run)
    found: dict[tuple[str, int], dict[int, Path]] = {}
    for rp in layout.round_paths():
        sel = layout.stage(rp.method, rp.seed, rp.round, "selection")
        if is_complete(sel, "selection"):
            found.setdefault((rp.method, rp.seed), {})[rp.round] = sel
    if not found:
        raise LmselectError(f"{run}: neither a selection nor a run directory with a complete selection")
    out = []
    for (method, seed), rounds in sorted(found.items()):
        if round_ is None:
            r = max(rounds)
        elif round_ in rounds:
            r = round_
        else:
            raise LmselectError(f"{run}: {layout.key(RunPath(method, seed))} has no complete selection for --round {round_} "
                                f"(rounds {', '.join(map(str, sorted(rounds)))})")
        out.append((method, seed, r, rounds[r]))
    return out


def export(source: str | Path, out_dir: str | Path, *, fmt: str = "jsonl", round_: int | None = None,
           pool: str | Path | None = None, overwrite: bool = False, text: str = "original") -> Path:
    """Export a selection directory, or every method/seed's final (or ``round_``) selection of a run directory."""
    src, out = Path(source), Path(out_dir)
    if not src.is_dir():
        raise LmselectError(f"{src}: not found (expected a selection or a run directory)")
    if is_complete(src, "selection"):
        if round_ is not None:
            raise LmselectError(f"{src}: --round applies to a run directory, not to one selection")
        return export_selection(src, out, fmt=fmt, pool=pool, overwrite=overwrite, text=text)
    if fmt not in FORMATS:
        raise LmselectError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    chosen = run_selections(src, round_)
    _check_out(out, {"run": str(src), "format": fmt, "round": round_, **_check_text(text)}, overwrite)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        entries, parents = [], []
        for method, seed, r, sel in chosen:
            sub = RunLayout(tmp).round(method, seed, r)
            sub.mkdir(parents=True)
            info = _export_into(sel, sub, fmt, pool, text)
            write_manifest(sub, Manifest(kind="export", config={"selection": str(sel), "format": fmt, **_check_text(text)},
                                         parents=info.pop("parents"), counts=info.pop("counts"), extra=info))
            entries.append({"method": method, "seed": seed, "round": r, "path": str(sub.relative_to(tmp)),
                            **read_manifest(sub)["counts"]})
            parents.append(parent_ref(sel))
        write_manifest(tmp, Manifest(kind="export", config={"run": str(src), "format": fmt, "round": round_},
                                     parents=parents, counts={"exports": len(entries)},
                                     extra={"run": str(src), "exports": entries, "format": fmt}))
    return out


# ----------------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``lmselect export`` flags."""
    parser.add_argument("source", help="a selection directory, or a run directory (every method/seed's final round)")
    parser.add_argument("--out", required=True, help="output export directory")
    parser.add_argument("--format", default="jsonl", choices=FORMATS,
                        help="documents as jsonl (documents.jsonl.gz) or parquet (documents.parquet)")
    parser.add_argument("--round", type=int, help="run directory: export this round instead of the final one")
    parser.add_argument("--pool", help="pool the selection refers to (default: the one its manifest names)")
    parser.add_argument("--text", default="original", choices=TEXT_MODES,
                        help="original (default): each row's text is the original record's (read back from the "
                        "pool's inputs) with offsets into it; both: also pool_text, the text the methods saw "
                        "(edited by the prefilter where the row's 'edited' is true)")
    parser.add_argument("--dropped", action="store_true",
                        help="SOURCE is a pool: write the documents its prefilter removed (dropped.jsonl.gz)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing export of another selection, run, round or format")


def run(args: argparse.Namespace) -> int:
    """Run ``lmselect export`` and print what was written."""
    if getattr(args, "overrides", None):
        raise LmselectError(f"export takes no --key=value overrides (got {args.overrides[0]})")
    if getattr(args, "dropped", False):
        out, n = export_dropped(args.source, args.out)
        print(f"exported {n} documents the prefilter removed -> {out / 'dropped.jsonl.gz'}")
        return 0
    out = export(args.source, args.out, fmt=args.format, round_=args.round, pool=args.pool,
                 overwrite=args.overwrite, text=args.text)
    m = read_manifest(out, kind="export")
    if "exports" in m["extra"]:
        for e in m["extra"]["exports"]:
            print(f"{e['method']} seed{e['seed']} round{e['round']}: {e['documents']} document pieces, "
                  f"{e['sequences']} sequences -> {out / e['path']}")
    else:
        c = m["counts"]
        print(f"exported {c['documents']} document pieces ({c['complete_documents']} complete) and "
              f"{c['sequences']} sequences ({c['tokens']} tokens) -> {out}")
    return 0
