"""The sharded, resumable scoring job: model loading, batched forward scoring, parts, the manifest.

A job is a list of item ids, a function that fetches their tokens and the identity it is pinned to (``job.json``).
The items are split into ``n`` contiguous parts; each process computes its own parts (``--shard i/n``, or part
``rank`` of ``world`` under torchrun), each part is written atomically, and inside a long part progress is
checkpointed every ``checkpoint_every`` batches to ``part-...parquet.partial`` so that a killed part resumes where
it stopped. Whichever process finds every part present (the last to finish, or the next rerun) writes the
manifest, after the job's ``finish`` hook (jsonl input: the document roll-up) has written its files.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import yaml
from torch import nn

from lmselect.artifacts import (
    MANIFEST,
    ArtifactError,
    LmselectError,
    Manifest,
    atomic_write_json,
    atomic_write_text,
    is_complete,
    parent_ref,
    read_json,
    read_manifest,
    write_manifest,
)
from lmselect.data.pool import TokenPool
from lmselect.data.tokenizer import tokenizer_fingerprint
from lmselect.log import Progress
from lmselect.models.losses import token_ce
from lmselect.models.scorer import SequenceScorer
from lmselect.score.sidecar import (
    existing_split,
    first_line,
    part_meta,
    part_name,
    partial_name,
    read_part_table,
    write_part_table,
)
from lmselect.train.distributed import rank_world, resolve_device

log = logging.getLogger("lmselect.score")

JOB_FILE = "job.json"  # identity of what is being scored; a rerun with other inputs into the same dir is refused


def split_part(items: np.ndarray, i: int, n: int) -> np.ndarray:
    """Part ``i`` of ``n``: contiguous, near-equal slices of the sorted items (contiguous = sequential memmap reads)."""
    return np.array_split(np.sort(np.asarray(items, dtype=np.int64)), n)[i]


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_amp_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Autocast dtype: bf16 on GPU and float32 on CPU for ``auto``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[str(dtype)]
    except KeyError:
        raise LmselectError(f"--dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}") from None


def torch_device(device: str | torch.device | None) -> torch.device:
    """``--device`` as a torch.device (``auto``: this rank's GPU when CUDA is available, else the CPU)."""
    if isinstance(device, torch.device):
        return device
    try:
        return resolve_device(str(device or "auto"), int(os.environ.get("LOCAL_RANK", "0")))
    except RuntimeError:  # torch.device() on an unknown string
        raise LmselectError(f"--device: unknown device {device!r}") from None


# ----------------------------------------------------------------------------------------------------------------
# models


class LMLossScorer(nn.Module):
    """Score = −(mean next-token cross-entropy) of a causal LM over the (unpadded) positions; higher = more likely.

    Windows with fewer than two real tokens have no next-token prediction and score NaN.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask).logits
        ce = token_ce(logits, input_ids)  # [B, L-1], float32
        if attention_mask is None:
            return -ce.mean(dim=1)
        m = attention_mask[:, 1:].to(ce.dtype)
        n = m.sum(dim=1)
        out = -(ce * m).sum(dim=1) / n.clamp_min(1)
        return torch.where(n > 0, out, torch.full_like(out, float("nan")))


def load_scoring_model(path: str | Path, *, lm_loss: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Load a score model: a SequenceScorer dir (``scorer.json``; also a bilevel dir holding ``score_model/``), or
    with ``lm_loss`` an HF causal-LM checkpoint. Returns (module in eval mode, metadata)."""
    p = Path(path)
    if not p.exists():
        raise LmselectError(f"{p}: model directory not found")
    if not (p / "scorer.json").is_file() and (p / "score_model" / "scorer.json").is_file():
        p = p / "score_model"
    if (p / "scorer.json").is_file():
        if lm_loss:
            raise LmselectError(f"{p}: --lm-loss needs a causal-LM checkpoint, but this is a score model (scorer.json)")
        try:
            model = SequenceScorer.load(p)
        except LmselectError:
            raise
        except Exception as e:
            raise LmselectError(f"{p}: score model does not load ({first_line(e)})") from None
        meta = dict(getattr(model, "meta", {}) or {})
        meta.update(kind="scorer", path=str(p), vocab_size=int(model.lm.config.vocab_size),
                    max_positions=getattr(model.lm.config, "max_position_embeddings", None))
        meta["tokenizer_fingerprint"] = meta.get("tokenizer_fingerprint") or _carried_tokenizer(p / "backbone")
        return model.eval(), meta
    if (p / "config.json").is_file():
        if not lm_loss:
            raise LmselectError(
                f"{p}: a causal-LM checkpoint, not a score model (no scorer.json); pass --lm-loss to score by "
                "negative mean token cross-entropy"
            )
        from transformers import AutoModelForCausalLM

        try:
            lm = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True)
        except Exception as e:
            raise LmselectError(f"{p}: not a loadable Hugging Face causal-LM checkpoint ({first_line(e)})") from None
        meta = {"kind": "lm_loss", "path": str(p), "vocab_size": int(lm.config.vocab_size),
                "max_positions": getattr(lm.config, "max_position_embeddings", None)}
        with contextlib.suppress(ArtifactError):
            meta["tokenizer_fingerprint"] = read_manifest(p).get("extra", {}).get("tokenizer_fingerprint")
        meta["tokenizer_fingerprint"] = meta.get("tokenizer_fingerprint") or _carried_tokenizer(p)
        return LMLossScorer(lm).eval(), meta
    raise LmselectError(f"{p}: neither a score model (scorer.json) nor a Hugging Face checkpoint (config.json)")


