"""Score every sequence of a pool (or every window of a .jsonl file) with a score model: a sharded, resumable sidecar.

    lmselect score --model RUN/.../bilevel/score_model --pool POOL --pool-shard 1 --out scores/
    torchrun --nproc-per-node 8 -m lmselect.cli score --model M --pool POOL --out scores/   # one part per rank
    lmselect score --model M --pool POOL --shard 3/16 --out scores/                          # cluster array task 3
    lmselect score --model CKPT --lm-loss --jsonl docs.jsonl --tokenizer-from POOL --out scores/

Output (DESIGN "Scores sidecar"): ``part-{i:05d}-of-{n:05d}.parquet`` files (``seq_id`` int64, ``score`` float32;
jsonl input adds ``doc_id``, ``char_start``, ``char_end``), each written atomically, so a part's existence is its
completion marker. A rerun skips finished parts; inside a long part, progress is checkpointed every
``checkpoint_every`` batches to ``part-...parquet.partial`` so a killed part resumes where it stopped. When every
part exists, whichever process finishes last (or the next rerun) writes ``manifest.json`` (kind="scores").
The pool is only read, never rewritten.

The model is a :class:`~lmselect.models.scorer.SequenceScorer` directory (``scorer.json``), or, with ``--lm-loss``,
any HF causal-LM checkpoint, which then scores a sequence by its negative mean next-token cross-entropy.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
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
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    is_complete,
    parent_ref,
    read_json,
    read_manifest,
    write_manifest,
)
from lmselect.config import to_dict

log = logging.getLogger("lmselect.score")

PART_RE = re.compile(r"^part-(\d{5})-of-(\d{5})\.parquet$")
JOB_FILE = "job.json"  # identity of what is being scored; a rerun with other inputs into the same dir is refused
_META_KEY = b"lmselect"  # parquet schema-metadata key holding a part's timing record


# ----------------------------------------------------------------------------------------------------------------
# configuration


@dataclass
class ScoreConfig:
    """Resolved ``lmselect score`` configuration (saved as ``config.yaml`` and in the manifest)."""

    model: str = ""
    lm_loss: bool = False
    pool: str | None = None
    pool_shard: str = "all"  # "all" (every training shard), "val", "1" or "0,2"
    jsonl: str | None = None
    tokenizer_from: str | None = None
    seq_len: int | None = None  # jsonl windows; default: the scorer's (scorer.json) or the tokenizer pool's
    batch_size: int = 64
    shard: str | None = None  # "i/n": compute only part i of n (cluster arrays); torchrun ranks split further
    num_parts: int | None = None  # without --shard: how many parts to split the work into (default: existing, or 1)
    device: str = "auto"
    dtype: str = "auto"  # auto = bf16 autocast on GPU, float32 on CPU
    checkpoint_every: int = 500
    out: str = ""


def part_name(i: int, n: int) -> str:
    return f"part-{i:05d}-of-{n:05d}.parquet"


def partial_name(i: int, n: int) -> str:
    return part_name(i, n) + ".partial"


def split_part(items: np.ndarray, i: int, n: int) -> np.ndarray:
    """Part ``i`` of ``n``: contiguous, near-equal slices of the sorted items (contiguous = sequential memmap reads)."""
    return np.array_split(np.sort(np.asarray(items, dtype=np.int64)), n)[i]


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"3/16"`` -> (3, 16); one-line error naming ``--shard`` otherwise."""
    if text is None or text == "":
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise LmselectError(f"--shard must look like i/n (e.g. 0/4), got {text!r}")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise LmselectError(f"--shard {text}: need 0 <= i < n")
    return i, n


