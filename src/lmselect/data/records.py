"""Corpus records out: dolma attribute files of scored .jsonl files, and copies of selected records.

* :func:`write_attributes` writes one dolma attribute file: one JSON line per line of the input file, in its order,
  ``{"id", "source", "attributes": {"<name>__score": [[0, len(text), score]], "<name>__window_scores": [[char_start,
  char_end, score], ...]}}``, compressed as the input is (dolma picks the decompressor by extension). ``score
  --jsonl`` (every scorer) writes through it, at :func:`lmselect.score.windows.attribute_path` in its sidecar.
* :func:`write_selected_records` / :func:`write_selected_files` copy the chosen lines of the scored files, byte for
  byte and in file order, into one gzip file (a document selection's ``selected.jsonl.gz``).

Both write deterministic bytes: the gzip header has no name and no time, so the same input gives the same file.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from lmselect.artifacts import LmselectError, atomic_path
from lmselect.data.readers import open_binary

DEFAULT_ATTRIBUTE = "lmselect"  # dolma attribute name prefix: "<name>__score", "<name>__window_scores"


def check_attribute_name(name: str) -> str:
    """A dolma attribute name: letters, digits, ``_ - .``, no ``__`` (dolma joins ``name__key`` with it)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", str(name)) or "__" in str(name):
        raise LmselectError(f"--attribute-name must be letters, digits, _ - . without '__'; got {name!r}")
    return str(name)


@contextlib.contextmanager
def open_for_write(path: Path, name: str) -> Iterator[Any]:
    """A binary writer to ``path`` compressed as the extension of ``name`` says (dolma picks the decompressor by
    extension): ``.gz`` (no name or time in the header: a rerun writes identical bytes), ``.zst``, else plain."""
    with open(path, "wb") as raw:
        if name.endswith(".gz"):
            with gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz:
                yield gz
        elif name.endswith(".zst"):
            import zstandard  # optional dependency: only .zst inputs need it

            with zstandard.ZstdCompressor().stream_writer(raw, closefd=False) as zw:
                yield zw
        else:
            yield raw


def attribute_lines(documents: Any, windows: Any, name: str, ids: list[Any] | None = None) -> Iterator[bytes]:
    """The dolma attribute lines of ``documents`` (one per row, in order), as UTF-8 bytes with their newline::

        {"id": ..., "source": ..., "attributes": {"<name>__score": [[0, len(text), mean]],
                                                  "<name>__window_scores": [[char_start, char_end, score], ...]}}

    ``documents`` is a pyarrow Table of ``documents.parquet``'s rows (``doc_index``, ``source``, ``n_chars``,
    ``score``, and ``doc_id`` unless ``ids`` is given), ``windows`` one of their window rows (``doc_index``,
    ``char_start``, ``char_end``, ``score``). ``ids``: the records' ids exactly as in the input file (default:
    ``doc_id``); dolma compares them with the document line's ``id`` as JSON values. Spans are character offsets
    into the record's ``text``; a document without a finite score gets ``[]`` (JSON has no NaN)."""
    by_doc: dict[int, list[list[float]]] = {}
    idx = windows.column("doc_index").to_numpy()
    order = np.lexsort((windows.column("char_start").to_numpy(), idx))
    cs, ce = windows.column("char_start").to_numpy(), windows.column("char_end").to_numpy()
    sc = windows.column("score").to_numpy()
    for r in order:
        if np.isfinite(sc[r]):
            by_doc.setdefault(int(idx[r]), []).append([int(cs[r]), int(ce[r]), float(sc[r])])
    rows = documents.to_pylist()
    ids = ids if ids is not None else [d["doc_id"] for d in rows]
    for d, rid in zip(rows, ids):
        score = d["score"]
        doc_span = [[0, int(d["n_chars"]), float(score)]] if score is not None and np.isfinite(score) else []
        rec = {"id": rid, "source": d["source"],
               "attributes": {f"{name}__score": doc_span,
                              f"{name}__window_scores": by_doc.get(int(d["doc_index"]), [])}}
        yield (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")


def write_attributes(path: Path, documents: Any, windows: Any, name: str, ids: list[Any] | None = None) -> None:
    """Write a dolma attribute file at ``path``: :func:`attribute_lines` of ``documents``, compressed as the name's
    extension says (:func:`open_for_write`), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open_for_write(tmp, path.name) as out:
        for line in attribute_lines(documents, windows, name, ids):
            out.write(line)


def write_selected_records(jsonl: Path, lines: np.ndarray, out: Path | Any) -> int:
    """Copy the lines numbered ``lines`` (1-based) of ``jsonl`` (.jsonl, .gz or .zst) to ``out`` (a gzip file path,
    or an open binary writer), unchanged and in file order. The gzip header has no name or time, so the same
    selection gives the same bytes."""
    if isinstance(out, (str, Path)):
        with open(out, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz:
            return write_selected_records(jsonl, lines, gz)
    want = set(int(x) for x in lines)
    n = 0
    try:
        with open_binary(jsonl) as f:
            for lineno, line in enumerate(f, 1):
                if lineno in want:
                    out.write(line if line.endswith(b"\n") else line + b"\n")
                    n += 1
    except (OSError, EOFError) as e:
        raise LmselectError(f"{jsonl}: cannot read ({str(e).splitlines()[0][:200]})") from None
    if n != len(want):
        raise LmselectError(f"{jsonl}: has fewer lines than when it was scored; rescore it")
    return n


def write_selected_files(files: list[tuple[Path, str]], docs: Any, sel: np.ndarray, out: Path) -> int:
    """The selected records (``sel``: row numbers of ``docs``, a ``documents.parquet`` table with ``line`` and
    ``file``) of every scored file (path, relative name), file after file, into one gzip file ``out``."""
    lines = docs.column("line").to_numpy().astype(np.int64)
    names = np.asarray(docs.column("file").to_pylist() if "file" in docs.column_names else [""] * len(lines),
                       dtype=object)
    chosen = np.zeros(len(lines), dtype=bool)
    chosen[sel] = True
    n = 0
    with open(out, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz:
        for path, rel in files:
            mine = chosen & ((names == rel) if len(files) > 1 else True)
            n += write_selected_records(path, lines[mine], gz)
    return n
