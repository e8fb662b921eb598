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

Tasks (``--tasks N``, ``--task I/N``; :mod:`lmselect.data.prepare_tasks`): the per-document work runs as N
independent tasks over the inputs (datatrove's ``LocalPipelineExecutor``; a Slurm array with ``lmselect slurm
prepare``), each writing a part; one streaming merge writes the pool, byte-identical for every N.

The pool is built in a temporary directory beside ``--out`` and renamed into place with ``manifest.json`` written
last, so an interrupted run leaves nothing that looks complete; rerunning keeps the tasks' complete parts
(``.OUT.work/``) and redoes the rest. A complete pool whose config hash matches is reused ("pool already
complete"); a different config is an error unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

import lmselect.data.prepare_tasks as pt
from lmselect.artifacts import (
    MANIFEST,
    LmselectError,
    Manifest,
    atomic_path,
    atomic_write_json,
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
from lmselect.data.pool import token_dtype
from lmselect.data.prefilter import DROPPED_FILE, Prefilter, check_info, merged_info, normalize_names, validate_names
from lmselect.data.prefilter import summary_line as prefilter_summary
from lmselect.data.prepare_tasks import (  # noqa: F401 - re-exported: the packing rules are prepare's
    BATCH_CHARS,
    BATCH_DOCS,
    LONG_TEXT_CHARS,
    ORIGINS_FILE,
    PROGRESS_LOG_S,
    assign_shards,
    document_batches,
    document_spans,
    parse_task,
    tokenizer_threads,
    write_index,
)
from lmselect.data.readers import Document, InputSpec, ReadStats, input_fingerprint, iter_documents, resolve_inputs
from lmselect.data.tokenizer import load_tokenizer, split_long_text, tokenizer_fingerprint, train_bpe

log = logging.getLogger(__name__)

# Config keys that do not change the pool's content and so are left out of its identity (config hash).
_NON_SEMANTIC = ("workers", "tasks")


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
    workers: int = 0  # tokenizer threads; 0 = all cores (shared among the tasks that run at once)
    tasks: int = 0  # independent tasks over the inputs (prepare_tasks); 0 = one per core, at most one per 32 MiB
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
        if self.tasks < 0:
            raise ConfigError(f"config key 'tasks' must be >= 0 (got {self.tasks})")
        if not self.text_field:
            raise ConfigError("config key 'text_field' may not be empty")
        if not self.inputs:
            raise ConfigError("config key 'inputs': no corpus files given")
        self.prefilter = normalize_names(self.prefilter)
        validate_names(self.prefilter)
        self.decontaminate.validate()


def pool_config_hash(cfg: PrepareConfig) -> str:
    """Identity of the pool a config produces (worker and task counts excluded: they do not change the output)."""
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
    """Like :func:`prepare`; also says whether an existing complete pool was reused (True) or one was built.

    The work runs as ``cfg.tasks`` tasks (:mod:`lmselect.data.prepare_tasks`; 0 = auto) and one merge; the pool is
    the same for every task count. Parts left by a killed run of the same config are reused."""
    cfg.validate()
    out_dir = Path(out_dir)
    chash = pool_config_hash(cfg)
    if _check_existing(out_dir, chash, overwrite):
        log.info("%s: pool already complete (config hash %s)", out_dir, chash)
        return out_dir, True
    _clean_stale_tmp(out_dir)

    t_start = time.perf_counter()
    specs = resolve_inputs(cfg.inputs)
    n_tasks = pt.auto_tasks(specs, cfg.tasks, cfg.max_docs)
    work, plan = _plan(cfg, out_dir, chash, specs, n_tasks, keep_other=False, decontam_keep=decontam_keep)
    n_tasks = plan["n_tasks"]
    cores = os.cpu_count() or 1
    parallel = min(n_tasks, cores)
    threads = max(1, (cfg.workers or cores) // parallel)
    t0 = time.perf_counter()
    _run_tasks(work, plan, cfg, range(n_tasks), workers=parallel, threads=threads, progress=progress)
    tasks_s = time.perf_counter() - t0
    counts = _merge(cfg, out_dir, work, plan, chash, t_start, tasks_s, threads)
    shutil.rmtree(work, ignore_errors=True)
    log.info(
        "%s: %d sequences x %d tokens from %d documents (%d tasks) in %.1fs",
        out_dir, counts["sequences"], cfg.seq_len, counts["documents"], n_tasks, time.perf_counter() - t_start,
    )
    return out_dir, False


def prepare_task(cfg: PrepareConfig, out_dir: str | Path, rank: int, n_tasks: int) -> dict[str, Any]:
    """Run task ``rank`` of ``n_tasks`` only (a Slurm array task: ``lmselect prepare ... --task I/N``), making the
    plan first when no task has (the first one trains the tokenizer; the others wait for it). The pool itself is
    written by a later ``lmselect prepare ... --tasks N`` (the merge; it also runs any task still missing).
    Returns ``{"complete": done parts, "tasks": N, "pool": True when the pool already exists}``."""
    cfg.validate()
    out_dir = Path(out_dir)
    chash = pool_config_hash(cfg)
    if _check_existing(out_dir, chash, False):
        return {"complete": n_tasks, "tasks": n_tasks, "pool": True}
    specs = resolve_inputs(cfg.inputs)
    if cfg.max_docs is not None and n_tasks > 1:
        raise LmselectError("--max-docs reads a prefix of the whole stream: it runs as one task (drop --task)")
    work, plan = _plan(cfg, out_dir, chash, specs, n_tasks, keep_other=True)
    _run_tasks(work, plan, cfg, [rank], workers=1, threads=cfg.workers or os.cpu_count() or 1, progress=False)
    return {"complete": n_tasks - len(pt.incomplete(work, plan)), "tasks": n_tasks, "pool": False}


def _plan(cfg: PrepareConfig, out_dir: Path, chash: str, specs: Sequence[InputSpec], n_tasks: int, *,
          keep_other: bool, decontam_keep: Sequence[str] = ()) -> tuple[Path, dict[str, Any]]:
    """The tasks' plan (``prepare_tasks.load_or_make_plan``): the tokenizer is loaded, or trained on its stated sample
    (the first ``tokenizer_train_chars`` characters of the prefiltered, decontaminated stream) and saved for the
    tasks. ``decontam_keep`` (sources flagged but never dropped) goes into the plan for every task."""
    where = _describe_inputs(specs, cfg.inputs)

    def make_tokenizer(tok_dir: Path) -> dict[str, Any]:
        if cfg.tokenizer:
            _, info = _get_tokenizer(cfg, specs, where)  # checks that it loads and has an EOS, before any task
            return info
        decon = Decontaminator.build(cfg.decontaminate, decontam_keep) if cfg.decontaminate.enabled else None
        pre = Prefilter(cfg.prefilter) if cfg.prefilter else None
        with tokenizer_threads(cfg.workers):
            tok, info = _get_tokenizer(cfg, specs, where, decon, pre)
        tok.save_pretrained(str(tok_dir))
        if pre is not None:  # the sample's filter decisions, for task 0 (whose stream the sample begins)
            atomic_write_json(tok_dir.parent / pt.PREFILTER_MEMO, pre.memo_state())
        return info

    work = pt.work_dir(out_dir)
    plan = pt.load_or_make_plan(work, cfg, chash, specs, n_tasks, make_tokenizer,
                                lambda: [input_fingerprint(s) for s in specs], keep_other=keep_other,
                                decontam_keep=decontam_keep)
    return work, plan


def _merge(cfg: PrepareConfig, out_dir: Path, work: Path, plan: dict[str, Any], chash: str, t_start: float,
           tasks_s: float, threads: int) -> dict[str, Any]:
    """Write the pool from the complete parts (``prepare_tasks``): one process, streaming, ``manifest.json`` last."""
    parts = pt.merged_parts(work, plan)
    specs = [InputSpec(**x) for x in plan["specs"]]
    where = _describe_inputs(specs, cfg.inputs)
    stats = ReadStats.merged([p["read"] for p in parts])
    if stats.documents == 0:
        raise _empty_corpus_error(where, stats, cfg.text_field)
    pre_info = merged_info(cfg.prefilter, [p["prefilter"] for p in parts]) if cfg.prefilter else None
    if pre_info is not None:
        check_info(pre_info)
    decon = None
    if cfg.decontaminate.enabled:
        decon = Decontaminator.build(cfg.decontaminate, plan.get("decontam_keep", ()))
        decon.merge_states([p["decontamination"] for p in parts])
    L = cfg.seq_len
    total = sum(p["tokens"] for p in parts)
    rows = total // L
    if rows == 0:
        raise LmselectError(
            f"{where}: corpus has only {total} tokens ({stats.documents} documents), fewer than seq_len={L}"
            + (stats.text_field_hint(cfg.text_field) or "; add text or lower --seq-len")
        )
    tok = load_tokenizer(pt.tokenizer_dir(work, plan))
    dtype = token_dtype(len(tok))
    timings: dict[str, float] = dict(plan.get("timings", {}))
    timings["tokenize_pack_s"] = tasks_s  # the tasks: read, prefilter, decontaminate, tokenize
    timings["tokenize_pack_cpu_s"] = sum(p["cpu_s"] for p in parts)  # CPU seconds of every task, all threads
    timings["task_max_rss_mb"] = max(p.get("max_rss_mb", 0.0) for p in parts)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        t0 = time.perf_counter()
        with writing(out_dir / "tokens.bin", tmp / "tokens.bin"):  # a full disk names tokens.bin, not the temp dir
            pt.write_tokens(work, plan["n_tasks"], tmp / "tokens.bin", rows * L * np.dtype(dtype).itemsize)
        stats.warn_malformed(log)  # a count in the manifest alone is easy to miss
        counts, extra = _write_index(cfg, tmp, tok, work, plan, parts, rows, stats)
        tok.save_pretrained(str(tmp / "tokenizer"))
        save_config(cfg, tmp / "config.yaml")
        if decon is not None:
            decon.write(tmp)
            extra["decontamination"] = decon.manifest_info()
            timings.update(decon.timings())
        if pre_info is not None:
            pt.write_dropped(work, parts, tmp / DROPPED_FILE)
            extra["prefilter"] = pre_info
            timings["prefilter_s"] = pre_info["seconds"]
        timings["index_write_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - t_start
        extra.update(
            {
                "tokenizer": plan["tokenizer"],
                "inputs": [dict(info, documents=int(stats.docs_by_input.get(s.path, 0)))
                           for s, info in zip(specs, plan["inputs"])],
                "tokenizer_threads": threads,
                "tasks": plan["n_tasks"],
                "tokens_per_second": counts["corpus_tokens"] / max(timings["tokenize_pack_s"], 1e-9),
            }
        )
        # the manifest goes in last: until the rename below, nothing at out_dir looks complete
        write_manifest(
            tmp,
            Manifest(kind="pool", config=to_dict(cfg), seed=cfg.seed, counts=counts, timings=timings, extra=extra,
                     config_hash=chash, checksums=file_checksums(tmp, ["tokens.bin"])),
        )
    return counts


def _write_index(cfg: PrepareConfig, tmp: Path, tok: Any, work: Path, plan: dict[str, Any],
                 parts: Sequence[dict[str, Any]], n_rows: int, stats: ReadStats) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write sequences.parquet and docs.parquet (streamed from the parts); return the manifest counts and extra."""
    names = sorted({s for p in parts for s in p["sources"]})  # sorted: codes do not depend on input order
    counts = write_index(cfg, work, plan, parts, tmp, n_rows, names)
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
        "seq_len": int(cfg.seq_len),
        "vocab_size": int(len(tok)),
        "eos_id": int(tok.eos_token_id),
        "dtype": token_dtype(len(tok)).name,
        "n_shards": int(cfg.n_shards),
        "tokenizer_fingerprint": tokenizer_fingerprint(tok),
        "source_names": names,
    }
    return counts, extra


# ----------------------------------------------------------------------------------------------------------------
# running the tasks (under datatrove's executor; prepare_step imports prepare_tasks, so this lives here)


def _run_tasks(work: Path, plan: dict[str, Any], cfg: Any, ranks: Sequence[int], *, workers: int, threads: int,
              progress: bool) -> None:
    """Run the incomplete ones of ``ranks``: one in this process (no executor: nothing to spread), else under
    datatrove's LocalPipelineExecutor, ``workers`` at a time (``local_rank_offset`` / ``local_tasks`` select the
    ranks of an array task). A task's LmselectError comes back as one line naming the task."""
    todo = [r for r in ranks if not pt.part_done(work, plan, r)]
    if not todo:
        return
    n = plan["n_tasks"]
    if n == 1:
        pt.run_task(work, 0, cfg, threads=threads, progress=progress)
        return
    from datatrove.executor import LocalPipelineExecutor

    from lmselect.data.prepare_step import PrepareTask  # datatrove: only for N > 1 tasks

    errors = work / "errors"
    shutil.rmtree(errors, ignore_errors=True)
    lo, hi = min(ranks), max(ranks) + 1
    ex = LocalPipelineExecutor(
        pipeline=[PrepareTask(str(work), cfg, threads)], tasks=n, workers=max(1, min(workers, len(todo))),
        logging_dir=str(work / "logs"), local_tasks=hi - lo, local_rank_offset=lo, start_method="forkserver",
    )
    # datatrove's own markers say "complete" only after this plan's part is: a marker without a part (another plan,
    # a part removed by hand) must not make it skip the task
    for r in todo:
        (work / "logs" / "completions" / f"{r:05d}").unlink(missing_ok=True)
    try:
        ex.run()
    except BaseException as e:
        msgs = sorted(errors.glob("*.txt")) if errors.is_dir() else []
        if msgs:
            raise LmselectError(msgs[0].read_text().strip()) from None
        if isinstance(e, KeyboardInterrupt):
            raise
        raise LmselectError(f"prepare: a task failed ({type(e).__name__}: {e}); see {work / 'logs'}") from None
    msgs = sorted(errors.glob("*.txt")) if errors.is_dir() else []
    if msgs:  # a task's bad input (PrepareTask): its one line
        raise LmselectError(msgs[0].read_text().strip())
    left = [r for r in ranks if not pt.part_done(work, plan, r)]
    if left:
        raise LmselectError(f"prepare: tasks {left} did not finish; see {work / 'logs'}; rerun to resume them")


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
    parser.add_argument("--tasks", type=int, default=S,
                        help="independent tasks over the inputs, run under datatrove's LocalPipelineExecutor, then one "
                        "merge; the pool is the same for any count (default 0: one per core, at most one per 32 MiB)")
    parser.add_argument("--task", default=None, metavar="I/N",
                        help="run only task I of N (a Slurm array task; lmselect slurm prepare); a later run with "
                        "--tasks N merges")
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


_RUN_FLAGS = ("out", "config", "overwrite", "no_progress", "debug", "overrides", "command", "task")
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


def preflight(args: argparse.Namespace) -> PrepareConfig:
    """What ``lmselect prepare`` can check before any work: the config (file, flags, overrides), ``--task``, and that
    every input exists and is of a readable kind; ``lmselect slurm prepare`` calls it before writing its scripts."""
    cfg = config_from_args(args)
    cfg.validate()
    if getattr(args, "task", None):
        parse_task(args.task)
    resolve_inputs(cfg.inputs)
    return cfg


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if getattr(args, "task", None):
        rank, n = parse_task(args.task)
        done = prepare_task(cfg, args.out, rank, n)
        if done["pool"]:
            print(f"{args.out}: pool already complete")
        else:
            print(f"{args.out}: task {rank}/{n} done; {done['complete']} of {n} parts complete"
                  + ("" if done["complete"] < n else f"; merge with: lmselect prepare ... --tasks {n}"))
        return 0
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
