"""Decontamination: n-gram overlap of pool documents with protected texts (selection set, report set, eval tasks).

A data-selection comparison is only honest if no method can win by training on the text it is scored on. This module
finds pool documents that share word n-grams with *protected* texts, in the style of the GPT-3 paper (13-gram
overlap), datatrove's ``NGramsDecontFilter`` and dolma's decontamination step. ``lmselect prepare`` uses it through
``PrepareConfig.decontaminate`` (see :mod:`lmselect.data.prepare`): ``flag`` keeps the documents and lists them,
``drop`` removes them before the tokenizer is trained and before tokenisation.

Normalisation (:func:`normalize_words`), applied identically to protected texts and pool documents:

1. Unicode NFKC (so full-width letters, ligatures and the like compare equal to their plain forms),
2. lower-case (``str.lower``),
3. punctuation and symbols stripped: every character that is neither a letter, a digit nor whitespace (regex
   ``[^\\w\\s]``, plus ``_``) becomes a space -- a space, not nothing, so that ``well-known`` and ``well - known``
   (or ``don't`` and ``don ' t``) normalise to the same words,
4. split on whitespace.

N-grams: every window of ``n`` consecutive normalised words (default 13). A text with fewer than ``n`` words (but at
least one) contributes all its words as **one** shorter n-gram, so a short protected text is matched by a pool
document that is, after normalisation, exactly that text (not by every document that contains its words: that would
flag half the pool for a one-word answer). A text without words has no n-grams and never matches.

Hashing: each word gets a stable 64-bit hash (BLAKE2b), an n-gram the polynomial ``len*P^k + w_1*P^(k-1) + ... + w_k``
modulo 2^64 over its word hashes (odd ``P``), computed vectorised over whole batches of documents with numpy. The
index keeps one sorted ``uint64`` array per protected set plus their sorted union: 8 bytes per distinct n-gram, looked
up with ``np.searchsorted``. Two different n-grams collide with probability about 2^-64 per pair.

Protected inputs: files or folders (searched recursively, sorted), ``bundled:REL`` for the repository's ``data/``
folder, shell globs. ``.jsonl`` / ``.json`` / ``.ndjson`` (optionally ``.gz`` / ``.zst``) and ``.parquet``: one text
per record = **every string value of the record** (recursively through lists and nested objects, in record order)
joined by spaces. This generic extractor covers the validation sets (``text``) and every eval task file in
``data/tasks`` (passages, questions, choices, endings, support) without a per-task schema; the extra ids and labels
it picks up only add n-grams no pool document will contain. ``.txt``: the whole file is one text. Inside folders,
other files (``SOURCE.md``, scripts) are ignored; a named file of another type is an error. Each file is one
*protected set*, labelled by the path as given (``bundled:tasks/sciq/sciq_validation.jsonl`` for a file found under
``bundled:tasks``), so a report can say which set a document overlaps.

A pool document is **contaminated** when at least one of its n-grams is in the index and the fraction of its n-gram
windows found there is at least ``min_fraction`` (default 0: any overlap).
"""

from __future__ import annotations

import glob
import hashlib
import re
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from lmselect.artifacts import LmselectError, read_manifest
from lmselect.config import ConfigError
from lmselect.data.readers import Document, Malformed, file_kind, folder_files, iter_jsonl
from lmselect.paths import DATA_DIR

CONTAMINATION_FILE = "contamination.parquet"
MODES = ("flag", "drop")
BUNDLED_PREFIX = "bundled:"
NORMALISATION = "NFKC, lower-case, punctuation/symbols -> space, whitespace split"
_PUNCT = re.compile(r"[^\w\s]|_")
_P = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier of the polynomial hash (the golden-ratio constant)
_CHECK_BATCH = 1024  # pool documents checked together (vectorised hashing and look-up)
_WORD_CACHE_MAX = 4_000_000  # distinct words whose hash is memoised; beyond this the cache starts again


