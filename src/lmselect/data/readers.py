"""Corpus readers: turn files, folders and Hugging Face datasets into a stream of documents.

Accepted inputs (each may be a path or a shell glob; several may be given):

* ``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst`` (also ``.json``/``.ndjson`` with the same compressions): one JSON object
  per line.
* ``.parquet``: one record per row.
* ``.txt`` file, or a **folder of ``.txt`` files** (searched recursively): each file is one document.
* a folder written by ``datasets.Dataset.save_to_disk`` (detected by its ``dataset_info.json`` / ``state.json`` /
  ``dataset_dict.json``); append ``#split`` to pick a split of a ``DatasetDict`` (default ``train``).
* ``hf:OWNER/NAME[#split]``: a dataset on the Hugging Face Hub, streamed with ``datasets.load_dataset``. Needs
  network access (or a warm cache); offline it fails with one clear line.

Each record yields a :class:`Document` with the text (field ``text_field``), a document id (field ``id_field`` when
present, else ``"<file name>:<line>"``) and a source label (field ``source_field`` when present, else the file stem:
``wiki.jsonl.gz`` -> ``wiki``; for a text folder or dataset directory, the folder name).

Malformed records -- a line that is not valid JSON or not UTF-8, a record that is not an object, a record without the text field
or whose text is not a string, a text file that is not UTF-8 -- are **skipped and counted** in :class:`ReadStats`
(reason, file, first examples) by default; with ``strict=True`` the first one raises
:class:`~lmselect.artifacts.LmselectError` naming the file and line. Records whose text is empty or whitespace only are
not malformed: they are skipped and counted as ``empty`` in both modes. Problems with a whole input (missing file,
unknown format, a corrupt gzip stream, a Parquet file or dataset without the text column, an unreachable hub
dataset) are always fatal.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from lmselect.artifacts import LmselectError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSIONS = ("", ".gz", ".zst")
HF_PREFIX = "hf:"
_HF_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
MAX_EXAMPLES = 20  # how many skipped-record messages are kept for the manifest
MALFORMED_WARN_SHARE = 0.05  # warn when more than this share of an input's records is malformed


@dataclass
class Document:
    text: str
    doc_id: str
    source: str


@dataclass
class InputSpec:
    """One resolved input: what it is and where it is."""

    path: str  # file / folder path, or the hub id for kind == "hub"
    kind: str  # "jsonl", "parquet", "text", "hf_disk", "hub"
    split: str | None = None  # for hf_disk / hub
    # a contiguous row range of a datasets folder (prepare's tasks split one dataset over several tasks); records
    # keep their row numbers in the whole dataset, so ids and messages do not depend on how the work is split
    start: int = 0
    stop: int | None = None

    @property
    def name(self) -> str:
        return Path(self.path).name if self.kind != "hub" else self.path

    @property
    def default_source(self) -> str:
        """Source label when records carry none: the file stem without format/compression suffixes."""
        if self.kind == "hub":
            return self.path.rstrip("/").split("/")[-1]
        name = Path(self.path).name
        for comp in COMPRESSIONS[1:]:
            if name.endswith(comp):
                name = name[: -len(comp)]
        for suf in JSONL_SUFFIXES + (".parquet", ".txt"):
            if name.endswith(suf):
                name = name[: -len(suf)]
                break
        return name or "corpus"


@dataclass
class ReadStats:
    """Counts of what the readers saw; stored in the pool manifest."""

    records: int = 0  # records looked at (lines, rows, files)
    documents: int = 0  # documents yielded
    empty: int = 0  # records with empty / whitespace-only text
    skipped: Counter = field(default_factory=Counter)  # reason -> count (malformed records)
    skipped_by_file: Counter = field(default_factory=Counter)  # file -> count
    examples: list[str] = field(default_factory=list)  # first MAX_EXAMPLES messages
    docs_by_input: Counter = field(default_factory=Counter)  # input path -> documents yielded
    records_by_file: Counter = field(default_factory=Counter)  # input path -> records looked at

    def count_record(self, path: str) -> None:
        self.records += 1
        self.records_by_file[path] += 1

    def count_malformed(self, path: str, reason: str, message: str, strict: bool) -> None:
        """Count one malformed record of ``path`` (reason, file, first examples), or with ``strict`` refuse it in
        one line; the same rule for prepare's reader and ``score --jsonl``'s line-aligned one."""
        if strict:
            raise LmselectError(f"{message} (--strict makes malformed records fatal)") from None
        self.skipped[reason] += 1
        self.skipped_by_file[path] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(message)

    def malformed_warnings(self, threshold: float = MALFORMED_WARN_SHARE) -> list[str]:
        """One line per input where more than ``threshold`` of the records were malformed (skipped). A count in the
        manifest is easy to miss; a third of a file gone usually means a wrong ``--text-field`` or a broken export."""
        out = []
        for path, bad in sorted(self.skipped_by_file.items()):
            seen = self.records_by_file.get(path, 0)
            if seen and bad / seen > threshold:
                out.append(f"{path}: {bad} of {seen} records ({100 * bad / seen:.0f} %) are malformed and were skipped "
                           f"(first: {next((e for e in self.examples if e.startswith(str(path))), '?')})")
        return out

    def warn_malformed(self, logger: Any, threshold: float = MALFORMED_WARN_SHARE) -> None:
        """Log :meth:`malformed_warnings` as warnings (they also go to stderr with the default logging setup)."""
        for line in self.malformed_warnings(threshold):
            logger.warning("%s", line)

    def state(self) -> dict[str, Any]:
        """Everything counted, as JSON (a prepare task's part); :meth:`merged` adds such states up."""
        return {"records": self.records, "documents": self.documents, "empty": self.empty,
                "skipped": dict(self.skipped), "skipped_by_file": dict(self.skipped_by_file),
                "examples": list(self.examples), "docs_by_input": dict(self.docs_by_input),
                "records_by_file": dict(self.records_by_file)}

    @classmethod
    def merged(cls, states: Sequence[dict[str, Any]]) -> ReadStats:
        """The counts of reading the parts one after the other, in order (the first MAX_EXAMPLES messages of the
        concatenated stream: each part keeps its own first ones)."""
        out = cls()
        for s in states:
            out.records += s["records"]
            out.documents += s["documents"]
            out.empty += s["empty"]
            for key in ("skipped", "skipped_by_file", "docs_by_input", "records_by_file"):
                getattr(out, key).update(s[key])
            out.examples.extend(s["examples"][: MAX_EXAMPLES - len(out.examples)])
        return out

    @property
    def n_skipped(self) -> int:
        return int(sum(self.skipped.values()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "documents": self.documents,
            "empty": self.empty,
            "skipped": self.n_skipped,
            "skipped_by_reason": dict(sorted(self.skipped.items())),
            "skipped_by_file": dict(sorted(self.skipped_by_file.items())),
            "skipped_examples": list(self.examples),
        }


class _Malformed(Exception):
    """Internal: one bad record (reason key, message); handled by :func:`iter_documents`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


# ----------------------------------------------------------------------------------------------------------------
# resolving inputs


def _strip_split(raw: str) -> tuple[str, str | None]:
    if "#" in raw:
        base, split = raw.rsplit("#", 1)
        return base, split or None
    return raw, None


def _file_kind(p: Path) -> str | None:
    name = p.name.lower()
    for comp in COMPRESSIONS:
        for suf in JSONL_SUFFIXES:
            if name.endswith(suf + comp):
                return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".txt"):
        return "text"
    return None


def _dir_kind(p: Path) -> str:
    if any((p / m).is_file() for m in _HF_DISK_MARKERS):
        return "hf_disk"
    return "text"


def resolve_inputs(inputs: Sequence[str]) -> list[InputSpec]:
    """Expand globs and classify every input; a missing path or unknown format raises LmselectError."""
    if isinstance(inputs, (str, Path)):
        inputs = [str(inputs)]
    if not inputs:
        raise LmselectError("prepare: no inputs given (pass one or more corpus files, folders or globs)")
    specs: list[InputSpec] = []
    for raw in inputs:
        raw = str(raw)
        if raw.startswith(HF_PREFIX):
            hub_id, split = _strip_split(raw[len(HF_PREFIX) :])
            if not hub_id:
                raise LmselectError(f"{raw}: empty Hugging Face dataset id (use hf:OWNER/NAME[#split])")
            specs.append(InputSpec(hub_id, "hub", split or "train"))
            continue
        base, split = _strip_split(raw)
        if glob.has_magic(base):
            matches = sorted(glob.glob(base, recursive=True))
            if not matches:
                raise LmselectError(f"{raw}: no file matches this pattern")
            paths = [Path(m) for m in matches]
        else:
            paths = [Path(base)]
        for p in paths:
            if not p.exists():
                raise LmselectError(f"{p}: input not found")
            if p.is_dir():
                kind = _dir_kind(p)
                specs.append(InputSpec(str(p), kind, split if kind == "hf_disk" else None))
                continue
            kind = _file_kind(p)
            if kind is None:
                raise LmselectError(
                    f"{p}: unsupported input format (expected .jsonl[.gz|.zst], .parquet, .txt, a folder of .txt "
                    "files, a datasets.save_to_disk folder or hf:OWNER/NAME)"
                )
            specs.append(InputSpec(str(p), kind))
    return specs


def _text_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.txt") if p.is_file())


def input_fingerprint(spec: InputSpec) -> dict[str, Any]:
    """Size and sha256 of an input (for folders: over every file, in sorted order) for the manifest."""
    if spec.kind == "hub":
        return {"path": f"{HF_PREFIX}{spec.path}", "kind": spec.kind, "split": spec.split, "bytes": None, "sha256": None}
    p = Path(spec.path)
    files = [p] if p.is_file() else (_text_files(p) if spec.kind == "text" else sorted(x for x in p.rglob("*") if x.is_file()))
    h = hashlib.sha256()
    size = 0
    for f in files:
        if p.is_dir():
            # the relative name is part of the hash so renaming a file inside the folder changes it
            h.update(str(f.relative_to(p)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
                size += len(chunk)
    out: dict[str, Any] = {"path": str(p), "kind": spec.kind, "bytes": size, "sha256": h.hexdigest()}
    if p.is_dir():
        out["files"] = len(files)
    if spec.split:
        out["split"] = spec.split
    return out


# ----------------------------------------------------------------------------------------------------------------
# per-format record iterators: yield (location, record-or-text); location is "file:line" / "file: record N"


def _open_binary(path: Path) -> io.BufferedIOBase:
    """A binary, line-iterable reader that decompresses .gz / .zst transparently."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
        return io.BufferedReader(reader, buffer_size=1 << 20)
    return open(path, "rb", buffering=1 << 20)


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    # Lines are split as bytes and decoded one by one, so a single non-UTF-8 line is one malformed record rather
    # than the end of the file. A corrupt compressed stream cannot be resynchronised: that is fatal.
    lineno = 0
    try:
        with _open_binary(path) as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield where, _Malformed("bad_utf8", f"{where}: not valid UTF-8 (byte {e.start})")
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, _Malformed("bad_json", f"{where}: invalid JSON ({e.msg} at column {e.colno})")
                    continue
                yield where, rec
    except (OSError, EOFError) as e:  # truncated / corrupt gzip stream (gzip.BadGzipFile is an OSError)
        raise LmselectError(f"{path}:{lineno + 1}: cannot read compressed data ({e})") from None
    except Exception as e:
        if type(e).__name__ == "ZstdError":  # zstandard's error type lives in a C extension module
            raise LmselectError(f"{path}:{lineno + 1}: cannot read compressed data ({e})") from None
        raise


def _iter_parquet(path: Path, columns: Sequence[str], text_field: str) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise LmselectError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0][:200]})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise LmselectError(f"{path}: no '{text_field}' column (columns: {', '.join(names)})")
    cols = [c for c in columns if c in names]
    row = 0
    for batch in pf.iter_batches(columns=cols, batch_size=4096):
        for rec in batch.to_pylist():
            row += 1
            yield f"{path}: record {row}", rec