def _carried_tokenizer(d: Path) -> str | None:
    """Fingerprint of the tokenizer saved with a checkpoint (``tokenizer.json`` / ``tokenizer_config.json`` in
    ``d``, as ``save_pretrained`` and the Hub lay it out), or None when it carries none."""
    if not ((d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file()):
        return None
    return tokenizer_fingerprint(d)  # a tokenizer that does not load is a one-line LmselectError


def _model_parents(path: Path) -> list[dict[str, str]]:
    """Manifest of the model dir, or of its parent (``bilevel/score_model`` -> ``bilevel``), when there is one."""
    for d in (path, path.parent):
        if is_complete(d):
            return [parent_ref(d)]
    return []

# ----------------------------------------------------------------------------------------------------------------
# batched forward


def forward_scores(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    device: torch.device,
    amp_dtype: torch.dtype,
) -> np.ndarray:
    """Scores [B] as float32 numpy: no grad (inference_mode), autocast to ``amp_dtype`` unless float32."""
    nb = device.type == "cuda"
    x = input_ids.to(device, non_blocking=nb)
    m = attention_mask.to(device, non_blocking=nb) if attention_mask is not None else None
    amp = (
        torch.autocast(device_type=device.type, dtype=amp_dtype)
        if amp_dtype != torch.float32
        else contextlib.nullcontext()
    )
    with torch.inference_mode(), amp:
        s = model(x, attention_mask=m) if m is not None else model(x)
    return s.float().cpu().numpy().reshape(-1)


Fetch = Callable[[np.ndarray], "tuple[torch.Tensor, torch.Tensor | None]"]


@dataclass
class ScoreJob:
    """What one scoring run computes: item ids, how to fetch their tokens, and extra output columns; run by
    :func:`run_job` (pool sequences: :func:`score_pool`; .jsonl windows: :func:`lmselect.score.windows.score_jsonl`)."""

    items: np.ndarray  # int64 seq ids (pool rows, or jsonl window indices)
    fetch: Fetch
    key: dict[str, Any]  # identity written to job.json
    extra_columns: Callable[[np.ndarray], dict[str, Any]] | None = None  # sorted ids -> columns
    order_key: np.ndarray | None = None  # processing order inside a part (jsonl: longest windows first)
    # called with (dir, part paths) once every part exists, before the manifest is written (jsonl: the document
    # roll-up); it writes its files into the directory and returns extra manifest counts
    finish: Callable[[Path, list[Path]], dict[str, Any]] | None = None


# ----------------------------------------------------------------------------------------------------------------
# parts


def _load_partial(path: Path, expected_order: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Scores already computed for a prefix of ``expected_order`` (empty when the checkpoint does not match)."""
    empty = (np.zeros(0, np.int64), np.zeros(0, np.float32), 0.0)
    if not path.is_file():
        return empty
    try:
        ids, sc, meta = read_part_table(path)
    except Exception as e:  # a corrupt checkpoint only costs recomputation
        log.warning("%s: unreadable progress checkpoint (%s); recomputing the part", path, first_line(e))
        return empty
    if len(ids) > len(expected_order) or not np.array_equal(ids, expected_order[: len(ids)]):
        log.warning("%s: progress checkpoint does not match this part; recomputing the part", path)
        return empty
    return ids, sc, float(meta.get("seconds", 0.0))


def _prefetching(fetch: Fetch, batches: list[np.ndarray], pin: bool) -> Iterator[tuple[np.ndarray, Any]]:
    """Yield (ids, fetched) with the next batch read in a background thread while the current one is scored."""
    if not batches:
        return

    def load(b: np.ndarray) -> Any:
        x, m = fetch(b)
        if pin:
            x = x.pin_memory()
            m = m.pin_memory() if m is not None else None
        return x, m

    with cf.ThreadPoolExecutor(max_workers=1) as ex:
        fut = ex.submit(load, batches[0])
        for j, b in enumerate(batches):
            cur = fut.result()
            if j + 1 < len(batches):
                fut = ex.submit(load, batches[j + 1])
            yield b, cur


def _score_part(
    model: nn.Module,
    job: ScoreJob,
    out_dir: Path,
    i: int,
    n: int,
    *,
    batch_size: int,
    device: torch.device,
    amp_dtype: torch.dtype,
    checkpoint_every: int,
    progress: bool,
) -> dict[str, Any]:
    """Compute part ``i`` of ``n`` and write it atomically; returns its timing record."""
    part_ids = split_part(job.items, i, n)
    order = part_ids
    if job.order_key is not None and len(part_ids):
        order = part_ids[np.lexsort((part_ids, job.order_key[part_ids]))]
    ppath = out_dir / partial_name(i, n)
    done_ids, done_sc, prev_seconds = _load_partial(ppath, order)
    if len(done_ids):
        log.info("part %d/%d: resuming after %d of %d sequences", i, n, len(done_ids), len(order))
    todo = order[len(done_ids) :]
    batches = [todo[s : s + batch_size] for s in range(0, len(todo), batch_size)]
    got_ids, got_sc = [done_ids], [done_sc]
    t0 = time.perf_counter()
    started = time.time()
    bar = Progress(len(order), initial=len(done_ids), unit="seq", desc=f"score part {i}/{n}", enabled=progress)
    try:
        for j, (b, (x, m)) in enumerate(_prefetching(job.fetch, batches, pin=device.type == "cuda"), start=1):
            got_ids.append(b)
            got_sc.append(forward_scores(model, x, m, device, amp_dtype))
            bar.update(len(b))
            if checkpoint_every > 0 and j % checkpoint_every == 0 and j < len(batches):
                # progress checkpoint of the processed prefix; the final part file replaces it
                write_part_table(ppath, np.concatenate(got_ids), np.concatenate(got_sc), None,
                             {"seconds": prev_seconds + time.perf_counter() - t0})
    finally:
        bar.close()
    seconds = prev_seconds + time.perf_counter() - t0
    ids = np.concatenate(got_ids)
    sc = np.concatenate(got_sc).astype(np.float32)
    srt = np.argsort(ids, kind="stable")
    ids, sc = ids[srt], sc[srt]
    computed = len(ids) - len(done_ids)
    rec = {
        "part": i, "of": n, "sequences": int(len(ids)), "computed_now": int(computed), "seconds": float(seconds),
        "started": started, "finished": time.time(), "device": str(device), "dtype": str(amp_dtype).replace("torch.", ""),
        "host": os.uname().nodename, "rank": rank_world()[0],
    }
    extra = job.extra_columns(ids) if job.extra_columns is not None else None
    write_part_table(out_dir / part_name(i, n), ids, sc, extra, rec)
    with contextlib.suppress(FileNotFoundError):
        ppath.unlink()
    rate = len(ids) / seconds if seconds > 0 else float("inf")
    log.info("part %d/%d: %d sequences in %.2f s (%.1f sequences/s on %s)", i, n, len(ids), seconds, rate, device)
    return rec


def check_job(out_dir: Path, key: dict[str, Any]) -> None:
    """Refuse to mix two different scoring jobs in one directory (a rerun would otherwise skip stale parts)."""
    p = out_dir / JOB_FILE
    if p.is_file():
        old = read_json(p)
        if old != json.loads(json.dumps(key, default=str)):
            diff = sorted(k for k in set(old) | set(key) if old.get(k) != json.loads(json.dumps(key.get(k), default=str)))
            raise LmselectError(
                f"{out_dir}: already holds scores of a different job (differs in: {', '.join(diff)}); "
                "use a fresh --out directory or delete this one"
            )
    else:
        atomic_write_json(p, key)  # identical content from every rank, so concurrent writes are harmless


def finalize_job(out_dir: Path, n: int, n_items: int, *, config: dict[str, Any], parents: list[dict[str, str]],
              counts: dict[str, Any], extra: dict[str, Any],
              finish: Callable[[Path, list[Path]], dict[str, Any]] | None = None) -> bool:
    """Write the manifest once every part exists; True when the sidecar is complete."""
    import pyarrow.parquet as pq

    if is_complete(out_dir, "scores"):
        return True
    paths = [out_dir / part_name(i, n) for i in range(n)]
    if not all(p.is_file() for p in paths):
        return False
    metas = [part_meta(p) for p in paths]
    scores = np.concatenate([pq.read_table(p, columns=["score"]).column("score").to_numpy() for p in paths])
    if len(scores) != n_items:
        raise ArtifactError(f"{out_dir}: parts hold {len(scores)} rows, expected {n_items}; delete the directory and rerun")
    secs = float(sum(m.get("seconds", 0.0) for m in metas))
    starts = [m["started"] for m in metas if "started" in m]
    ends = [m["finished"] for m in metas if "finished" in m]
    wall = float(max(ends) - min(starts)) if starts and ends else secs
    finite = scores[np.isfinite(scores)]
    stats = {}
    if len(finite):
        stats = {"score_mean": float(finite.mean()), "score_std": float(finite.std()),
                 "score_min": float(finite.min()), "score_max": float(finite.max())}
    timings = {
        "score_seconds_total": secs,  # summed over parts (device-seconds)
        "wall_seconds": wall,  # first part start -> last part end
        "sequences_per_s": n_items / secs if secs > 0 else 0.0,  # per process
        "aggregate_sequences_per_s": n_items / wall if wall > 0 else 0.0,
    }
    if finish is not None:
        counts = {**counts, **finish(out_dir, paths)}
    man = Manifest(
        kind="scores", config=config, parents=parents,
        counts={"sequences": int(n_items), "parts": int(n), "nan_scores": int(len(scores) - len(finite)), **counts},
        timings=timings, extra={"n_parts": int(n), "parts": metas, **extra, **stats},
    )
    write_manifest(out_dir, man)
    log.info("scores complete: %s (%d sequences, %.1f sequences/s per process)", out_dir, n_items,
             timings["sequences_per_s"])
    return True


def my_parts(shard: tuple[int, int] | None, num_parts: int | None, have: int | None) -> tuple[int, list[int]]:
    """(number of parts, the parts this process writes): ``shard=(i, n)`` is part ``i`` of ``n`` (under torchrun
    each rank takes its own slice of it); else under torchrun part ``rank`` of ``world``; else all of ``num_parts``,
    or of the split an earlier run left (``have``), or one part."""
    rank, world = rank_world()
    if shard is not None:
        i, n = shard
        if world > 1:  # a cluster-array task run with torchrun: split its part across the ranks
            i, n = i * world + rank, n * world
        return n, [i]
    if world > 1:
        return world, [rank]
    n = num_parts or have or 1
    return n, list(range(n))


def run_job(
    model: nn.Module,
    job: ScoreJob,
    out_dir: str | Path,
    *,
    batch_size: int,
    shard: tuple[int, int] | None,
    num_parts: int | None,
    device: Any,
    dtype: Any,
    progress: bool,
    checkpoint_every: int,
    config: dict[str, Any],
    parents: list[dict[str, str]],
    counts: dict[str, Any],
    extra: dict[str, Any],
) -> Path:
    """Run ``job`` into the sidecar ``out_dir``: this process's parts (``shard=(i, n)``: part ``i`` of ``n``; under
    torchrun part ``rank`` of ``world``; else all ``num_parts``), each written atomically, then the manifest (after
    ``job.finish``) once every part exists. Returns ``out_dir``."""
    out = Path(out_dir)
    if batch_size < 1:
        raise LmselectError(f"--batch-size must be >= 1, got {batch_size}")
    if out.exists() and not out.is_dir():
        raise LmselectError(f"{out}: exists and is not a directory")
    if out.is_dir() and is_complete(out) and not is_complete(out, "scores"):
        raise LmselectError(f"{out}: holds a '{read_manifest(out).get('kind')}' artifact; choose another --out")
    world = rank_world()[1]
    have = existing_split(out)
    n, mine = my_parts(shard, num_parts, have)
    if have is not None and have != n and shard is None and world > 1:  # resumed on another number of processes
        raise LmselectError(f"{out}: already split into {have} parts by an earlier run, this run has {world} processes "
                            f"(one part each); rerun with {have} processes (nodes x processes per node) or delete "
                            "the directory to rescore it")
    if have is not None and have != n:
        raise LmselectError(f"{out}: already split into {have} parts, this run asks for {n}; use --num-parts {have} "
                            "(or matching --shard) or a fresh --out")
    if n > max(1, len(job.items)):
        raise LmselectError(f"{out}: {n} parts for only {len(job.items)} sequences; use fewer parts")
    out.mkdir(parents=True, exist_ok=True)
    check_job(out, {**job.key, "n_parts": n})
    atomic_write_text(out / "config.yaml", yaml.safe_dump(json.loads(json.dumps(config, default=str)), sort_keys=False))
    missing = [i for i in range(n) if not (out / part_name(i, n)).is_file()]
    if missing and (out / MANIFEST).exists():
        (out / MANIFEST).unlink()  # a part was deleted: the old manifest no longer describes the directory
    dev = torch_device(device)
    amp_dtype = resolve_amp_dtype(dtype, dev)
    todo = [i for i in mine if i in missing]
    if todo:
        model.to(dev).eval()
        for i in todo:
            _score_part(model, job, out, i, n, batch_size=batch_size, device=dev, amp_dtype=amp_dtype,
                        checkpoint_every=checkpoint_every, progress=progress)
    else:
        log.info("%s: part(s) %s already done", out, ", ".join(map(str, mine)))
    extra = {**extra, "device": str(dev), "amp_dtype": str(amp_dtype).replace("torch.", ""), "batch_size": batch_size}
    if not finalize_job(out, n, len(job.items), config=config, parents=parents, counts=counts, extra=extra,
                     finish=job.finish):
        left = [i for i in range(n) if not (out / part_name(i, n)).is_file()]
        log.info("%s: waiting for part(s) %s of %d; the last to finish writes the manifest", out,
                 ", ".join(map(str, left[:10])) + (" ..." if len(left) > 10 else ""), n)
    return out


def _ids_digest(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.sort(ids).astype(np.int64)).tobytes()).hexdigest()[:16]


def model_and_meta(model_dir_or_scorer: Any, lm_loss: bool) -> tuple[nn.Module, dict[str, Any], list[dict[str, str]]]:
    """(model in eval mode, metadata, parent refs) of a model directory (:func:`load_scoring_model`) or of an
    in-memory scorer (no parents; its tokenizer cannot be checked)."""
    if isinstance(model_dir_or_scorer, nn.Module):
        m = model_dir_or_scorer
        lm = getattr(m, "lm", None)
        vocab = int(lm.config.vocab_size) if lm is not None and hasattr(lm, "config") else None
        meta = dict(getattr(m, "meta", {}) or {})
        meta.update(kind="in-memory", path=f"<{type(m).__name__}>", vocab_size=vocab,
                    max_positions=getattr(getattr(lm, "config", None), "max_position_embeddings", None))
        return m.eval(), meta, []
    model, meta = load_scoring_model(model_dir_or_scorer, lm_loss=lm_loss)
    return model, meta, _model_parents(Path(meta["path"]))


def check_vocab(meta: dict[str, Any], fingerprint: str | None, vocab_size: int, where: str,
                trust: bool = False) -> None:
    """Refuse, before any compute, a model whose tokenizer differs from the text's (the scores would be
    plausible-looking garbage), and a model loaded from disk whose tokenizer cannot be checked (no fingerprint in
    its manifest or scorer.json, no tokenizer saved with it) unless ``trust`` (``--trust-tokenizer``)."""
    fp = meta.get("tokenizer_fingerprint")
    if fp and fingerprint and fp != fingerprint:
        raise LmselectError(f"tokenizer mismatch: model {meta['path']} and {where} use different tokenizers")
    if not fp and meta.get("kind") in ("scorer", "lm_loss") and not trust:
        raise LmselectError(f"{meta['path']}: carries no tokenizer to check against {where} (no tokenizer files, "
                            "no fingerprint); save its tokenizer with it, or pass --trust-tokenizer")
    mv = meta.get("vocab_size")
    if mv is not None and vocab_size > mv:
        raise LmselectError(f"{where}: vocabulary of {vocab_size} tokens does not fit model {meta['path']} ({mv})")


# ----------------------------------------------------------------------------------------------------------------
# public API


def score_pool(
    model_dir_or_scorer: str | Path | nn.Module,
    pool: Any,
    ids: np.ndarray | None,
    out_dir: str | Path,
    *,
    batch_size: int = 64,
    shard: tuple[int, int] | None = None,
    num_parts: int | None = None,
    device: Any = None,
    dtype: Any = None,
    progress: bool = True,
    lm_loss: bool = False,
    checkpoint_every: int = 500,
    config: dict[str, Any] | None = None,
    trust_tokenizer: bool = False,
) -> Path:
    """Score ``ids`` (all training sequences when None) of ``pool`` into the sidecar directory ``out_dir``.

    ``shard=(i, n)`` computes only part ``i`` of ``n`` (under torchrun each rank takes part ``rank`` of ``world``
    by default); otherwise all ``num_parts`` parts (default: the split already in ``out_dir``, else 1). Finished
    parts are skipped. Returns ``out_dir``; it is complete (has a manifest) once every part exists.
    """
    if not isinstance(pool, TokenPool):
        pool = TokenPool(pool)
    ids = pool.ids(None) if ids is None else np.unique(np.asarray(ids, dtype=np.int64))
    if len(ids) == 0:
        raise LmselectError(f"{pool.path}: no sequences to score")
    if ids[0] < 0 or ids[-1] >= pool.n_sequences:
        raise LmselectError(f"{pool.path}: sequence ids out of range (pool has {pool.n_sequences})")
    model, meta, model_parents = model_and_meta(model_dir_or_scorer, lm_loss)
    check_vocab(meta, pool.tokenizer_fingerprint, pool.vocab_size, str(pool.path), trust=trust_tokenizer)
    if meta.get("max_positions") and pool.seq_len > int(meta["max_positions"]):
        raise LmselectError(f"{pool.path}: seq_len {pool.seq_len} exceeds the model's {meta['max_positions']} positions")
    job = ScoreJob(
        items=ids,
        fetch=lambda b: (pool.batch(b), None),  # read from the file, not the memmap (TokenPool.rows)
        key={"input": "pool", "pool_uuid": pool.manifest.get("uuid"), "ids_sha": _ids_digest(ids),
             "n_ids": int(len(ids)), "model": meta["path"], "score": meta["kind"]},
    )
    shards = sorted(int(s) for s in np.unique(pool.shard[ids]))
    cfg = config if config is not None else {"model": meta["path"], "pool": str(pool.path), "lm_loss": lm_loss,
                                               "batch_size": batch_size}
    return run_job(
        model, job, out_dir, batch_size=batch_size, shard=shard, num_parts=num_parts, device=device, dtype=dtype,
        progress=progress, checkpoint_every=checkpoint_every, config=cfg,
        parents=[parent_ref(pool.path)] + model_parents,
        counts={"pool_sequences": int(pool.n_sequences)},
        extra={"input": "pool", "pool": str(pool.path), "pool_shards": shards, "score": meta["kind"],
               "activation": meta.get("activation"), "model": meta["path"], "seq_len": pool.seq_len},
    )


