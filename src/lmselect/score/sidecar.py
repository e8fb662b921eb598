"""The scores sidecar on disk: part names, part tables, readers and the one-part writer.

A sidecar directory holds ``part-{i:05d}-of-{n:05d}.parquet`` files (``seq_id`` int64, ``score`` float32; jsonl
input adds ``doc_id``, ``doc_index``, ``char_start``, ``char_end``), each written atomically so that a part's
existence is its completion marker, and ``manifest.json`` (kind="scores") once every part exists. Scores of a .jsonl
file also carry ``documents.parquet`` (one row per document, see :mod:`lmselect.score.windows`) and dolma-style
``attributes/<name>/*.jsonl.gz``. Every reader of scores (select, report, pipeline) goes through this module, so
the format is defined in one place.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lmselect.artifacts import ArtifactError, LmselectError, Manifest, atomic_path, read_manifest, write_manifest

PART_RE = re.compile(r"^part-(\d{5})-of-(\d{5})\.parquet$")
_META_KEY = b"lmselect"  # parquet schema-metadata key holding a part's timing record
DOCUMENTS_FILE = "documents.parquet"  # jsonl input: window scores rolled up to one row per document
ATTRIBUTES_DIR = "attributes"  # jsonl input: dolma-style attribute files, attributes/<name>/<input>.jsonl.gz


def part_name(i: int, n: int) -> str:
    """File name of part ``i`` of ``n`` (zero-padded so that a directory listing sorts parts in order)."""
    return f"part-{i:05d}-of-{n:05d}.parquet"


def partial_name(i: int, n: int) -> str:
    """In-part progress checkpoint of part ``i`` of ``n`` (replaced by the part file when the part is done)."""
    return part_name(i, n) + ".partial"


def existing_split(out_dir: str | Path) -> int | None:
    """The ``n`` of the parts already in ``out_dir`` (None when there are none); mixed splits are an error."""
    d = Path(out_dir)
    if not d.is_dir():
        return None
    ns = {int(m.group(2)) for p in d.iterdir() if (m := PART_RE.match(p.name))}
    ns |= {int(m.group(2)) for p in d.iterdir() if p.name.endswith(".partial") and (m := PART_RE.match(p.name[:-8]))}
    if len(ns) > 1:
        raise LmselectError(f"{d}: holds parts of several splits ({sorted(ns)}); use a fresh --out directory")
    return ns.pop() if ns else None


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (for one-line errors that quote a library's complaint)."""
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:200]


def write_part_table(path: Path, seq_ids: np.ndarray, scores: np.ndarray, extra: dict[str, Any] | None,
                     meta: dict[str, Any] | None) -> None:
    """Write one part (or progress checkpoint) atomically; ``meta`` goes into the parquet schema metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols: dict[str, Any] = {"seq_id": pa.array(np.asarray(seq_ids, dtype=np.int64)),
                            "score": pa.array(np.asarray(scores, dtype=np.float32))}
    for k, v in (extra or {}).items():
        cols[k] = pa.array(v)
    table = pa.table(cols)
    if meta is not None:
        table = table.replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_part_table(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(seq_ids int64, scores float32, timing record) of one part or progress checkpoint; raises on a bad file."""
    import pyarrow.parquet as pq

    t = pq.read_table(path, columns=["seq_id", "score"])
    meta = json.loads((t.schema.metadata or {}).get(_META_KEY, b"{}"))
    return t.column("seq_id").to_numpy().astype(np.int64), t.column("score").to_numpy().astype(np.float32), meta


def part_meta(path: Path) -> dict[str, Any]:
    """The timing record a part carries in its schema metadata ({} when it has none)."""
    import pyarrow.parquet as pq

    md = pq.read_schema(path).metadata or {}
    try:
        return json.loads(md.get(_META_KEY, b"{}"))
    except json.JSONDecodeError:
        return {}