def _iter_text_files(spec: InputSpec) -> Iterator[tuple[str, Any]]:
    p = Path(spec.path)
    files = [p] if p.is_file() else _text_files(p)
    for f in files:
        rel = f.name if p.is_file() else str(f.relative_to(p))
        try:
            text = f.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            yield str(f), _Malformed("bad_utf8", f"{f}: not valid UTF-8 (byte {e.start})")
            continue
        # a text file's id is its path relative to the folder, its source the folder name
        yield str(f), {"__text__": text, "__id__": rel}


def _iter_hf_dataset(ds: Any, label: str, text_field: str, columns: Sequence[str], start: int = 0,
                     stop: int | None = None) -> Iterator[tuple[str, Any]]:
    names = list(ds.column_names)
    if text_field not in names:
        raise LmselectError(f"{label}: no '{text_field}' column (columns: {', '.join(names)})")
    cols = [c for c in columns if c in names]
    ds = ds.select_columns(cols)
    row = start
    if start or stop is not None:
        ds = ds.select(range(start, len(ds) if stop is None else min(stop, len(ds))))  # contiguous: no index file
    for batch in ds.iter(batch_size=1024):
        n = len(batch[text_field])
        for i in range(n):
            row += 1
            yield f"{label}: record {row}", {c: batch[c][i] for c in cols}