@dataclass
class DecontamConfig:
    """``PrepareConfig.decontaminate``: which texts to protect and what to do with pool documents that overlap."""

    protected: list[str] = field(default_factory=list)  # files / folders / globs / bundled:REL; empty = off
    n: int = 13  # n-gram length in normalised words
    mode: str = "flag"  # flag: keep and list overlapping documents; drop: remove them before tokenisation
    min_fraction: float = 0.0  # contaminated when >= 1 n-gram overlaps and this fraction of the doc's n-grams does

    @property
    def enabled(self) -> bool:
        return bool(self.protected)

    def validate(self, prefix: str = "decontaminate.") -> None:
        """Raise ConfigError naming the key for values that cannot work."""
        if self.n < 1:
            raise ConfigError(f"config key '{prefix}n' must be >= 1 (got {self.n})")
        if self.mode not in MODES:
            raise ConfigError(f"config key '{prefix}mode' must be one of {list(MODES)} (got {self.mode!r})")
        if not 0.0 <= self.min_fraction <= 1.0:
            raise ConfigError(f"config key '{prefix}min_fraction' must be in [0, 1] (got {self.min_fraction})")


# ----------------------------------------------------------------------------------------------------------------
# normalisation and hashing


def normalize_words(text: str) -> list[str]:
    """The normalised words of ``text`` (see the module docstring): NFKC, lower-case, punctuation out, split."""
    return _PUNCT.sub(" ", unicodedata.normalize("NFKC", text).lower()).split()