def dist_rank_world() -> tuple[int, int]:
    """(rank, world) from the torchrun environment; (0, 1) outside it."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0, 1
    return (rank, world) if world > 1 else (0, 1)


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


def resolve_device(device: str | torch.device | None) -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise LmselectError(f"--device: unknown device {device!r}") from None


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
        from lmselect.models.losses import token_ce

        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask).logits
        ce = token_ce(logits, input_ids)  # [B, L-1], float32
        if attention_mask is None:
            return -ce.mean(dim=1)
        m = attention_mask[:, 1:].to(ce.dtype)
        n = m.sum(dim=1)
        out = -(ce * m).sum(dim=1) / n.clamp_min(1)
        return torch.where(n > 0, out, torch.full_like(out, float("nan")))


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:200]


def load_scoring_model(path: str | Path, *, lm_loss: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Load a score model: a SequenceScorer dir (``scorer.json``; also a bilevel dir holding ``score_model/``), or
    with ``lm_loss`` an HF causal-LM checkpoint. Returns (module in eval mode, metadata)."""
    from lmselect.models.scorer import SequenceScorer

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
            raise LmselectError(f"{p}: score model does not load ({_first_line(e)})") from None
        meta = dict(getattr(model, "meta", {}) or {})
        meta.update(kind="scorer", path=str(p), vocab_size=int(model.lm.config.vocab_size),
                    max_positions=getattr(model.lm.config, "max_position_embeddings", None))
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
            raise LmselectError(f"{p}: not a loadable Hugging Face causal-LM checkpoint ({_first_line(e)})") from None
        meta = {"kind": "lm_loss", "path": str(p), "vocab_size": int(lm.config.vocab_size),
                "max_positions": getattr(lm.config, "max_position_embeddings", None)}
        with contextlib.suppress(ArtifactError):
            meta["tokenizer_fingerprint"] = read_manifest(p).get("extra", {}).get("tokenizer_fingerprint")
        return LMLossScorer(lm).eval(), meta
    raise LmselectError(f"{p}: neither a score model (scorer.json) nor a Hugging Face checkpoint (config.json)")


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


def _read_rows(tokens: np.ndarray, ids: np.ndarray) -> torch.Tensor:
    """Rows of the memmap as LongTensor; a contiguous id range is read as one slice (sequential I/O)."""
    if len(ids) and int(ids[-1]) - int(ids[0]) + 1 == len(ids) and np.all(np.diff(ids) == 1):
        arr = np.asarray(tokens[int(ids[0]) : int(ids[-1]) + 1], dtype=np.int64)
    else:
        arr = np.asarray(tokens[ids], dtype=np.int64)
    return torch.from_numpy(arr)


Fetch = Callable[[np.ndarray], "tuple[torch.Tensor, torch.Tensor | None]"]


@dataclass
class _Job:
    """What one scoring run computes: item ids, how to fetch their tokens, and extra output columns."""

    items: np.ndarray  # int64 seq ids (pool rows, or jsonl window indices)
    fetch: Fetch
    key: dict[str, Any]  # identity written to job.json
    extra_columns: Callable[[np.ndarray], dict[str, Any]] | None = None  # sorted ids -> columns
    order_key: np.ndarray | None = None  # processing order inside a part (jsonl: longest windows first)


# ----------------------------------------------------------------------------------------------------------------
# parts


def _write_table(path: Path, seq_ids: np.ndarray, scores: np.ndarray, extra: dict[str, Any] | None,
                 meta: dict[str, Any] | None) -> None:
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


