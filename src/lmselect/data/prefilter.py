"""Heuristic prefilters: datatrove's document filters, run per document before the pool is tokenized.

Real pretraining pipelines remove boilerplate, lists and repeated text with rules before any model-based selection:
C4 (the BLISS / MATES pool, ``en.noblocklist``) applied the C4 rules, and RefinedWeb, FineWeb and DCLM run the Gopher
repetition and quality rules first. ``lmselect prepare --prefilter NAME,...`` (recipe ``pool.prepare.prefilter``)
offers that stage with the filter classes of datatrove (pinned 0.10.1), not a re-implementation: each filter is
called per document as ``f.filter(datatrove.data.Document(text=..., id=...))``, which returns ``True`` (keep) or
``(False, reason)``, in the order given, as a datatrove pipeline would run them (no executor, no stats files).

Filters (``FILTERS``; every threshold is the datatrove class default unless said otherwise):

* ``gopher_repetition`` -- ``GopherRepetitionFilter()``: Gopher (Rae et al. 2021, table A1) duplicate line /
  paragraph fractions, top 2-4-gram and duplicated 5-10-gram character fractions.
* ``gopher_quality`` -- ``GopherQualityFilter()``: 50-100,000 words, mean word length 3-10, symbol / bullet /
  ellipsis ratios, >= 80 % words with a letter, >= 2 of 8 stop words.
* ``c4`` -- ``C4QualityFilter(min_words_per_line=5, min_num_sentences=3)``: the constants of the code that built C4,
  TensorFlow Datasets ``tensorflow_datasets/text/c4_utils.py`` (``_MIN_WORDS_PER_LINE = 5``, ``_MIN_NUM_SENTENCES =
  3``, ``_MAX_WORD_LENGTH = 1000``; lines kept only when they end in a terminal mark and not an ellipsis, lines with
  "javascript" or a cookie / terms-of-use phrase removed, pages with "lorem ipsum" or a curly bracket removed,
  Wikipedia citation marks stripped). datatrove's defaults (3 words per line, 5 sentences) follow the C4 paper's
  prose instead, which states the two numbers the other way round. Two differences from TFDS remain, both
  datatrove's: a line ending in a single quote ``'`` also counts as terminated (TFDS: ``. ? ! "`` only), and
  sentences are counted with spaCy's rule-based sentencizer instead of NLTK punkt. C4's bad-words page filter
  (downloads a word list), its language filter (langdetect) and its corpus-wide three-sentence-span / line
  deduplication are not offered: the first two download at run time, the last is deduplication, not a per-document
  rule.
* ``c4_datatrove`` -- ``C4QualityFilter()``: datatrove's defaults (3 words per line, 5 sentences).
* ``fineweb_quality`` -- ``FineWebQualityFilter()``: FineWeb's line-punctuation, short-line, duplicated-line
  character and newline-per-word ratios.

The language, bad-words, unigram-log-prob and fastText filters download models or lists at run time and are left
out. The C4 filters also *edit* the documents they keep (they remove lines); the edited text is what the next
filter, decontamination and the tokenizer see, as in C4. A document that a filter empties (every line removed) is
dropped with reason ``emptied``; an empty or whitespace-only document is dropped with reason ``empty`` without
calling the filters (datatrove's repetition filter divides by the text length).

What was dropped and why: :class:`Prefilter` counts per filter and per source (documents, characters and, in the
tokenizing pass, tokens of the input and of what was kept) for the pool manifest (``extra.prefilter``) and streams
one JSON line per dropped document -- ``index`` (0-based position in the reader's document stream), ``id``,
``source``, ``filter``, ``reason``, ``chars`` -- to ``prefilter_dropped.jsonl`` in the pool: datatrove's exclusion
writer keeps the same facts, here without the text (``lmselect export POOL --dropped`` reads the documents back from
the inputs). The file is written inside the pool's temporary build directory, so it appears only with a complete
pool.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import time
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Sequence

from lmselect.artifacts import LmselectError, Manifest, atomic_path, parent_ref, read_manifest, write_manifest
from lmselect.config import ConfigError
from lmselect.data.readers import Document, reread_documents

log = logging.getLogger(__name__)

DROPPED_FILE = "prefilter_dropped.jsonl"
OFF = ("none", "off", "")
_BATCH = 256  # documents whose token counts are computed together (one batched tokenizer call)
_EDITING = ("C4QualityFilter",)  # filters that change the text of documents they keep (the others only decide)


@dataclass(frozen=True)
class FilterSpec:
    """One offered filter: the datatrove class name and the keyword arguments that differ from its defaults."""

    cls: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    note: str = ""


FILTERS: dict[str, FilterSpec] = {
    "gopher_repetition": FilterSpec("GopherRepetitionFilter", {}, "Gopher repetition rules (datatrove defaults)"),
    "gopher_quality": FilterSpec("GopherQualityFilter", {}, "Gopher quality rules (datatrove defaults)"),
    "c4": FilterSpec("C4QualityFilter", {"min_words_per_line": 5, "min_num_sentences": 3},
                     "C4 rules with the TFDS c4_utils constants (5 words per line, 3 sentences)"),
    "c4_datatrove": FilterSpec("C4QualityFilter", {}, "C4 rules with datatrove's defaults (3 words per line, 5 sentences)"),
    "fineweb_quality": FilterSpec("FineWebQualityFilter", {}, "FineWeb quality rules (datatrove defaults)"),
}


def normalize_names(names: Sequence[str] | str | None) -> list[str]:
    """The prefilter list as given (a list or ``"a,b"``), lower-cased; ``none`` / ``off`` / empty = no prefilter."""
    if names is None:
        return []
    if isinstance(names, str):
        names = names.split(",")
    out = [str(n).strip().lower() for n in names]
    out = [n for n in out if n]
    return [] if out and all(n in OFF for n in out) else out


def validate_names(names: Sequence[str], key: str = "prefilter") -> None:
    """Raise ConfigError naming ``key`` for an unknown filter (with a "did you mean"), a repeat, or ``none`` mixed in."""
    seen: set[str] = set()
    for n in names:
        if n in OFF:
            raise ConfigError(f"config key '{key}': 'none' cannot be combined with filters (got {list(names)})", key=key)
        if n not in FILTERS:
            close = difflib.get_close_matches(n, list(FILTERS), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"config key '{key}': unknown prefilter '{n}'{hint} (known: {', '.join(FILTERS)}, none)",
                              key=key)
        if n in seen:
            raise ConfigError(f"config key '{key}': prefilter '{n}' is listed twice", key=key)
        seen.add(n)


def build_filters(names: Sequence[str]) -> list[tuple[str, Any]]:
    """(name, datatrove filter instance) in order. The first construction loads spaCy's blank English pipeline
    lazily (a few seconds); nothing is downloaded."""
    validate_names(names)
    try:
        from datatrove.pipeline import filters as dt
    except ImportError as e:  # pragma: no cover - datatrove is a dependency
        raise LmselectError(f"prefilter: datatrove is not installed ({e}); pip install 'datatrove==0.10.1' spacy") from None
    return [(n, getattr(dt, FILTERS[n].cls)(**FILTERS[n].kwargs)) for n in names]


def _new_source() -> dict[str, Any]:
    return {"documents": 0, "kept": 0, "dropped": 0, "modified": 0, "input_chars": 0, "kept_chars": 0,
            "input_tokens": 0, "kept_tokens": 0, "by_filter": {}}


class Prefilter:
    """Runs the filters over a document stream; keeps the counts and writes the dropped-documents list."""

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.filters = build_filters(self.names)
        self.per_source: dict[str, dict[str, Any]] = {}
        self.by_filter: dict[str, dict[str, Any]] = {n: {"dropped": 0, "reasons": {}} for n in self.names}
        self.counted_tokens = False
        self.seconds = 0.0
        self._pass: dict[str, int] = {}
        # decisions of the uncounted first pass (the tokenizer-training pass reads a prefix of the same stream):
        # documents [0, _memo_n) were seen; _memo holds the dropped ones. The counted pass then reruns only the
        # filters that edit text on the kept ones, instead of every filter on every document.
        self._memo: dict[int, tuple[str, str]] = {}
        self._memo_n = 0
        self._editing = [(n, f) for n, f in self.filters if FILTERS[n].cls in _EDITING]
        self._later = False  # filter(kept_tokens_later=True): kept documents' tokens come through count_kept

    def count_kept(self, doc: Document, n_tokens: int) -> None:
        """The tokens (with EOS) of a document this prefilter kept, as the pool encoded them (or would have: a
        document decontamination then drops): its kept tokens and, when no filter edited it, its input tokens."""
        c = self.per_source[doc.source]
        c["kept_tokens"] += int(n_tokens)
        if not doc.edited:  # an edited document's input tokens were counted from its input text (filter)
            c["input_tokens"] += int(n_tokens)

    def memo_state(self) -> dict[str, Any]:
        """The uncounted pass's decisions (JSON): how many documents of the stream it saw, and the dropped ones."""
        return {"n": self._memo_n, "dropped": [[i, f, r] for i, (f, r) in sorted(self._memo.items())]}

    def load_memo(self, memo: dict[str, Any]) -> None:
        """Take decisions of :meth:`memo_state` for the same stream (prepare's task 0, which starts where the
        tokenizer's sample started): the counted pass then reruns only the text-editing filters on them."""
        self._memo = {int(i): (f, r) for i, f, r in memo["dropped"]}
        self._memo_n = int(memo["n"])

    def state(self) -> dict[str, Any]:
        """The counts (JSON) of a prepare task's part; :func:`merged_info` adds parts up."""
        return {"per_source": self.per_source, "by_filter": self.by_filter, "counted_tokens": self.counted_tokens,
                "seconds": self.seconds}

    def apply(self, text: str, doc_id: str = "") -> tuple[str | None, str | None, str]:
        """Run the filters on one text: ``(None, None, final_text)`` when kept, else ``(filter, reason, text)``.

        An empty text is dropped as ``empty`` by the first filter without calling it; a text a filter empties is
        dropped as ``emptied`` by that filter. A filter that raises is a one-line LmselectError naming the document.
        """
        from datatrove.data import Document as DtDocument
        from datatrove.pipeline.filters.base_filter import get_filter_result

        if not text.strip():
            return self.names[0], "empty", text
        for name, f in self.filters:
            doc = DtDocument(text=text, id=str(doc_id))
            try:
                ok, reason = get_filter_result(f.filter(doc))
            except Exception as e:  # noqa: BLE001 - a library fault on one document: one line, not a traceback
                raise LmselectError(f"prefilter {name}: document {doc_id!r}: {type(e).__name__}: {e}") from None
            if not ok:
                return name, str(reason or "dropped"), text
            if not doc.text.strip():
                return name, "emptied", text
            text = doc.text
        return None, None, text

    def _recall(self, index: int, d: Document) -> tuple[str | None, str | None, str]:
        """:meth:`apply`, from the first pass's decision where there is one (same stream, same result)."""
        if index >= self._memo_n:
            return self.apply(d.text, d.doc_id)
        hit = self._memo.pop(index, None)
        if hit is not None:
            return hit[0], hit[1], d.text
        from datatrove.data import Document as DtDocument

        text = d.text
        for _, f in self._editing:  # kept by every filter before: only the edits need redoing
            doc = DtDocument(text=text, id=str(d.doc_id))
            f.filter(doc)
            text = doc.text
        return None, None, text

    def filter(self, docs: Iterable[Document], *, record: bool = True,
               count_tokens: Callable[[list[str]], list[int]] | None = None,
               sink: IO[str] | None = None, final: bool = True, kept_tokens_later: bool = False,
               ) -> Iterator[Document]:
        """Yield the kept documents (text as the filters left it).

        ``record``: count (per filter, per source) and write dropped documents to ``sink``; ``record=False`` only
        filters (the tokenizer-training pass reads the same documents before the counted pass). ``count_tokens``
        (texts -> token counts): also count input and kept tokens per source; with ``kept_tokens_later`` only the
        texts that are not tokenized for the pool anyway (dropped documents, the input text of edited ones) are
        counted here, and the caller reports each kept document's tokens with :meth:`count_kept` (prepare: no text is
        tokenized twice). ``final`` (the whole corpus, not a prepare task's part): raise LmselectError when no
        document is left and warn, with counts, for each source whose documents were all removed
        (:func:`check_info` does that for merged parts)."""
        self._later = kept_tokens_later and count_tokens is not None
        index = seen = kept = 0
        self._pass: dict[str, int] = {}  # documents each filter removed in this pass (for the error below)
        buf: list[Document] = []
        for d in chain(docs, [None]):
            if d is not None:
                buf.append(d)
                if len(buf) < _BATCH:
                    continue
            if not buf:
                break
            outs = self._batch(buf, index, record, count_tokens, sink)
            index += len(buf)
            seen += len(buf)
            buf = []
            for out in outs:
                kept += 1
                yield out
        if final and seen and not kept:
            raise _all_removed(seen, self._pass)
        if final and record and seen:
            _warn_removed_sources(self.per_source)

    def _batch(self, batch: list[Document], start: int, record: bool,
               count_tokens: Callable[[list[str]], list[int]] | None, sink: IO[str] | None) -> list[Document]:
        t0 = time.perf_counter()
        if not record:
            results = [self.apply(d.text, d.doc_id) for d in batch]
            if start == self._memo_n:
                self._memo.update({start + i: (r[0], r[1]) for i, r in enumerate(results) if r[0] is not None})
                self._memo_n = start + len(batch)
        else:
            results = [self._recall(start + i, d) for i, d in enumerate(batch)]
        self.seconds += time.perf_counter() - t0
        out = []
        for d, (fname, _, text) in zip(batch, results):
            if fname is not None:
                self._pass[fname] = self._pass.get(fname, 0) + 1
            elif text == d.text:
                out.append(d)
            else:
                out.append(dataclasses.replace(d, text=text, edited=True))  # count_kept: its input tokens are
                # counted here (from the input text); the pool's encoding gives only its kept tokens
        if not record:
            return out
        n_in = n_kept = None
        if count_tokens is not None and self._later:
            # only what the pool does not tokenize anyway: dropped texts and the input text of edited ones; a kept
            # document's tokens come from the pool's own encoding (count_kept)
            self.counted_tokens = True
            need = [i for i, (f, _, t) in enumerate(results) if f is not None or t != batch[i].text]
            counted = dict(zip(need, count_tokens([batch[i].text for i in need]))) if need else {}
            n_in = [counted.get(i, 0) for i in range(len(batch))]
            n_kept = [0] * len(batch)
        elif count_tokens is not None:
            self.counted_tokens = True
            n_in = count_tokens([d.text for d in batch])
            changed = [i for i, (f, _, t) in enumerate(results) if f is None and t != batch[i].text]
            n_changed = dict(zip(changed, count_tokens([results[i][2] for i in changed]))) if changed else {}
            n_kept = [0 if r[0] is not None else n_changed.get(i, n_in[i]) for i, r in enumerate(results)]
        for i, (d, (fname, reason, text)) in enumerate(zip(batch, results)):
            c = self.per_source.setdefault(d.source, _new_source())
            c["documents"] += 1
            c["input_chars"] += len(d.text)
            if n_in is not None:
                c["input_tokens"] += int(n_in[i])
                c["kept_tokens"] += int(n_kept[i])
            if fname is None:
                c["kept"] += 1
                c["kept_chars"] += len(text)
                c["modified"] += int(text != d.text)
                continue
            c["dropped"] += 1
            c["by_filter"][fname] = c["by_filter"].get(fname, 0) + 1
            bf = self.by_filter[fname]
            bf["dropped"] += 1
            bf["reasons"][reason] = bf["reasons"].get(reason, 0) + 1
            if sink is not None:
                sink.write(json.dumps({"index": start + i, "id": d.doc_id, "source": d.source, "filter": fname,
                                       "reason": reason, "chars": len(d.text)}, ensure_ascii=False) + "\n")
        return out

    def manifest_info(self) -> dict[str, Any]:
        """``extra.prefilter`` of the pool manifest."""
        return merged_info(self.names, [self.state()])