class NgramHasher:
    """64-bit hashes of word n-grams, batched over many texts. One instance memoises word hashes across calls."""

    def __init__(self, n: int = 13):
        if n < 1:
            raise ValueError(f"n must be >= 1 (got {n})")
        self.n = n
        self._cache: dict[str, int] = {}

    def _word_ids(self, words: list[str]) -> list[int]:
        cache = self._cache
        if len(cache) > _WORD_CACHE_MAX:
            cache.clear()
        out = []
        for w in words:
            h = cache.get(w)
            if h is None:
                digest = hashlib.blake2b(w.encode("utf-8", "surrogatepass"), digest_size=8).digest()
                h = cache[w] = int.from_bytes(digest, "little")
            out.append(h)
        return out

    def hash_words(self, word_lists: Sequence[list[str]]) -> tuple[np.ndarray, np.ndarray]:
        """N-gram hashes of several word lists: ``(hashes uint64, text index int64)``, windows in text order."""
        n = self.n
        lens = np.fromiter((len(w) for w in word_lists), dtype=np.int64, count=len(word_lists))
        total = int(lens.sum())
        ids = np.fromiter((h for ws in word_lists for h in self._word_ids(ws)), dtype=np.uint64, count=total)
        offsets = np.cumsum(lens) - lens
        parts_h: list[np.ndarray] = []
        parts_d: list[np.ndarray] = []
        cnt = np.where(lens >= n, lens - n + 1, 0)
        if cnt.sum():
            # rolling polynomial over the whole concatenation; windows that straddle two texts are computed and dropped
            m = total - n + 1
            h = np.full(m, n, dtype=np.uint64)
            for j in range(n):
                h = h * _P + ids[j : j + m]
            doc = np.repeat(np.arange(len(lens)), cnt)
            starts = offsets[doc] + (np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt, cnt))
            parts_h.append(h[starts])
            parts_d.append(doc)
        short = np.flatnonzero((lens > 0) & (lens < n))
        if short.size:
            # a text shorter than n words is one n-gram of all its words (same polynomial, its own length)
            hs = np.empty(short.size, dtype=np.uint64)
            with np.errstate(over="ignore"):  # numpy warns on uint64 *scalar* wrap-around; it is intended here
                for i, d in enumerate(short):
                    v = np.uint64(lens[d])
                    for w in ids[offsets[d] : offsets[d] + lens[d]]:
                        v = v * _P + w
                    hs[i] = v
            parts_h.append(hs)
            parts_d.append(short.astype(np.int64))
        if not parts_h:
            return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int64)
        hashes, docs = np.concatenate(parts_h), np.concatenate(parts_d)
        order = np.argsort(docs, kind="stable")  # long and short texts interleaved back into text order
        return hashes[order], docs[order]

    def hash_texts(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`hash_words` for raw texts (normalised first)."""
        return self.hash_words([normalize_words(t) for t in texts])


# ----------------------------------------------------------------------------------------------------------------
# protected texts


def _resolve_entry(entry: str) -> list[tuple[str, Path]]:
    """(label, file) for every protected file an entry names; raises LmselectError for missing / unsupported ones."""
    raw = str(entry)
    path_str = str(_bundled_dir() / raw[len(BUNDLED_PREFIX) :]) if raw.startswith(BUNDLED_PREFIX) else raw
    label_base = raw
    if glob.has_magic(path_str):
        matches = sorted(glob.glob(path_str, recursive=True))
        if not matches:
            raise LmselectError(f"{raw}: protected set: no file matches this pattern")
        paths = [Path(m) for m in matches]
        label_base = None  # each match is labelled by its own path
    else:
        paths = [Path(path_str)]
    out: list[tuple[str, Path]] = []
    for p in paths:
        if not p.exists():
            raise LmselectError(f"{raw}: protected set not found" + (f" ({p})" if str(p) != raw else ""))
        if p.is_dir():
            files = folder_files(p, what="decontaminate")  # the one folder rule (prepare, score --jsonl)
            if not files:
                raise LmselectError(f"{raw}: protected folder holds no .jsonl / .json / .parquet / .txt file")
            base = label_base if label_base is not None else str(p)
            out.extend((f"{base.rstrip('/')}/{f.relative_to(p).as_posix()}", f) for f in files)
        else:
            if file_kind(p) is None:  # the one file-kind rule (data.readers)
                raise LmselectError(
                    f"{raw}: protected set has an unsupported format "
                    "(expected .jsonl[.gz|.zst], .json, .parquet or .txt)"
                )
            out.append((label_base if label_base is not None else str(p), p))
    return out


def _bundled_dir() -> Path:
    return DATA_DIR


def _strings(value: Any) -> Iterator[str]:
    """Every string inside a JSON value, in order (dict values, list items, recursively)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def protected_texts(path: str | Path) -> Iterator[str]:
    """The texts of one protected file (see the module docstring); a bad record is a one-line LmselectError."""
    p = Path(path)
    kind = file_kind(p)
    if kind == "text":
        try:
            yield p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise LmselectError(f"{p}: protected text file is not valid UTF-8 (byte {e.start})") from None
        except OSError as e:
            raise LmselectError(f"{p}: cannot read protected file ({e})") from None
    elif kind == "jsonl":
        for _where, rec in iter_jsonl(p):
            # a protected set is read strictly: skipping a bad record would silently protect less
            if isinstance(rec, Malformed):
                raise LmselectError(f"{rec.message} (protected set)")
            yield " ".join(_strings(rec))
    elif kind == "parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(p)
            for batch in pf.iter_batches(batch_size=4096):
                for rec in batch.to_pylist():
                    yield " ".join(_strings(rec))
        except OSError as e:
            raise LmselectError(f"{p}: not a readable Parquet file ({str(e).splitlines()[0][:200]})") from None
    else:
        raise LmselectError(f"{p}: protected set has an unsupported format")


def _batched(it: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for x in it:
        batch.append(x)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass
class ProtectedSet:
    label: str  # the path as configured (or found under a configured folder)
    path: str  # the file read
    n_texts: int
    hashes: np.ndarray  # sorted unique uint64 n-gram hashes


def _member(sorted_keys: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    if sorted_keys.size == 0:
        return np.zeros(hashes.shape, dtype=bool)
    pos = np.searchsorted(sorted_keys, hashes)
    return sorted_keys[np.minimum(pos, sorted_keys.size - 1)] == hashes


class ProtectedIndex:
    """The n-gram hashes of every protected set: per-set sorted arrays and their sorted union."""

    def __init__(self, sets: list[ProtectedSet], hasher: NgramHasher):
        self.sets = sets
        self.hasher = hasher
        self.n = hasher.n
        self.keys = np.unique(np.concatenate([s.hashes for s in sets])) if sets else np.empty(0, dtype=np.uint64)

    @classmethod
    def build(cls, protected: Sequence[str], n: int = 13) -> ProtectedIndex:
        """Read and hash every protected file named by ``protected`` (files, folders, globs, ``bundled:REL``)."""
        hasher = NgramHasher(n)
        sets: list[ProtectedSet] = []
        seen: set[str] = set()
        for entry in protected:
            for label, f in _resolve_entry(entry):
                key = str(f.resolve())
                if key in seen:  # the same file named twice (a file and its folder): one set
                    continue
                seen.add(key)
                n_texts = 0
                parts = []
                for batch in _batched(protected_texts(f), 512):
                    n_texts += len(batch)
                    parts.append(hasher.hash_texts(batch)[0])
                hashes = np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.uint64)
                sets.append(ProtectedSet(label, str(f), n_texts, hashes))
        return cls(sets, hasher)

    def check(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
        """For each text: (number of n-gram windows, windows found in the index, labels of the sets matched)."""
        hashes, doc = self.hasher.hash_texts(texts)
        found = _member(self.keys, hashes)
        total = np.bincount(doc, minlength=len(texts))
        matched = np.bincount(doc[found], minlength=len(texts))
        labels: list[list[str]] = [[] for _ in texts]
        if found.any():
            hit_h, hit_d = hashes[found], doc[found]
            for s in self.sets:
                for d in np.unique(hit_d[_member(s.hashes, hit_h)]):
                    labels[int(d)].append(s.label)
        return total, matched, labels


# ----------------------------------------------------------------------------------------------------------------
# the prepare step


def _all_dropped(seen: int, n: int) -> LmselectError:
    return LmselectError(
        f"decontamination: all {seen} documents overlap the protected sets ({n}-grams); "
        "nothing is left to tokenize (check decontaminate.protected, or use mode 'flag')"
    )


@dataclass
class _Flagged:
    doc_id: str
    source: str
    ngrams: int
    matched: int
    sets: list[str]
    dropped: bool


class Decontaminator:
    """Checks the pool's documents as they stream past; keeps the counts and the flagged documents for the pool."""

    def __init__(self, cfg: DecontamConfig, index: ProtectedIndex, index_s: float = 0.0):
        self.cfg = cfg
        self.index = index
        self.index_s = index_s
        self.check_s = 0.0
        self.flagged: list[_Flagged] = []
        self.per_source: dict[str, dict[str, int]] = {}
        self.set_docs: dict[str, int] = {s.label: 0 for s in index.sets}
        # sources that are flagged but never dropped (the known-answer check's planted documents, whose target-like
        # kind *is* selection-set text); not a config key: it does not change what happens to the corpus
        self.keep_sources: frozenset[str] = frozenset()

    @classmethod
    def build(cls, cfg: DecontamConfig, keep_sources: Iterable[str] = ()) -> Decontaminator:
        t0 = time.perf_counter()
        index = ProtectedIndex.build(cfg.protected, cfg.n)
        out = cls(cfg, index, time.perf_counter() - t0)
        out.keep_sources = frozenset(keep_sources)
        return out

    def _contaminated(self, total: np.ndarray, matched: np.ndarray) -> np.ndarray:
        frac = matched / np.maximum(total, 1)
        return (matched > 0) & (frac >= self.cfg.min_fraction)

    def filter(self, docs: Iterable[Document], record: bool = True, *, final: bool = True,
               on_drop: Callable[[Document], None] | None = None) -> Iterator[Document]:
        """Yield the documents to keep: all of them (flag mode) or the uncontaminated ones (drop mode).

        ``record=False`` only filters (used for the tokenizer-training pass, which reads the same documents before
        the counted tokenisation pass). ``final`` (the whole corpus, not a prepare task's part): raise LmselectError
        when drop mode leaves no document at all (:func:`check_info` does that for merged parts). ``on_drop`` is
        called with each document drop mode removes (prepare counts its tokens for the prefilter's statistics).
        """
        drop = self.cfg.mode == "drop"
        seen = kept = 0
        for batch in _batched(docs, _CHECK_BATCH):
            t0 = time.perf_counter()
            total, matched, labels = self.index.check([d.text for d in batch])
            bad = self._contaminated(total, matched)
            spare = np.asarray([d.source in self.keep_sources for d in batch], dtype=bool)
            if record:
                for i, d in enumerate(batch):
                    src = self.per_source.setdefault(d.source, {"docs": 0, "contaminated": 0, "dropped": 0})
                    src["docs"] += 1
                    if bad[i]:
                        src["contaminated"] += 1
                        src["dropped"] += int(drop and not spare[i])
                        for lab in labels[i]:
                            self.set_docs[lab] += 1
                        row = _Flagged(d.doc_id, d.source, int(total[i]), int(matched[i]), labels[i],
                                       drop and not spare[i])
                        self.flagged.append(row)
            self.check_s += time.perf_counter() - t0
            seen += len(batch)
            for i, d in enumerate(batch):
                if not (drop and bad[i] and not spare[i]):
                    kept += 1
                    yield d
                elif on_drop is not None:
                    on_drop(d)
        if final and drop and seen and not kept:
            raise _all_dropped(seen, self.cfg.n)

    def state(self) -> dict[str, Any]:
        """The counts and flagged documents (JSON) of a prepare task's part; :meth:`merge_states` adds parts up."""
        return {"per_source": self.per_source, "set_docs": self.set_docs, "check_s": self.check_s,
                "flagged": [vars(f) for f in self.flagged]}

    def merge_states(self, states: Sequence[dict[str, Any]]) -> None:
        """Take the counts and flagged documents of the parts, in order, as if this one had read them all; then
        refuse, as :meth:`filter` would, a drop mode that left nothing."""
        for st in states:
            for src, c in st["per_source"].items():
                acc = self.per_source.setdefault(src, {"docs": 0, "contaminated": 0, "dropped": 0})
                for k, v in c.items():
                    acc[k] += v
            for lab, v in st["set_docs"].items():
                self.set_docs[lab] += v
            self.check_s += st["check_s"]
            self.flagged.extend(_Flagged(**f) for f in st["flagged"])
        seen = sum(c["docs"] for c in self.per_source.values())
        if self.cfg.mode == "drop" and seen and seen == sum(c["dropped"] for c in self.per_source.values()):
            raise _all_dropped(seen, self.cfg.n)

    def manifest_info(self) -> dict[str, Any]:
        """``extra.decontamination`` of the pool manifest."""
        docs = sum(v["docs"] for v in self.per_source.values())
        return {
            "n": self.cfg.n,
            "mode": self.cfg.mode,
            "min_fraction": self.cfg.min_fraction,
            "normalisation": NORMALISATION,
            "documents": docs,
            "contaminated": len(self.flagged),
            "dropped": sum(f.dropped for f in self.flagged),
            "per_source": {k: dict(v) for k, v in sorted(self.per_source.items())},
            "per_set": {
                s.label: {
                    "path": s.path, "n_texts": s.n_texts, "n_ngrams": int(s.hashes.size),
                    "docs_matched": self.set_docs[s.label],
                }
                for s in self.index.sets
            },
            "file": CONTAMINATION_FILE,
        }

    def timings(self) -> dict[str, float]:
        return {"decontam_index_s": self.index_s, "decontam_check_s": self.check_s}

    def write(self, out_dir: Path) -> Path:
        """Write ``contamination.parquet`` (one row per contaminated document; written even when there is none)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        f = self.flagged
        table = pa.table(
            {
                "doc_id": pa.array([x.doc_id for x in f], type=pa.string()),
                "source": pa.array([x.source for x in f], type=pa.string()),
                "ngrams": pa.array([x.ngrams for x in f], type=pa.int64()),
                "matched": pa.array([x.matched for x in f], type=pa.int64()),
                "fraction": pa.array([x.matched / max(x.ngrams, 1) for x in f], type=pa.float64()),
                "sets": pa.array([x.sets for x in f], type=pa.list_(pa.string())),
                "dropped": pa.array([x.dropped for x in f], type=pa.bool_()),
            }
        )
        path = Path(out_dir) / CONTAMINATION_FILE
        pq.write_table(table, path)
        return path


# ----------------------------------------------------------------------------------------------------------------
# reading it back


def summary_line(info: dict[str, Any]) -> str:
    """``decontamination: 3 of 2,120 documents overlap the protected sets (13-grams); flagged``."""
    cond = f"{info['n']}-grams" + (f", >= {info['min_fraction']:.0%} of n-grams" if info.get("min_fraction") else "")
    action = "dropped" if info["mode"] == "drop" else "flagged"
    return (
        f"decontamination: {info['contaminated']:,} of {info['documents']:,} documents overlap the protected sets "
        f"({cond}); {action}"
    )


def overlap_report(pool_dir: str | Path, top: int = 10) -> dict[str, Any]:
    """What a report shows about a pool's decontamination.

    Returns ``{"enabled": False}`` for a pool prepared without it; otherwise the manifest's ``extra.decontamination``
    (n, mode, min_fraction, documents, contaminated, dropped, per_source, per_set) plus ``summary`` (one line) and
    ``top``: the ``top`` most overlapping documents (doc_id, source, ngrams, matched, fraction, sets, dropped).
    """
    pool_dir = Path(pool_dir)
    m = read_manifest(pool_dir, kind="pool")
    info = (m.get("extra") or {}).get("decontamination")
    if not info:
        return {"enabled": False}
    path = pool_dir / info.get("file", CONTAMINATION_FILE)
    try:
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    except (OSError, ValueError) as e:
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise LmselectError(f"{path}: cannot read the pool's contamination list ({msg})") from None
    rows.sort(key=lambda r: (-r["fraction"], -r["matched"], r["doc_id"]))
    out = dict(info, enabled=True, summary=summary_line(info), top=rows[: max(top, 0)])
    return out