def _load_partial(path: Path, expected_order: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Scores already computed for a prefix of ``expected_order`` (empty when the checkpoint does not match)."""
    import pyarrow.parquet as pq

    empty = (np.zeros(0, np.int64), np.zeros(0, np.float32), 0.0)
    if not path.is_file():
        return empty
    try:
        t = pq.read_table(path)
        ids = t.column("seq_id").to_numpy().astype(np.int64)
        sc = t.column("score").to_numpy().astype(np.float32)
        meta = json.loads((t.schema.metadata or {}).get(_META_KEY, b"{}"))
    except Exception as e:  # a corrupt checkpoint only costs recomputation
        log.warning("%s: unreadable progress checkpoint (%s); recomputing the part", path, _first_line(e))
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
    job: _Job,
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
    from tqdm.auto import tqdm

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
    bar = tqdm(total=len(order), initial=len(done_ids), unit="seq", unit_scale=True, dynamic_ncols=True,
               desc=f"score part {i}/{n}", disable=not progress, mininterval=1.0)
    try:
        for j, (b, (x, m)) in enumerate(_prefetching(job.fetch, batches, pin=device.type == "cuda"), start=1):
            got_ids.append(b)
            got_sc.append(forward_scores(model, x, m, device, amp_dtype))
            bar.update(len(b))
            if checkpoint_every > 0 and j % checkpoint_every == 0 and j < len(batches):
                # progress checkpoint of the processed prefix; the final part file replaces it
                _write_table(ppath, np.concatenate(got_ids), np.concatenate(got_sc), None,
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
        "host": os.uname().nodename, "rank": dist_rank_world()[0],
    }
    extra = job.extra_columns(ids) if job.extra_columns is not None else None
    _write_table(out_dir / part_name(i, n), ids, sc, extra, rec)
    with contextlib.suppress(FileNotFoundError):
        ppath.unlink()
    rate = len(ids) / seconds if seconds > 0 else float("inf")
    log.info("part %d/%d: %d sequences in %.2f s (%.1f sequences/s on %s)", i, n, len(ids), seconds, rate, device)
    return rec


def _part_meta(path: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    md = pq.read_schema(path).metadata or {}
    try:
        return json.loads(md.get(_META_KEY, b"{}"))
    except json.JSONDecodeError:
        return {}


def _check_job(out_dir: Path, key: dict[str, Any]) -> None:
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


def _finalize(out_dir: Path, n: int, n_items: int, *, config: dict[str, Any], parents: list[dict[str, str]],
              counts: dict[str, Any], extra: dict[str, Any]) -> bool:
    """Write the manifest once every part exists; True when the sidecar is complete."""
    import pyarrow.parquet as pq

    if is_complete(out_dir, "scores"):
        return True
    paths = [out_dir / part_name(i, n) for i in range(n)]
    if not all(p.is_file() for p in paths):
        return False
    metas = [_part_meta(p) for p in paths]
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
    man = Manifest(
        kind="scores", config=config, parents=parents,
        counts={"sequences": int(n_items), "parts": int(n), "nan_scores": int(len(scores) - len(finite)), **counts},
        timings=timings, extra={"n_parts": int(n), "parts": metas, **extra, **stats},
    )
    write_manifest(out_dir, man)
    log.info("scores complete: %s (%d sequences, %.1f sequences/s per process)", out_dir, n_items,
             timings["sequences_per_s"])
    return True


def _run_job(
    model: nn.Module,
    job: _Job,
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
    out = Path(out_dir)
    if batch_size < 1:
        raise LmselectError(f"--batch-size must be >= 1, got {batch_size}")
    if out.exists() and not out.is_dir():
        raise LmselectError(f"{out}: exists and is not a directory")
    if out.is_dir() and is_complete(out) and not is_complete(out, "scores"):
        raise LmselectError(f"{out}: holds a '{read_manifest(out).get('kind')}' artifact; choose another --out")
    rank, world = dist_rank_world()
    if shard is not None:
        i, n = shard
        if world > 1:  # a cluster-array task run with torchrun: split its part across the ranks
            i, n = i * world + rank, n * world
        mine = [i]
    elif world > 1:
        n, mine = world, [rank]
    else:
        n = num_parts or existing_split(out) or 1
        mine = list(range(n))
    have = existing_split(out)
    if have is not None and have != n:
        raise LmselectError(f"{out}: already split into {have} parts, this run asks for {n}; use --num-parts {have} "
                            "(or matching --shard) or a fresh --out")
    if n > max(1, len(job.items)):
        raise LmselectError(f"{out}: {n} parts for only {len(job.items)} sequences; use fewer parts")
    out.mkdir(parents=True, exist_ok=True)
    _check_job(out, {**job.key, "n_parts": n})
    atomic_write_text(out / "config.yaml", yaml.safe_dump(json.loads(json.dumps(config, default=str)), sort_keys=False))
    missing = [i for i in range(n) if not (out / part_name(i, n)).is_file()]
    if missing and (out / MANIFEST).exists():
        (out / MANIFEST).unlink()  # a part was deleted: the old manifest no longer describes the directory
    dev = resolve_device(device)
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
    if not _finalize(out, n, len(job.items), config=config, parents=parents, counts=counts, extra=extra):
        left = [i for i in range(n) if not (out / part_name(i, n)).is_file()]
        log.info("%s: waiting for part(s) %s of %d; the last to finish writes the manifest", out,
                 ", ".join(map(str, left[:10])) + (" ..." if len(left) > 10 else ""), n)
    return out


def _ids_digest(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.sort(ids).astype(np.int64)).tobytes()).hexdigest()[:16]


def _model_and_meta(model_dir_or_scorer: Any, lm_loss: bool) -> tuple[nn.Module, dict[str, Any], list[dict[str, str]]]:
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


def _check_vocab(meta: dict[str, Any], fingerprint: str | None, vocab_size: int, where: str) -> None:
    fp = meta.get("tokenizer_fingerprint")
    if fp and fingerprint and fp != fingerprint:
        raise LmselectError(f"tokenizer mismatch: model {meta['path']} and {where} use different tokenizers")
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
) -> Path:
    """Score ``ids`` (all training sequences when None) of ``pool`` into the sidecar directory ``out_dir``.

    ``shard=(i, n)`` computes only part ``i`` of ``n`` (under torchrun each rank takes part ``rank`` of ``world``
    by default); otherwise all ``num_parts`` parts (default: the split already in ``out_dir``, else 1). Finished
    parts are skipped. Returns ``out_dir``; it is complete (has a manifest) once every part exists.
    """
    from lmselect.data.pool import TokenPool

    if not isinstance(pool, TokenPool):
        pool = TokenPool(pool)
    ids = pool.ids(None) if ids is None else np.unique(np.asarray(ids, dtype=np.int64))
    if len(ids) == 0:
        raise LmselectError(f"{pool.path}: no sequences to score")
    if ids[0] < 0 or ids[-1] >= pool.n_sequences:
        raise LmselectError(f"{pool.path}: sequence ids out of range (pool has {pool.n_sequences})")
    model, meta, model_parents = _model_and_meta(model_dir_or_scorer, lm_loss)
    _check_vocab(meta, pool.tokenizer_fingerprint, pool.vocab_size, str(pool.path))
    if meta.get("max_positions") and pool.seq_len > int(meta["max_positions"]):
        raise LmselectError(f"{pool.path}: seq_len {pool.seq_len} exceeds the model's {meta['max_positions']} positions")
    tokens = pool.tokens
    job = _Job(
        items=ids,
        fetch=lambda b: (_read_rows(tokens, b), None),
        key={"input": "pool", "pool_uuid": pool.manifest.get("uuid"), "ids_sha": _ids_digest(ids),
             "n_ids": int(len(ids)), "model": meta["path"], "score": meta["kind"]},
    )
    shards = sorted(int(s) for s in np.unique(pool.shard[ids]))
    cfg = config if config is not None else {"model": meta["path"], "pool": str(pool.path), "lm_loss": lm_loss,
                                               "batch_size": batch_size}
    return _run_job(
        model, job, out_dir, batch_size=batch_size, shard=shard, num_parts=num_parts, device=device, dtype=dtype,
        progress=progress, checkpoint_every=checkpoint_every, config=cfg,
        parents=[parent_ref(pool.path)] + model_parents,
        counts={"pool_sequences": int(pool.n_sequences)},
        extra={"input": "pool", "pool": str(pool.path), "pool_shards": shards, "score": meta["kind"],
               "activation": meta.get("activation"), "model": meta["path"], "seq_len": pool.seq_len},
    )


def resolve_tokenizer_dir(path: str | Path) -> Path:
    """Tokenizer directory of a pool (``tokenizer/``), a score model (``backbone/``), a checkpoint, or itself."""
    p = Path(path)
    if not p.exists():
        raise LmselectError(f"{p}: --tokenizer-from directory not found")
    for c in (p / "tokenizer", p / "backbone", p / "score_model" / "backbone", p):
        if (c / "tokenizer.json").is_file() or (c / "tokenizer_config.json").is_file():
            return c
    raise LmselectError(f"{p}: no tokenizer found (looked for tokenizer/, backbone/ and tokenizer.json)")


def read_jsonl_texts(path: str | Path) -> list[tuple[str, str]]:
    """(doc_id, text) per record: ``doc_id`` = the record's ``id`` or its 1-based line number; blank lines skipped."""
    from lmselect.data.readers import iter_json_records

    out: list[tuple[str, str]] = []
    for lineno, rec in iter_json_records(path):
        if "text" not in rec:
            raise LmselectError(f"{path}:{lineno}: record has no 'text' field")
        if not isinstance(rec["text"], str):
            raise LmselectError(f"{path}:{lineno}: 'text' is not a string")
        doc_id = rec.get("id")
        out.append((str(doc_id) if doc_id is not None else str(lineno), rec["text"]))
    return out


@dataclass
class Windows:
    """Fixed-size token windows of documents, with their character spans in the source text."""

    tokens: np.ndarray  # flat int64
    start: np.ndarray  # offset of each window in ``tokens``
    length: np.ndarray
    doc_id: list[str]
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
    toks, starts, lens, dids, cs, ce = [], [], [], [], [], []
    pos, n_empty = 0, 0
    for c in range(0, len(docs), chunk):
        part = docs[c : c + chunk]
        enc = tokenizer([t for _, t in part], add_special_tokens=False, return_offsets_mapping=True)
        for (doc_id, _), ids, offs in zip(part, enc["input_ids"], enc["offset_mapping"]):
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
                cs.append(int(offs_a[w, 0]))
                ce.append(int(offs_a[w + k - 1, 1]))
            pos += len(ids_a)
    return Windows(
        tokens=np.concatenate(toks) if toks else np.zeros(0, np.int64),
        start=np.asarray(starts, dtype=np.int64), length=np.asarray(lens, dtype=np.int64), doc_id=dids,
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
) -> Path:
    """Score every ``seq_len``-token window of each record's ``text``; rows carry ``doc_id``, ``char_start``,
    ``char_end`` (``seq_id`` = window number in file order). Same sharding / resume behaviour as :func:`score_pool`."""
    from lmselect.data.pool import TokenPool
    from lmselect.data.tokenizer import load_tokenizer, tokenizer_fingerprint

    jsonl = Path(jsonl)
    docs = read_jsonl_texts(jsonl)
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
             "seq_len": seq_len, "model": meta["path"], "score": meta["kind"]},
        extra_columns=lambda ids: {"doc_id": doc_ids[ids].tolist(), "char_start": win.char_start[ids],
                                   "char_end": win.char_end[ids]},
        order_key=-win.length,  # longest first: short tail windows batch together, so little padding
    )
    cfg = config if config is not None else {"model": meta["path"], "jsonl": str(jsonl),
                                               "tokenizer_from": str(tokenizer_from), "seq_len": seq_len,
                                               "lm_loss": lm_loss, "batch_size": batch_size}
    return _run_job(
        model, job, out_dir, batch_size=batch_size, shard=shard, num_parts=num_parts, device=device, dtype=dtype,
        progress=progress, checkpoint_every=checkpoint_every, config=cfg, parents=parents,
        counts={"documents": win.n_docs, "empty_documents": win.n_empty, "windows": int(len(win.length))},
        extra={"input": "jsonl", "jsonl": str(jsonl), "tokenizer": str(tok_dir), "seq_len": seq_len,
               "score": meta["kind"], "activation": meta.get("activation"), "model": meta["path"]},
    )