def _load_hf_disk(spec: InputSpec) -> Any:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise LmselectError(f"{spec.path}: reading a saved dataset needs the 'datasets' package") from None
    try:
        ds = datasets.load_from_disk(spec.path)
    except Exception as e:
        raise LmselectError(f"{spec.path}: not a loadable datasets.save_to_disk folder ({str(e).splitlines()[0][:200]})") from None
    if isinstance(ds, datasets.DatasetDict):
        split = spec.split or ("train" if "train" in ds else (next(iter(ds)) if len(ds) == 1 else None))
        if split is None or split not in ds:
            raise LmselectError(
                f"{spec.path}: choose a split with '{spec.path}#SPLIT' (splits: {', '.join(ds.keys())})"
            )
        ds = ds[split]
    return ds


def dataset_rows(spec: InputSpec) -> int:
    """Rows of a ``datasets.save_to_disk`` input (its split), read from the folder's metadata without the data."""
    return len(_load_hf_disk(spec))


def _load_hub(spec: InputSpec) -> Any:
    import datasets

    try:
        return datasets.load_dataset(spec.path, split=spec.split, streaming=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (offline mode is on: download it first, or save it with save_to_disk and pass the folder)" if offline else ""
        raise LmselectError(f"{HF_PREFIX}{spec.path}: cannot load Hugging Face dataset{hint}: {first}") from None


def _iter_hub(ds: Any, label: str, text_field: str, columns: Sequence[str]) -> Iterator[tuple[str, Any]]:
    row = 0
    for rec in ds:
        row += 1
        if row == 1 and text_field not in rec:
            raise LmselectError(f"{label}: no '{text_field}' column (columns: {', '.join(rec)})")
        yield f"{label}: record {row}", {c: rec.get(c) for c in columns}


# ----------------------------------------------------------------------------------------------------------------
# documents


def _records(spec: InputSpec, text_field: str, id_field: str, source_field: str) -> Iterator[tuple[str, Any]]:
    columns = [c for c in dict.fromkeys([text_field, id_field, source_field]) if c]
    if spec.kind == "jsonl":
        return _iter_jsonl(Path(spec.path))
    if spec.kind == "parquet":
        return _iter_parquet(Path(spec.path), columns, text_field)
    if spec.kind == "text":
        return _iter_text_files(spec)
    if spec.kind == "hf_disk":
        return _iter_hf_dataset(_load_hf_disk(spec), spec.path, text_field, columns, spec.start, spec.stop)
    if spec.kind == "hub":
        return _iter_hub(_load_hub(spec), f"{HF_PREFIX}{spec.path}", text_field, columns)
    raise LmselectError(f"{spec.path}: unknown input kind {spec.kind!r}")  # pragma: no cover


def _to_document(where: str, rec: Any, spec: InputSpec, text_field: str, id_field: str, source_field: str) -> Document:
    if isinstance(rec, _Malformed):
        raise rec
    if "__text__" in rec and spec.kind == "text":  # text files carry their own id
        return Document(rec["__text__"], rec["__id__"], spec.default_source)
    if not isinstance(rec, dict):
        raise _Malformed("not_an_object", f"{where}: record is a JSON {type(rec).__name__}, not an object")
    if text_field not in rec or rec[text_field] is None:
        raise _Malformed("no_text_field", f"{where}: record has no '{text_field}' field")
    text = rec[text_field]
    if not isinstance(text, str):
        raise _Malformed("text_not_string", f"{where}: record field '{text_field}' is a {type(text).__name__}, not a string")
    doc_id = rec.get(id_field) if id_field else None
    if doc_id is None or doc_id == "":
        # stable default id: input name plus line / row number
        tail = where.rsplit(":", 1)[-1].strip().replace("record ", "")
        doc_id = f"{spec.name}:{tail}"
    src = rec.get(source_field) if source_field else None
    if not isinstance(src, str) or not src:
        src = spec.default_source
    return Document(text, str(doc_id), src)


def iter_documents(
    specs: Sequence[InputSpec],
    text_field: str = "text",
    id_field: str = "id",
    source_field: str = "source",
    strict: bool = False,
    max_docs: int | None = None,
    stats: ReadStats | None = None,
) -> Iterator[Document]:
    """Yield the documents of every input in order, skipping (or, when ``strict``, refusing) malformed records."""
    stats = stats if stats is not None else ReadStats()
    n = 0
    for spec in specs:
        for where, rec in _records(spec, text_field, id_field, source_field):
            if max_docs is not None and n >= max_docs:
                return
            stats.count_record(spec.path)
            try:
                doc = _to_document(where, rec, spec, text_field, id_field, source_field)
            except _Malformed as m:
                stats.count_malformed(spec.path, m.reason, m.message, strict)
                continue
            if not doc.text.strip():
                stats.empty += 1
                continue
            n += 1
            stats.documents += 1
            stats.docs_by_input[spec.path] += 1
            yield doc


def iter_json_records(path: str | Path, what: str = "file") -> Iterator[tuple[int, dict[str, Any]]]:
    """Strictly read a ``.jsonl`` / ``.jsonl.gz`` / ``.jsonl.zst`` file: (1-based line, record) per non-blank line.

    For the small files read whole (validation sets, task files): any bad line is fatal, with a one-line
    ``LmselectError`` naming ``path:line``. (Corpora and text to score go through :func:`iter_documents` /
    :func:`iter_jsonl_records`, which skip and count malformed records instead.)
    """
    p = Path(path)
    if not p.is_file():
        raise LmselectError(f"{p}: {what} not found")
    for where, rec in _iter_jsonl(p):
        if isinstance(rec, _Malformed):
            raise LmselectError(rec.message)
        if not isinstance(rec, dict):
            raise LmselectError(f"{where}: record is not a JSON object")
        yield int(where.rsplit(":", 1)[1]), rec


@dataclass
class JsonlRecord:
    """One non-blank line of a .jsonl file, good or not (line-aligned consumers such as dolma attribute files need
    a row for every line)."""

    line: int  # 1-based line number (blank lines count, as in the file)
    raw_id: Any  # the record's id value exactly as in the file (None when null, missing, or the line is malformed)
    text: str | None  # None when the record is malformed
    source: str | None  # the record's source field when it is a non-empty string
    problem: str | None = None  # why the record is malformed (the skip message), else None


def iter_jsonl_records(
    path: str | Path,
    text_field: str = "text",
    id_field: str = "id",
    source_field: str = "source",
    strict: bool = False,
    stats: ReadStats | None = None,
) -> Iterator[JsonlRecord]:
    """Every non-blank line of one .jsonl[.gz|.zst] file, with the same decoding and the same malformed-record rules
    as :func:`iter_documents` (prepare): a bad line is counted in ``stats`` (reason, file, examples) and yielded with
    ``problem`` set, or with ``strict`` raises a one-line error naming ``path:line``. Empty texts are counted as
    ``empty`` and yielded."""
    p = Path(path)
    if not p.is_file():
        raise LmselectError(f"{p}: file not found")
    if _file_kind(p) != "jsonl":
        raise LmselectError(f"{p}: not a .jsonl / .json / .ndjson file (optionally .gz or .zst)")
    stats = stats if stats is not None else ReadStats()
    spec = InputSpec(str(p), "jsonl")
    for where, rec in _iter_jsonl(p):
        line = int(where.rsplit(":", 1)[1])
        stats.count_record(spec.path)
        raw_id = rec.get(id_field) if isinstance(rec, dict) and id_field else None
        try:
            doc = _to_document(where, rec, spec, text_field, id_field, source_field)
        except _Malformed as m:
            stats.count_malformed(spec.path, m.reason, m.message, strict)
            yield JsonlRecord(line, raw_id, None, None, m.message)
            continue
        if not doc.text.strip():
            stats.empty += 1
        else:
            stats.documents += 1
            stats.docs_by_input[spec.path] += 1
        src = rec.get(source_field) if source_field else None
        yield JsonlRecord(line, raw_id, doc.text, src if isinstance(src, str) and src else None)