def merged_info(names: Sequence[str], states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``extra.prefilter`` of the pool manifest from the counts of one or more parts (:meth:`Prefilter.state`): sums,
    so the order of the parts does not matter."""
    import datatrove

    per_source: dict[str, dict[str, Any]] = {}
    by_filter: dict[str, dict[str, Any]] = {n: {"dropped": 0, "reasons": {}} for n in names}
    for st in states:
        for src, c in st["per_source"].items():
            acc = per_source.setdefault(src, _new_source())
            for k, v in c.items():
                if k == "by_filter":
                    for f, x in v.items():
                        acc["by_filter"][f] = acc["by_filter"].get(f, 0) + x
                else:
                    acc[k] += v
        for n, v in st["by_filter"].items():
            by_filter[n]["dropped"] += v["dropped"]
            for r, x in v["reasons"].items():
                by_filter[n]["reasons"][r] = by_filter[n]["reasons"].get(r, 0) + x
    tot = {k: sum(c[k] for c in per_source.values())
           for k in ("documents", "kept", "dropped", "modified", "input_chars", "kept_chars")}
    return {
        "filters": list(names),
        "settings": {n: {"class": FILTERS[n].cls, "kwargs": dict(FILTERS[n].kwargs)} for n in names},
        "datatrove_version": getattr(datatrove, "__version__", None) or _dist_version("datatrove"),
        **tot,
        "tokens_counted": any(st["counted_tokens"] for st in states),
        "by_filter": {n: {"dropped": v["dropped"], "reasons": dict(sorted(v["reasons"].items()))}
                      for n, v in by_filter.items()},
        "per_source": {k: dict(v, by_filter=dict(sorted(v["by_filter"].items())))
                       for k, v in sorted(per_source.items())},
        "file": DROPPED_FILE,
        "seconds": round(sum(st["seconds"] for st in states), 3),
    }


def _all_removed(seen: int, by: dict[str, int]) -> LmselectError:
    text = ", ".join(f"{k} {v:,}" for k, v in by.items())
    return LmselectError(f"prefilter: all {seen:,} documents were removed ({text}); nothing is "
                         "left to tokenize: use fewer filters (pool.prepare.prefilter / --prefilter)")


def _warn_removed_sources(per_source: dict[str, dict[str, Any]]) -> None:
    for src, c in sorted(per_source.items()):
        if c["documents"] and not c["kept"]:
            log.warning("prefilter: all %d documents of source '%s' were removed (%s)", c["documents"], src,
                        ", ".join(f"{k} {v}" for k, v in sorted(c["by_filter"].items())))


def check_info(info: dict[str, Any]) -> None:
    """What :meth:`Prefilter.filter` checks at the end of the whole corpus, on merged counts (:func:`merged_info`):
    LmselectError when every document was removed, a warning for each source removed whole."""
    if info["documents"] and not info["kept"]:
        raise _all_removed(info["documents"], {n: v["dropped"] for n, v in info["by_filter"].items() if v["dropped"]})
    _warn_removed_sources(info["per_source"])


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:  # pragma: no cover
        return None


# ----------------------------------------------------------------------------------------------------------------
# reading it back


def summary_line(info: dict[str, Any]) -> str:
    """``prefilter c4, gopher_repetition: 312 of 1,444 documents removed (c4 250, gopher_repetition 62), ...``."""
    by = ", ".join(f"{n} {v['dropped']:,}" for n, v in info.get("by_filter", {}).items())
    kept_c = info.get("kept_chars", 0) / max(info.get("input_chars", 0), 1)
    return (f"prefilter {', '.join(info.get('filters', []))}: {info.get('dropped', 0):,} of "
            f"{info.get('documents', 0):,} documents removed ({by}); {info.get('modified', 0):,} edited; "
            f"{kept_c:.0%} of the characters kept")


def source_rows(info: dict[str, Any]) -> list[list[str]]:
    """Per source: documents, removed, by filter, characters kept (rows of a table for inspect and the report)."""
    rows = []
    for src, c in (info.get("per_source") or {}).items():
        by = ", ".join(f"{k} {v}" for k, v in c.get("by_filter", {}).items()) or "–"
        rows.append([src, str(c["documents"]), str(c["dropped"]), by,
                     f"{c['kept_chars'] / max(c['input_chars'], 1):.0%}"])
    return rows


def prefilter_report(pool_dir: str | Path) -> dict[str, Any]:
    """``{"enabled": False}`` for a pool prepared without a prefilter; else the manifest's ``extra.prefilter`` plus
    ``summary`` (one line)."""
    m = read_manifest(Path(pool_dir), kind="pool")
    info = (m.get("extra") or {}).get("prefilter")
    if not info:
        return {"enabled": False}
    return dict(info, enabled=True, summary=summary_line(info))


def read_dropped(pool_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a pool's ``prefilter_dropped.jsonl`` (empty when the pool has no prefilter)."""
    path = Path(pool_dir) / DROPPED_FILE
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise LmselectError(f"{path}:{i}: not a JSON line; the pool is damaged, rerun lmselect prepare") from None
    return rows


def export_dropped(pool_dir: str | Path, out_dir: str | Path) -> tuple[Path, int]:
    """Write ``OUT/dropped.jsonl.gz``: each document the pool's prefilter removed, with its filter, reason and text,
    read back from the pool's inputs (refused when they changed since the pool was prepared: the positions in
    ``prefilter_dropped.jsonl`` would point at other documents). The text is the input's, before any filter edited it.
    ``OUT`` is an artifact (manifest kind ``export``), built in a temporary directory. Returns (OUT, documents)."""
    import gzip


    pool_dir, out_dir = Path(pool_dir), Path(out_dir)
    m = read_manifest(pool_dir, kind="pool")
    if not (m.get("extra") or {}).get("prefilter"):
        raise LmselectError(f"{pool_dir}: the pool was prepared without a prefilter; nothing was dropped")
    rows = {r["index"]: r for r in read_dropped(pool_dir)}
    c = m["config"]  # the pool's PrepareConfig, as written (data.prepare imports this module: no import back)
    docs = reread_documents(c, m["extra"].get("inputs", []), str(pool_dir))
    n = 0
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        with gzip.open(tmp / "dropped.jsonl.gz", "wt", encoding="utf-8") as f:
            for i, d in enumerate(docs):
                r = rows.get(i)
                if r is None:
                    continue
                f.write(json.dumps({**r, "text": d.text}, ensure_ascii=False) + "\n")
                n += 1
        write_manifest(tmp, Manifest(kind="export", parents=[parent_ref(pool_dir)], counts={"documents": n},
                                     extra={"dropped": "dropped.jsonl.gz", "pool": str(pool_dir)}))
    return out_dir, n
