"""One BLISS round's solve (``solve_round``): the seeded training stream the solver draws from, the per-step log,
solver-state checkpoints and resume, and at the end ``diagnostics.json`` (``summarise_diagnostics``), the score model
and the ``bilevel`` manifest."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lmselect.artifacts import (
    LmselectError,
    Manifest,
    atomic_path,
    atomic_write_text,
    is_complete,
    save_config,
    write_manifest,
)
from lmselect.config import to_dict
from lmselect.data.tokenizer import as_fingerprint
from lmselect.data.valset import ValidationSet
from lmselect.log import MetricLogger, Progress, log, read_jsonl
from lmselect.models.scorer import SequenceScorer
from lmselect.select.bliss.config import (
    FIRST_ORDER_COS,
    FIRST_ORDER_HZ,
    NOISY_V_SIGNAL,
    SEED_TRAIN_STREAM,
    BlissConfig,
    resolve_profile,
)
from lmselect.select.bliss.solver import BilevelSolver
from lmselect.train.distributed import is_distributed
from lmselect.train.loop import PreemptionGuard
from lmselect.train.order import IndexStream

STATE_FILE = "solver_state.pt"
LOG_FILE = "bilevel_log.jsonl"
DIAG_FILE = "diagnostics.json"
SCORE_MODEL_DIR = "score_model"


DIAG_KEYS = ("cos_zv", "hz_ratio", "z_residual", "z_steps_used", "v_agreement", "v_signal", "c_source_share",
             "c_source_share_null", "weight_ratio", "weight_max_b", "z_norm", "v_norm", "c_std")


def summarise_diagnostics(records: Sequence[dict[str, Any]], c_by_source: dict[str, list[float]],
                          cfg: BlissConfig) -> dict[str, Any]:
    """diagnostics.json of one round: mean / first / last / n of every diagnostic in the per-step log, the mean c and
    mean standardised c per source, and the ``warnings`` (one sentence each) when the solve is effectively
    first-order or v is noise-dominated (thresholds FIRST_ORDER_COS, FIRST_ORDER_HZ, NOISY_V_SIGNAL)."""
    summary: dict[str, dict[str, float]] = {}
    for k in DIAG_KEYS:
        vals = [float(r[k]) for r in records if isinstance(r.get(k), (int, float)) and math.isfinite(float(r[k]))]
        if vals:
            summary[k] = {"mean": float(np.mean(vals)), "first": vals[0], "last": vals[-1], "n": len(vals)}
    warnings: list[str] = []
    mean = {k: v["mean"] for k, v in summary.items()}
    if mean.get("cos_zv", 0.0) > FIRST_ORDER_COS and mean.get("hz_ratio", 0.0) < FIRST_ORDER_HZ:
        hz = f", ||Hz||/||v|| = {mean['hz_ratio']:.3g}" if "hz_ratio" in mean else " (||Hz|| not measured)"
        warnings.append(f"the z solve is effectively first-order (cos(z, v) = {mean['cos_zv']:.4f}{hz}): c_i is a "
                        "plain gradient dot product <grad CE_i, v>; the Hessian plays no part (raise z_steps / z_lr, "
                        "z_warm_start, z_tol)")
    if "v_signal" in mean and mean["v_signal"] < NOISY_V_SIGNAL:
        warnings.append(f"v is noise-dominated: two independent validation batches agree at cos "
                        f"{mean['v_agreement']:.3f}, estimated cos(v, E v) = {mean['v_signal']:.3f} (objective "
                        f"{cfg.objective}; try objective=all_tokens or mix, val_batch_size=0, v_ema)")
    by_source = {src: {"n": int(a[0]), "mean_c": a[1] / a[0], "mean_c_std": a[2] / a[0]}
                 for src, a in sorted(c_by_source.items()) if a[0] > 0}
    return {"summary": summary, "warnings": warnings, "c_by_source": by_source,
            "options": {k: getattr(cfg, k) for k in ("profile", "objective", "objective_mix", "z_warm_start", "z_tol",
                                                     "z_max_steps", "z_steps", "v_ema", "val_batch_size",
                                                     "c_normalize", "hyper_batches", "score_activation",
                                                     "z_init", "z_clip_mode", "weight_decay_1d", "outer_batch",
                                                     "schedule", "score_head_init", "softmax_normaliser")}}


def train_stream(cfg: BlissConfig, n: int, rank: int = 0, world: int = 1) -> IndexStream:
    """The seeded order in which a round's ``n`` candidates feed the solver (this rank's rows of each batch)."""
    return IndexStream(n, cfg.batch_size, cfg.seed + SEED_TRAIN_STREAM, rank, world)


def batches_per_step(cfg: BlissConfig) -> int:
    """Training batches one outer step draws: K inner, one outer, one per hyper batch."""
    return cfg.inner_steps + 1 + int(cfg.hyper_batches)


def train_batch_indices(cfg: BlissConfig, step: int) -> list[int]:
    """Stream batch indices (``IndexStream.batch(k)``) of outer step ``step``, in the order ``outer_step`` draws them:
    K inner, the outer batch, the hyper batches.

    ``outer_batch: fresh``: consecutive, batches_per_step per step. ``released``: the released code's two cursors
    on one loader (bilevel_selection.py:392-403): the inner cursor reads t·K … t·K+K−1, the outer cursor stream
    batch t, so for K = 1 the outer batch is the batch just trained on and for K > 1 it was trained on ~t·(K−1)
    steps earlier. Hyper batches (not in the released code) continue the outer cursor, which then advances
    1 + hyper_batches per step (the outer batch of step t is t·(1 + hyper_batches))."""
    r = resolve_profile(cfg)
    k, h = r.inner_steps, int(r.hyper_batches)
    if r.outer_batch == "released":
        return [step * k + i for i in range(k)] + [step * (1 + h) + j for j in range(1 + h)]
    first = step * (k + 1 + h)
    return list(range(first, first + k + 1 + h))


def distinct_batches(cfg: BlissConfig, steps: int) -> int:
    """How many distinct stream batches ``steps`` outer steps read (the released pattern re-reads batches)."""
    r = resolve_profile(cfg)
    if steps <= 0:
        return 0
    if r.outer_batch == "released":
        return steps * max(r.inner_steps, 1 + int(r.hyper_batches))
    return steps * batches_per_step(r)


def step_batches(pool: Any, train_ids: np.ndarray, stream: IndexStream, cfg: BlissConfig, step: int) -> Iterator[Tensor]:
    """The batches of outer step ``step`` (and on), as :meth:`BilevelSolver.outer_step` draws them
    (:func:`train_batch_indices`; a batch read twice in a row, the released pattern at K = 1, is read once)."""
    last: tuple[int, Tensor] | None = None
    while True:
        for k in train_batch_indices(cfg, step):
            if last is None or last[0] != k:
                last = (k, pool.batch(train_ids[stream.batch(k)]))
            yield last[1]
        step += 1


def _save_state(solver: BilevelSolver, out_dir: Path) -> None:
    if solver.rank == 0:
        with atomic_path(out_dir / STATE_FILE) as tmp:
            torch.save(solver.state_dict(), tmp)
    if is_distributed():
        torch.distributed.barrier()


def solve_round(
    cfg: BlissConfig,
    proxy: nn.Module,
    target: nn.Module,
    scorer: SequenceScorer,
    train_ids: np.ndarray,
    pool: Any,
    valset: ValidationSet,
    out_dir: str | Path,
    *,
    device: torch.device | str | None = None,
    proxy_tokenizer: Any = None,
    target_tokenizer: Any = None,
    parents: list[dict[str, str]] | None = None,
    stop_after: int | None = None,
    progress: bool = True,
) -> SequenceScorer:
    """Run the bilevel solver for ``cfg.outer_steps`` on batches of ``pool.batch(ids)`` from ``train_ids``.

    Writes ``out_dir/bilevel_log.jsonl`` (one record per outer step), ``out_dir/score_model/`` and, last,
    ``manifest.json`` (kind="bilevel"). Solver state (proxy + scorer weights, both optimizers and schedules, step,
    RNG) goes to ``out_dir/solver_state.pt`` every ``cfg.save_every`` steps; a rerun continues from it. If the
    artifact is already complete, the saved score model is loaded into ``scorer`` and returned without compute.
    ``stop_after``: return (state saved, no manifest) once this many outer steps are done — for time-sliced jobs.
    ``proxy_tokenizer``: defaults to the pool's tokenizer fingerprint (the proxy was trained on the pool).
    """
    out_dir = Path(out_dir)
    if is_complete(out_dir, "bilevel"):
        loaded = SequenceScorer.load(out_dir / SCORE_MODEL_DIR)
        scorer.load_state_dict(loaded.state_dict())
        return scorer
    cfg = resolve_profile(cfg)  # the artifact records the options that actually ran
    if proxy_tokenizer is None and getattr(pool, "tokenizer_fingerprint", ""):
        proxy_tokenizer = pool.tokenizer_fingerprint
    if target_tokenizer is not None and getattr(pool, "tokenizer_fingerprint", ""):
        fp_t = as_fingerprint(target_tokenizer)
        if fp_t != pool.tokenizer_fingerprint:
            raise LmselectError(f"tokenizer mismatch: target ({fp_t}) and pool {pool.path} ({pool.tokenizer_fingerprint})")
    train_ids = np.asarray(train_ids, dtype=np.int64)
    solver = BilevelSolver(cfg, proxy, target, scorer, valset, device,
                           proxy_tokenizer=proxy_tokenizer, target_tokenizer=target_tokenizer)
    if int(train_ids.max(initial=-1)) >= 0 and pool.vocab_size > proxy.get_input_embeddings().weight.shape[0]:
        raise LmselectError(f"pool {pool.path} has {pool.vocab_size} token ids, the proxy only {proxy.get_input_embeddings().weight.shape[0]}")
    if len(train_ids) < cfg.batch_size:
        raise LmselectError(f"bliss: {len(train_ids)} training sequences are fewer than one batch of {cfg.batch_size}")
    rank, world = solver.rank, solver.world
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / STATE_FILE
    if state_path.is_file():
        solver.load_state_dict(torch.load(state_path, map_location=solver.device, weights_only=False))
        if rank == 0:  # drop log records written after the last checkpoint (a crash between saves)
            keep = [r for r in read_jsonl(out_dir / LOG_FILE) if int(r.get("step", 0)) <= solver.step]
            atomic_write_text(out_dir / LOG_FILE, "".join(json.dumps(r) + "\n" for r in keep))
    elif rank == 0:
        (out_dir / LOG_FILE).unlink(missing_ok=True)
        (out_dir / "manifest.json").unlink(missing_ok=True)
    if rank == 0:
        save_config(cfg, out_dir / "config.yaml")

    stream = train_stream(cfg, len(train_ids), rank, world)

    has_sources = callable(getattr(pool, "sources", None))

    def outer_sources(step: int) -> list[str] | None:
        """Sources of the global outer batch of outer step ``step`` (the one after its K inner batches)."""
        if not has_sources:
            return None
        k = train_batch_indices(cfg, step)[cfg.inner_steps]
        return [str(x) for x in pool.sources(train_ids[stream.global_rows(k)])]

    logger = MetricLogger(out_dir / LOG_FILE if rank == 0 else None, stdout_every=cfg.log_every, prefix="bliss ")

    bar = Progress(cfg.outer_steps, initial=solver.step, desc="bliss", unit="outer step", enabled=progress and rank == 0)
    last: dict[str, float] = {}
    # preemption (train.loop.PreemptionGuard): besides save_every, the state is saved when SIGTERM arrives (then the
    # solve stops in one line) and at least every $LMSELECT_CHECKPOINT_EVERY_S seconds; ranks agree every outer step
    guard = PreemptionGuard().__enter__()
    terminated = False
    try:
        while solver.step < cfg.outer_steps:
            last = solver.outer_step(step_batches(pool, train_ids, stream, cfg, solver.step), outer_sources(solver.step))
            logger.log(solver.step, **last)
            bar.update(1, F=last["upper_loss"], G=last["lower_loss"])
            stopping = stop_after is not None and solver.step >= stop_after and solver.step < cfg.outer_steps
            terminated, due = guard.check(is_distributed(), solver.device)
            terminated = terminated and solver.step < cfg.outer_steps
            if solver.step % max(1, cfg.save_every) == 0 or stopping or terminated or due:
                _save_state(solver, out_dir)
                guard.saved()
            if stopping:
                return scorer
            if terminated:
                break
    finally:
        guard.__exit__()
        bar.close()
        logger.close()
    if terminated:
        log.warning("bliss %s: stopped at outer step %d of %d; rerun the same command to resume from there",
                    out_dir, solver.step, cfg.outer_steps)
        guard.stop_now()
        raise KeyboardInterrupt  # the previous SIGTERM handler did not stop the process: stop anyway

    if rank == 0:
        diagnostics = summarise_diagnostics(read_jsonl(out_dir / LOG_FILE), solver.c_by_source, cfg)
        if diagnostics["warnings"]:  # one line per round
            log.warning("bliss %s: %s", out_dir, "; ".join(diagnostics["warnings"]))
        atomic_write_text(out_dir / DIAG_FILE, json.dumps(diagnostics, indent=2) + "\n")
        scorer.save_pretrained(out_dir / SCORE_MODEL_DIR, extra={"tokenizer_fingerprint": getattr(pool, "tokenizer_fingerprint", "")})
        write_manifest(out_dir, Manifest(
            kind="bilevel", config=to_dict(cfg), seed=cfg.seed, parents=parents or [],
            counts={"outer_steps": solver.step, "train_candidates": int(len(train_ids)),
                    "sequences_seen": int(distinct_batches(cfg, solver.step) * cfg.batch_size)},
            timings={"solve_s": solver.elapsed},
            extra={"hypergrad_impl": solver.impl, "world_size": world, "final": last,
                   "tokenizer_fingerprint": getattr(pool, "tokenizer_fingerprint", ""),
                   "diagnostics": {k: v for k, v in diagnostics.items() if k != "c_by_source"}},
        ))
        state_path.unlink(missing_ok=True)  # the manifest marks completion; the large state is no longer needed
    if is_distributed():
        torch.distributed.barrier()
    return scorer