def _parts_of(scores_dir: Path) -> list[Path]:
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
    paths = _parts_of(d)
    cols = None if columns is None else list(dict.fromkeys(["seq_id", *columns]))
    try:
        t = pa.concat_tables([pq.read_table(p, columns=cols) for p in paths])
    except (KeyError, pa.ArrowInvalid) as e:
        raise ArtifactError(f"{d}: unreadable scores part ({_first_line(e)})") from None
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
) -> Path:
    """Write already-computed scores as a complete one-part sidecar (atomically), e.g. MATES predictions."""
    seq_ids = np.asarray(seq_ids, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float32)
    if seq_ids.shape != scores.shape or seq_ids.ndim != 1:
        raise LmselectError(f"{out_dir}: seq_ids and scores must be 1-D arrays of one length")
    if len(np.unique(seq_ids)) != len(seq_ids):
        raise LmselectError(f"{out_dir}: duplicate seq_ids")
    order = np.argsort(seq_ids, kind="stable")
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        _write_table(tmp / part_name(0, 1), seq_ids[order], scores[order], None,
                     {"part": 0, "of": 1, "sequences": int(len(seq_ids))})
        write_manifest(tmp, Manifest(kind="scores", config=config or {}, parents=parents or [],
                                     counts={"sequences": int(len(seq_ids)), "parts": 1, **(counts or {})},
                                     extra={"n_parts": 1, "input": "pool", **(extra or {})}))
    return Path(out_dir)


