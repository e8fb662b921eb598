"""Corpus readers: turn files, folders and Hugging Face datasets into a stream of documents.

Accepted inputs (each may be a path or a shell glob; several may be given):

* ``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst`` (also ``.json``/``.ndjson`` with the same compressions): one JSON object
  per line.
* ``.parquet``: one record per row.
* ``.txt`` file: one document.
* a **folder**: every readable file under it (searched recursively, sorted): ``.jsonl`` / ``.json`` / ``.ndjson``
  (``.gz`` / ``.zst`` too) and ``.parquet`` files as above, ``.txt`` files one document each; files of any other kind
  are named in one warning and skipped (:func:`folder_files`, the rule ``score --jsonl`` and decontamination use).
* a folder written by ``datasets.Dataset.save_to_disk`` (detected by its ``dataset_info.json`` / ``state.json`` /
  ``dataset_dict.json``); append ``#split`` to pick a split of a ``DatasetDict`` (default ``train``).
* ``hf:OWNER/NAME[#split]``: a dataset on the Hugging Face Hub, streamed with ``datasets.load_dataset``. Needs
  network access (or a warm cache); offline it fails with one clear line.

Each record yields a :class:`Document` with the text (field ``text_field``), a document id (field ``id_field`` when
it holds a usable id, else derived: :data:`ID_RULE`) and a source label (field ``source_field`` when present, else the file stem:
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
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from lmselect.artifacts import LmselectError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSIONS = ("", ".gz", ".zst")
HF_PREFIX = "hf:"
_HF_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
MAX_EXAMPLES = 20  # how many skipped-record messages are kept for the manifest
MALFORMED_WARN_SHARE = 0.05  # warn when more than this share of an input's records is malformed
log = logging.getLogger("lmselect.data")

ID_RULE = """\
A record's id is its ``id`` field (``--id-field``) when that holds a usable id: a string other than "" as it is, any
other JSON value (a number) as its JSON text. A record without one (the field missing, null or "") gets the id
"<file>/<0-based line>" (for Parquet and datasets "<file>/<0-based row>"), where <file> is the file's path relative
to the folder (or glob root) it was found in, or its name when it was given itself: the id datatrove's JsonlReader /
ParquetReader gives a record without an id key when it reads the same folder (blank lines count as lines, as in
datatrove). A .txt file's id is its relative path. The same rule holds in prepare (the pool's doc_id), export, the
prefilter's dropped list, score --jsonl (documents.parquet) and the datatrove step's id adapter
(:func:`lmselect.integrations.datatrove.lmselect_adapter`)."""


def record_id(raw: Any, file: str, index0: int) -> tuple[str, bool]:
    """(id, derived) of a record whose id field holds ``raw``, found at 0-based line / row ``index0`` of ``file``
    (its relative name): :data:`ID_RULE`."""
    if raw is None or raw == "":
        return f"{file}/{index0}", True
    return (raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False)), False


@dataclass
class Document:
    text: str
    doc_id: str
    source: str
    index: int = -1  # position in the reader's document stream (iter_documents; 0-based); -1 when not from it
    edited: bool = False  # a prefilter changed the text (C4 removes lines): ``text`` is no longer the record's


@dataclass
class InputSpec:
    """One resolved input: what it is and where it is."""

    path: str  # file / folder path, or the hub id for kind == "hub"
    kind: str  # "jsonl", "parquet", "text", "hf_disk", "hub"
    split: str | None = None  # for hf_disk / hub
    rel: str | None = None  # the file's path relative to the folder / glob root it was found in (ids: ID_RULE)
    # a contiguous row range of a datasets folder (prepare's tasks split one dataset over several tasks); records
    # keep their row numbers in the whole dataset, so ids and messages do not depend on how the work is split
    start: int = 0
    stop: int | None = None

    @property
    def name(self) -> str:
        """The name ids are derived from: the relative path for a file found in a folder or by a glob, else the
        file's own name (the hub id for a hub dataset)."""
        if self.kind == "hub":
            return self.path
        return self.rel or Path(self.path).name

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
    fields_without_text: Counter = field(default_factory=Counter)  # fields of records that lack the text field

    def text_field_hint(self, text_field: str) -> str:
        """``"; 40 of 41 records have no 'text' field (their fields: body, id): check --text-field"`` when at
        least half of the records lack the text field (a wrong ``--text-field`` looks like a tiny corpus otherwise),
        else ``""``."""
        n = self.skipped.get("no_text_field", 0)
        if not n or 2 * n < self.records:
            return ""
        fields = ", ".join(k for k, _ in self.fields_without_text.most_common(8))
        return (f"; {n} of {self.records} records have no '{text_field}' field (their fields: {fields or '-'}): "
                "check --text-field")

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
                "records_by_file": dict(self.records_by_file), "fields_without_text": dict(self.fields_without_text)}

    @classmethod
    def merged(cls, states: Sequence[dict[str, Any]]) -> ReadStats:
        """The counts of reading the parts one after the other, in order (the first MAX_EXAMPLES messages of the
        concatenated stream: each part keeps its own first ones)."""
        out = cls()
        for s in states:
            out.records += s["records"]
            out.documents += s["documents"]
            out.empty += s["empty"]
            for key in ("skipped", "skipped_by_file", "docs_by_input", "records_by_file", "fields_without_text"):
                getattr(out, key).update(s.get(key, {}))
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