def list_parts(scores_dir: Path) -> list[Path]:
    """Paths of every part of a complete sidecar, in part order; an error names the first missing one."""
    m = read_manifest(scores_dir, kind="scores")
    n = int(m.get("extra", {}).get("n_parts") or m.get("counts", {}).get("parts") or 0)
    paths = [scores_dir / part_name(i, n) for i in range(n)]
    missing = [p.name for p in paths if not p.is_file()]
    if not paths or missing:
        raise ArtifactError(f"{scores_dir}: scores sidecar is missing {missing[0] if missing else 'its parts'}")
    return paths


def read_scores_table(scores_dir: str | Path, columns: list[str] | None = None) -> Any:
    """All rows of a complete scores sidecar as a pyarrow Table sorted by ``seq_id``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = Path(scores_dir)
    paths = list_parts(d)
    cols = None if columns is None else list(dict.fromkeys(["seq_id", *columns]))
    try:
        t = pa.concat_tables([pq.read_table(p, columns=cols) for p in paths])
    except (KeyError, pa.ArrowInvalid) as e:
        raise ArtifactError(f"{d}: unreadable scores part ({first_line(e)})") from None
    t = t.sort_by("seq_id")
    ids = t.column("seq_id").to_numpy()
    if len(ids) > 1 and np.any(ids[1:] == ids[:-1]):
        raise ArtifactError(f"{d}: duplicate seq_id {int(ids[1:][ids[1:] == ids[:-1]][0])} across parts")
    return t


def read_scores(scores_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(seq_ids int64, scores float32) of a complete scores sidecar, sorted by seq_id."""
    t = read_scores_table(scores_dir, ["score"])
    return (t.column("seq_id").to_numpy().astype(np.int64), t.column("score").to_numpy().astype(np.float32))


def write_scores(
    out_dir: str | Path,
    seq_ids: np.ndarray,
    scores: np.ndarray,
    *,
    config: dict[str, Any] | None = None,
    parents: list[dict[str, str]] | None = None,
    extra: dict[str, Any] | None = None,
    counts: dict[str, Any] | None = None,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write already-computed scores as a complete one-part sidecar (atomically), e.g. MATES predictions.
    ``write_extra(dir)`` adds files of the caller's (e.g. a saved text scorer) before the manifest is written."""
    seq_ids = np.asarray(seq_ids, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float32)
    if seq_ids.shape != scores.shape or seq_ids.ndim != 1:
        raise LmselectError(f"{out_dir}: seq_ids and scores must be 1-D arrays of one length")
    if len(np.unique(seq_ids)) != len(seq_ids):
        raise LmselectError(f"{out_dir}: duplicate seq_ids")
    order = np.argsort(seq_ids, kind="stable")
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        write_part_table(tmp / part_name(0, 1), seq_ids[order], scores[order], None,
                     {"part": 0, "of": 1, "sequences": int(len(seq_ids))})
        if write_extra is not None:
            write_extra(tmp)
        write_manifest(tmp, Manifest(kind="scores", config=config or {}, parents=parents or [],
                                     counts={"sequences": int(len(seq_ids)), "parts": 1, **(counts or {})},
                                     extra={"n_parts": 1, "input": "pool", **(extra or {})}))
    return Path(out_dir)


def read_documents(scores_dir: str | Path) -> Any:
    """The per-document scores (``documents.parquet``) of a complete sidecar of a .jsonl file, as a pyarrow Table
    in file order: doc_index, doc_id, source, line, n_chars, n_windows, score (mean), score_min, score_max."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = Path(scores_dir)
    m = read_manifest(d, kind="scores")
    if m.get("extra", {}).get("input") != "jsonl":
        raise LmselectError(f"{d}: scores of pool sequences, not of a .jsonl file; there are no document scores")
    p = d / DOCUMENTS_FILE
    if not p.is_file():
        raise ArtifactError(f"{d}: no {DOCUMENTS_FILE} (written by an older lmselect); rescore into a fresh --out")
    try:
        return pq.read_table(p)
    except (OSError, pa.ArrowInvalid) as e:
        raise ArtifactError(f"{p}: unreadable ({first_line(e)})") from None