# ----------------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", required=True, help="score model dir (scorer.json), or an HF checkpoint with --lm-loss")
    g.add_argument("--lm-loss", action="store_true", help="score = -(mean next-token cross-entropy) of a causal LM")
    g = parser.add_argument_group("input (one of)")
    g.add_argument("--pool", help="token pool directory")
    g.add_argument("--pool-shard", default="all", help="pool shard(s) to score: all (training shards), val, 1, 0,2")
    g.add_argument("--jsonl", help="raw .jsonl file with a 'text' field per record (optional 'id')")
    g.add_argument("--tokenizer-from", help="pool or model dir whose tokenizer encodes the --jsonl text")
    g.add_argument("--seq-len", type=int, help="--jsonl window length in tokens (default: scorer's / pool's)")
    g = parser.add_argument_group("execution")
    g.add_argument("--out", required=True, help="output sidecar directory")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--shard", help="i/n: compute only part i of n (cluster arrays); torchrun ranks split it further")
    g.add_argument("--num-parts", type=int, help="split into this many parts (default: existing split, or 1)")
    g.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda:0")
    g.add_argument("--dtype", default="auto", help="autocast dtype: auto (bf16 on GPU), float32, bfloat16, float16")
    g.add_argument("--checkpoint-every", type=int, default=500, help="save in-part progress every M batches (0: off)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def pool_ids(pool: Any, spec: str) -> np.ndarray:
    spec = str(spec).strip()
    if spec in ("", "all"):
        return pool.ids(None)
    out = []
    for s in spec.split(","):
        s = s.strip()
        if s == "val":
            out.append(pool.ids("val"))
            continue
        try:
            k = int(s)
        except ValueError:
            raise LmselectError(f"--pool-shard: expected all, val or shard numbers like 0,2; got {spec!r}") from None
        if not (k == -1 or 0 <= k < pool.n_shards):
            raise LmselectError(f"--pool-shard {k}: {pool.path} has shards 0..{pool.n_shards - 1} (and val)")
        out.append(pool.ids(k))
    ids = np.unique(np.concatenate(out)) if out else np.zeros(0, np.int64)
    if len(ids) == 0:
        raise LmselectError(f"--pool-shard {spec}: no sequences in {pool.path}")
    return ids


def run(args: argparse.Namespace) -> int:
    from lmselect.config import load_config
    from lmselect.data.pool import TokenPool

    base = {f.name: getattr(args, f.name) for f in dataclasses.fields(ScoreConfig) if hasattr(args, f.name)}
    cfg = load_config(ScoreConfig, None, getattr(args, "overrides", []) or [], base=base)
    if (cfg.pool is None) == (cfg.jsonl is None):
        raise LmselectError("give exactly one input: --pool POOL or --jsonl FILE")
    if cfg.jsonl is not None and cfg.tokenizer_from is None:
        raise LmselectError("--jsonl needs --tokenizer-from POOL_OR_MODEL_DIR")
    shard = parse_shard(cfg.shard)
    if cfg.num_parts is not None and cfg.num_parts < 1:
        raise LmselectError(f"--num-parts must be >= 1, got {cfg.num_parts}")
    progress = not args.no_progress and dist_rank_world()[0] == 0
    common = dict(batch_size=cfg.batch_size, shard=shard, num_parts=cfg.num_parts, device=cfg.device,
                  dtype=cfg.dtype, progress=progress, lm_loss=cfg.lm_loss, checkpoint_every=cfg.checkpoint_every,
                  config=to_dict(cfg))
    if cfg.pool is not None:
        pool = TokenPool(cfg.pool)
        out = score_pool(cfg.model, pool, pool_ids(pool, cfg.pool_shard), cfg.out, **common)
    else:
        out = score_jsonl(cfg.model, cfg.jsonl, cfg.tokenizer_from, cfg.out, seq_len=cfg.seq_len, **common)
    if is_complete(out, "scores"):
        m = read_manifest(out)
        print(f"scores: {out} ({m['counts']['sequences']} sequences, "
              f"{m['timings'].get('sequences_per_s', 0):.1f} sequences/s per process)")
    else:
        print(f"scores: {out} (this process's part(s) done; the manifest follows when every part exists)")
    return 0