class Malformed(Exception):
    """One bad record (reason key, message): what :func:`iter_jsonl` yields in a bad line's place; the readers count
    it (:meth:`ReadStats.count_malformed`) or, reading strictly (decontamination's protected sets), refuse it."""

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


def file_kind(p: Path) -> str | None:
    """The one file-kind rule (prepare, ``score --jsonl``, decontamination): ``"jsonl"`` (.jsonl / .json / .ndjson,
    .gz / .zst too), ``"parquet"``, ``"text"`` (.txt) or None (not a readable kind)."""
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
    return "folder"


READABLE = ".jsonl / .json / .ndjson (.gz / .zst too), .parquet, .txt"


def folder_files(folder: Path, kinds: Sequence[str] = ("jsonl", "parquet", "text"), what: str = "") -> list[Path]:
    """Every file under ``folder`` (recursively, sorted by relative path) whose kind is in ``kinds``; the files left
    out are named in one warning (first ten), so that a folder never silently means less than it holds. The one
    folder rule of prepare, ``score --jsonl`` (``kinds=("jsonl",)``) and decontamination."""
    files, skipped = [], []
    for f in sorted((x for x in folder.rglob("*") if x.is_file()), key=lambda x: x.relative_to(folder).as_posix()):
        (files if file_kind(f) in kinds else skipped).append(f)
    if skipped:
        names = [f.relative_to(folder).as_posix() for f in skipped]
        log.warning("%s: %sskipped %d file(s) that are not %s: %s%s", folder, f"{what}: " if what else "",
                    len(skipped), " / ".join(_KIND_NAMES[k] for k in kinds), ", ".join(names[:10]),
                    ", ..." if len(names) > 10 else "")
    return files


_KIND_NAMES = {"jsonl": ".jsonl / .json / .ndjson (.gz / .zst too)", "parquet": ".parquet", "text": ".txt"}


def resolve_inputs(inputs: Sequence[str]) -> list[InputSpec]:
    """Expand globs and folders and classify every input; a missing path or unknown format raises LmselectError.

    A folder (not a ``save_to_disk`` one) is every readable file under it (:func:`folder_files`): each .jsonl /
    .parquet file one input named relative to the folder, its .txt files one text input (source = the folder name).
    A glob is its matches, named relative to the folder part before the first wildcard (as ``score --jsonl``)."""
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
        root: Path | None = None
        if glob.has_magic(base):
            matches = sorted(glob.glob(base, recursive=True))
            if not matches:
                raise LmselectError(f"{raw}: no file matches this pattern")
            paths = [Path(m) for m in matches]
            parts = Path(base).parts
            k = next(i for i, part in enumerate(parts) if glob.has_magic(part))
            root = Path(*parts[:k]) if k else Path(".")
        else:
            paths = [Path(base)]
        for p in paths:
            if not p.exists():
                raise LmselectError(f"{p}: input not found")
            if p.is_dir():
                if _dir_kind(p) == "hf_disk":
                    specs.append(InputSpec(str(p), "hf_disk", split))
                    continue
                files = folder_files(p, what="prepare")
                if not files:
                    raise LmselectError(f"{p}: folder holds no readable file ({READABLE})")
                text_added = False
                for f in files:
                    kind = file_kind(f)
                    if kind == "text":
                        if not text_added:  # the folder's .txt files are one input, as before
                            specs.append(InputSpec(str(p), "text"))
                            text_added = True
                        continue
                    specs.append(InputSpec(str(f), kind, rel=f.relative_to(p).as_posix()))  # type: ignore[arg-type]
                continue
            kind = file_kind(p)
            if kind is None:
                raise LmselectError(
                    f"{p}: unsupported input format (expected .jsonl[.gz|.zst], .parquet, .txt, a folder of them, "
                    "a datasets.save_to_disk folder or hf:OWNER/NAME)"
                )
            rel = p.relative_to(root).as_posix() if root is not None and p.is_relative_to(root) else None
            specs.append(InputSpec(str(p), kind, rel=rel))
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


def open_binary(path: Path) -> io.BufferedIOBase:
    """A binary, line-iterable reader that decompresses .gz / .zst transparently (by the name's extension)."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
        return io.BufferedReader(reader, buffer_size=1 << 20)
    return open(path, "rb", buffering=1 << 20)


BLANK = object()  # what ``iter_jsonl(..., blank=True)`` yields for a blank line


def iter_jsonl(path: Path, blank: bool = False,
               keep: Callable[[int, int], bool] | None = None) -> Iterator[tuple[str, Any]]:
    """("file:line", record) per line of a .jsonl[.gz|.zst] file; a bad line yields a :class:`Malformed` instead of
    the record (the caller's policy: skip and count, or refuse). ``keep(line, nbytes)`` (1-based line, its length in
    bytes as decompressed), when given, is asked for every line first: a line it refuses is passed over undecoded (a
    ``score --jsonl`` shard's share of a file)."""
    # Lines are split as bytes and decoded one by one, so a single non-UTF-8 line is one malformed record rather
    # than the end of the file. A corrupt compressed stream cannot be resynchronised: that is fatal. Blank lines
    # are skipped, or with ``blank`` yielded as ``BLANK`` (line-aligned outputs need a row for every line).
    lineno = 0
    try:
        with open_binary(path) as f:
            for lineno, raw in enumerate(f, 1):
                if keep is not None and not keep(lineno, len(raw)):
                    continue
                where = f"{path}:{lineno}"
                if not raw.strip():
                    if blank:
                        yield where, BLANK
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield where, Malformed("bad_utf8", f"{where}: not valid UTF-8 (byte {e.start})")
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, Malformed("bad_json", f"{where}: invalid JSON ({e.msg} at column {e.colno})")
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
            yield str(f), Malformed("bad_utf8", f"{f}: not valid UTF-8 (byte {e.start})")
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
        return iter_jsonl(Path(spec.path))
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
    if isinstance(rec, Malformed):
        raise rec
    if "__text__" in rec and spec.kind == "text":  # text files carry their own id
        return Document(rec["__text__"], rec["__id__"], spec.default_source)
    if not isinstance(rec, dict):
        raise Malformed("not_an_object", f"{where}: record is a JSON {type(rec).__name__}, not an object")
    if text_field not in rec or rec[text_field] is None:
        raise Malformed("no_text_field", f"{where}: record has no '{text_field}' field")
    text = rec[text_field]
    if not isinstance(text, str):
        raise Malformed("text_not_string", f"{where}: record field '{text_field}' is a {type(text).__name__}, not a string")
    number = int(where.rsplit(":", 1)[-1].strip().replace("record ", ""))  # 1-based line / row
    doc_id, _ = record_id(rec.get(id_field) if id_field else None, spec.name, number - 1)
    src = rec.get(source_field) if source_field else None
    if not isinstance(src, str) or not src:
        src = spec.default_source
    return Document(text, doc_id, src)


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
            except Malformed as m:
                stats.count_malformed(spec.path, m.reason, m.message, strict)
                if m.reason == "no_text_field" and isinstance(rec, dict):
                    stats.fields_without_text.update(rec.keys())
                continue
            if not doc.text.strip():
                stats.empty += 1
                continue
            doc.index = n
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
    for where, rec in iter_jsonl(p):
        if isinstance(rec, Malformed):
            raise LmselectError(rec.message)
        if not isinstance(rec, dict):
            raise LmselectError(f"{where}: record is not a JSON object")
        yield int(where.rsplit(":", 1)[1]), rec


@dataclass
class JsonlRecord:
    """One line of a .jsonl file, good, malformed or blank (line-aligned consumers such as dolma attribute files
    need a row for every line)."""

    line: int  # 1-based line number (blank lines count, as in the file)
    raw_id: Any  # the record's id value exactly as in the file (None when null, missing, or the line is malformed)
    text: str | None  # None when the record is malformed or the line blank
    source: str | None  # the record's source field when it is a non-empty string
    problem: str | None = None  # why the record is malformed (the skip message), else None
    blank: bool = False  # the line is empty or whitespace only (not a record; not counted as malformed)


def iter_jsonl_records(
    path: str | Path,
    text_field: str = "text",
    id_field: str = "id",
    source_field: str = "source",
    strict: bool = False,
    stats: ReadStats | None = None,
    keep: Callable[[int, int], bool] | None = None,
) -> Iterator[JsonlRecord]:
    """Every line of one .jsonl[.gz|.zst] file, with the same decoding and the same malformed-record rules as
    :func:`iter_documents` (prepare): a bad line is counted in ``stats`` (reason, file, examples) and yielded with
    ``problem`` set, or with ``strict`` raises a one-line error naming ``path:line``. Empty texts are counted as
    ``empty`` and yielded; a blank line is yielded with ``blank`` set (and counted nowhere), so that a consumer
    writing one line per input line (dolma attribute files) stays aligned. ``keep``: as in :func:`iter_jsonl` (lines
    it refuses are neither yielded nor counted)."""
    p = Path(path)
    if not p.is_file():
        raise LmselectError(f"{p}: file not found")
    if file_kind(p) != "jsonl":
        raise LmselectError(f"{p}: not a .jsonl / .json / .ndjson file (optionally .gz or .zst)")
    stats = stats if stats is not None else ReadStats()
    spec = InputSpec(str(p), "jsonl")
    for where, rec in iter_jsonl(p, blank=True, keep=keep):
        line = int(where.rsplit(":", 1)[1])
        if rec is BLANK:
            yield JsonlRecord(line, None, None, None, None, blank=True)
            continue
        stats.count_record(spec.path)
        raw_id = rec.get(id_field) if isinstance(rec, dict) and id_field else None
        try:
            doc = _to_document(where, rec, spec, text_field, id_field, source_field)
        except Malformed as m:
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


def reread_documents(config: dict[str, Any], recorded: Sequence[dict[str, Any]], where: str) -> Iterator[Document]:
    """The document stream a pool was prepared from (its ``config``: inputs, fields, ``max_docs``), read again in the
    same order, with the same ``Document.index``: how export and ``export --dropped`` give back original records.
    ``recorded`` is the pool manifest's ``extra.inputs``; an input that is gone or whose content changed since (sha256)
    is refused in one line naming it, since stream positions would then point at other records."""
    try:
        specs = resolve_inputs(config["inputs"])
    except LmselectError as e:
        raise LmselectError(f"{where}: cannot read its inputs back for the original text ({e})") from None
    if recorded:
        now = [input_fingerprint(s) for s in specs]
        if [r.get("sha256") for r in recorded] != [n.get("sha256") for n in now]:
            changed = next((r.get("path") for r, n in zip(recorded, now) if r.get("sha256") != n.get("sha256")),
                           ", ".join(str(x) for x in config["inputs"]))
            raise LmselectError(f"{where}: its inputs changed since it was prepared ({changed} differs, or files "
                                "were added or removed); the original records cannot be read back")
    return iter_documents(specs, config.get("text_field", "text"), config.get("id_field", "id"),
                          config.get("source_field", "source"), False, config.get("max_docs"))


# ----------------------------------------------------------------------------------------------------------------
# ``score --jsonl``'s input: the files behind --jsonl, and every line of them as a line-aligned record

ID_POLICY = """\
Records without an id (``id`` null, missing or "") keep their row everywhere, so nothing shifts: the dolma
attribute file carries the record's id exactly as it is in the file (null stays null, a number stays a number),
because dolma's mixer matches an attribute line to the document line at the same position and compares the two
``id`` values as JSON. documents.parquet needs a string key for joins, so such a record gets the derived
``doc_id`` "<file>/<0-based line index>" (``id_derived`` true): the id datatrove's JsonlReader itself gives a record
without an ``id`` key when it reads the same folder. A warning says how many records had no id.
"""


@dataclass(frozen=True)
class JsonlDoc:
    """One line of a .jsonl file to score (blank and malformed lines too: every output stays line-aligned)."""

    doc_id: str  # the record's ``id`` as a string; without one, derived: "<file>/<0-based line>" (see ID_POLICY)
    text: str  # "" for a malformed line (it keeps its row so that every output stays line-aligned)
    source: str  # the record's ``source``, else the file's name without extensions (dolma needs one)
    line: int  # 1-based line number
    file: str = ""  # the file's path relative to the input root; its attribute file mirrors it
    raw_id: Any = None  # the record's ``id`` exactly as in the file (None: null or missing)
    id_derived: bool = False  # True when ``doc_id`` was derived because the record has no id
    malformed: bool = False  # the line was skipped as malformed (not JSON, not UTF-8, no string text field)
    blank: bool = False  # an empty / whitespace-only line: no record, but its row keeps every output line-aligned


def file_stem(path: Path) -> str:
    """A .jsonl file's name without format and compression extensions (the source label of records without one)."""
    name = path.name
    for ext in (".gz", ".zst", ".jsonl", ".json", ".ndjson"):
        name = name[: -len(ext)] if name.endswith(ext) else name
    return name or path.name


def resolve_jsonl_inputs(jsonl: str | Path) -> list[tuple[Path, str]]:
    """The files behind ``--jsonl``: (path, name relative to the input root), sorted.

    A file is itself (its name); a folder is every .jsonl / .json / .ndjson file under it (``.gz`` / ``.zst`` too,
    searched recursively, names relative to the folder: :func:`folder_files`); a glob is its matches, named relative
    to the folder part before the first wildcard. The relative name is what the attribute file mirrors under
    ``attributes/<name>/`` and what derived ids start with (:data:`ID_RULE`).
    """
    raw = str(jsonl)
    if glob.has_magic(raw):
        parts = Path(raw).parts
        k = next(i for i, part in enumerate(parts) if glob.has_magic(part))
        root = Path(*parts[:k]) if k else Path(".")
        files = [Path(m) for m in sorted(glob.glob(raw, recursive=True)) if Path(m).is_file()]
        if not files:
            raise LmselectError(f"{raw}: no file matches this pattern")
    else:
        p = Path(raw)
        if not p.exists():
            raise LmselectError(f"{p}: --jsonl file or folder not found")
        if p.is_file():
            return [(p, p.name)]
        root = p
        files = folder_files(p, kinds=("jsonl",), what="score --jsonl")
        if not files:
            raise LmselectError(f"{p}: no .jsonl / .json / .ndjson files (optionally .gz or .zst) in this folder")
    out = []
    for f in files:
        if file_kind(f) != "jsonl":
            raise LmselectError(f"{f}: not a .jsonl / .json / .ndjson file (optionally .gz or .zst)")
        out.append((f, f.relative_to(root).as_posix()))
    return out


def iter_jsonl_docs(path: Path, rel: str, text_field: str = "text", stats: ReadStats | None = None,
                    strict: bool = False, keep: Callable[[int, int], bool] | None = None) -> Iterator[JsonlDoc]:
    """Every line of one .jsonl[.gz|.zst] file (``rel``: its name relative to the input root), in order, through
    :func:`iter_jsonl_records`: malformed lines are counted in ``stats`` and kept as unscorable rows, blank lines too
    (``blank``: one output line per input line, always); records without an id get a derived one (:data:`ID_POLICY`).
    ``keep``: only the lines it accepts (:func:`iter_jsonl`)."""
    stem = file_stem(path)
    for r in iter_jsonl_records(path, text_field=text_field, stats=stats, strict=strict, keep=keep):
        doc_id, derived = record_id(r.raw_id, rel, r.line - 1)  # the one id rule (ID_RULE)
        yield JsonlDoc(doc_id, r.text or "", r.source or stem, r.line, rel, r.raw_id, derived and not r.blank,
                       r.problem is not None, r.blank)


def read_jsonl_docs(path: str | Path, text_field: str = "text", stats: ReadStats | None = None) -> list[JsonlDoc]:
    """Every line of a .jsonl[.gz|.zst] file, folder or glob (:func:`resolve_jsonl_inputs`), in file order
    (:func:`iter_jsonl_docs`), as one list: for small inputs; ``score --jsonl`` streams file by file instead."""
    stats = stats if stats is not None else ReadStats()
    return [d for f, rel in resolve_jsonl_inputs(path) for d in iter_jsonl_docs(f, rel, text_field, stats)]


def read_jsonl_texts(path: str | Path) -> list[tuple[str, str]]:
    """(doc_id, text) per record (see :func:`read_jsonl_docs`)."""
    return [(d.doc_id, d.text) for d in read_jsonl_docs(path)]
