"""The pretraining loop: ``train(cfg, pool, ids, out_dir)``.

One optimizer step = one global batch of ``global_batch`` sequences. Each of the ``world_size`` ranks takes its own
contiguous slice of the global batch and feeds it in ``accum`` micro-batches of ``micro_batch`` sequences, so
global_batch = micro_batch · accum · world_size, and the union over ranks is exactly the single-process batch.

Data order: epoch e is ``permutation(ids)`` under seed ``cfg.seed + e``, consumed in order; the position (epoch,
offset) is part of the training state, so a resumed run sees exactly the batches the uninterrupted run would have.

Loss: plain training averages the per-token CE [B, L-1] of each micro-batch; micro-batch losses are averaged over
accumulation steps and ranks. With a token selector (RHO-1, BLADE; train/hooks.py) a no-grad scoring pass over all
micro-batches collects the selector's per-token scores, the top-k is taken over the whole global batch (all ranks,
ties by global position), and the loss is Σ kept CE / (kept tokens of the global batch): the gradient is that of the
one-process full batch, whatever the micro-batch size or world size.

``optimizer: lordo`` (train/lordo.py, METHODS §5): the model is not wrapped in DDP, each rank steps on its own slice,
and ``optimizer.maybe_sync(step)`` averages the parameters every ``lordo.sync_every`` steps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch

from lmselect.artifacts import LmselectError, atomic_write_text, parent_ref, read_manifest, save_config
from lmselect.config import replace, to_dict
from lmselect.data.pool import TokenPool
from lmselect.log import MetricLogger, Progress, read_jsonl
from lmselect.models.losses import token_ce
from lmselect.models.presets import build_model, count_params, flops_per_token, get_preset
from lmselect.train import checkpoint as ckpt_io
from lmselect.train import distributed as D
from lmselect.train.hooks import TokenSelector, runs_scoring_forward, topk_token_mask
from lmselect.train.lordo import LordoConfig, LordoOptimizer
from lmselect.train.order import DataOrder
from lmselect.train.schedules import OptimConfig, apply_hparams, build_optimizer, lr_at, validate_schedule

log = logging.getLogger("lmselect.train")

SIDE_STREAM_TAG = 1  # next_batch() draws use the seed sequence [seed, SIDE_STREAM_TAG, rank, draw]
# Preemption safety in every recipe, whatever its save_every: a checkpoint at least this often (wall seconds; the
# environment variable overrides it, 0 = at every check), and one when SIGTERM arrives. Not a config key: when a
# run checkpoints does not change what it computes (resume is exact), so it is not part of any stage's identity.
CHECKPOINT_EVERY_S_ENV = "LMSELECT_CHECKPOINT_EVERY_S"
DEFAULT_CHECKPOINT_EVERY_S = 600.0


def checkpoint_every_s() -> float:
    """The wall-clock checkpoint interval: ``$LMSELECT_CHECKPOINT_EVERY_S`` or 600 s (one line naming the variable
    when it is not a number)."""
    raw = os.environ.get(CHECKPOINT_EVERY_S_ENV, "").strip()
    if not raw:
        return DEFAULT_CHECKPOINT_EVERY_S
    try:
        v = float(raw)
    except ValueError:
        raise LmselectError(f"${CHECKPOINT_EVERY_S_ENV}={raw!r}: expected seconds (a number)") from None
    if not v >= 0:
        raise LmselectError(f"${CHECKPOINT_EVERY_S_ENV}={raw!r}: must be >= 0")
    return v


class DeferredSigterm:
    """While the loop runs, SIGTERM (Slurm's time limit or preemption, torchrun stopping the ranks) only asks for a
    stop: the loop finishes its step, writes a checkpoint, and then hands the signal to the previous handler (the
    CLI's raises ``Terminated``: one line, exit 143), so a requeued job resumes at that step rather than at the last
    periodic checkpoint. A second SIGTERM acts at once. Outside the main thread, or where SIGTERM is ignored, nothing
    changes."""

    def __init__(self) -> None:
        self.requested = False
        self.prev: Any = None
        self.installed = False

    def install(self) -> DeferredSigterm:
        try:
            prev = signal.getsignal(signal.SIGTERM)
            if prev is not signal.SIG_IGN and prev is not None:
                self.prev = signal.signal(signal.SIGTERM, self._on)
                self.installed = True
        except ValueError:  # not the main thread: an embedding application's signals are its own
            pass
        return self

    def _on(self, signum: int, frame: Any) -> None:
        if self.requested:  # asked twice: do not wait for the step
            self.stop_now()
            return
        self.requested = True
        log.warning("SIGTERM: finishing this step and writing a checkpoint before stopping")

    def release(self) -> None:
        if self.installed:
            signal.signal(signal.SIGTERM, self.prev)
            self.installed = False

    def stop_now(self) -> None:
        """Hand SIGTERM to the previous handler (raises ``Terminated`` under the CLI; the default action ends the
        process)."""
        self.release()
        signal.raise_signal(signal.SIGTERM)


class PreemptionGuard:
    """The preemption rule of every long loop (the training loop, the BLISS bilevel solve): a checkpoint when
    SIGTERM arrived (:class:`DeferredSigterm`) or the wall-clock interval (:func:`checkpoint_every_s`) is up.
    ``check(distributed, device)`` -> (stop, due); under a process group every rank takes the same decision (an
    all-reduce: any rank asking decides), so it must be called at the same step on every rank."""

    def __init__(self) -> None:
        self.term = DeferredSigterm()
        self.every_s = checkpoint_every_s()
        self.t_saved = time.monotonic()

    def __enter__(self) -> PreemptionGuard:
        self.term.install()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.term.release()

    def check(self, distributed: bool, device: Any = "cpu") -> tuple[bool, bool]:
        due = self.every_s == 0 or time.monotonic() - self.t_saved >= self.every_s
        stop = self.term.requested
        if distributed:
            flags = torch.tensor([float(stop), float(due)], device=device)
            torch.distributed.all_reduce(flags)
            stop, due = bool(flags[0] > 0), bool(flags[1] > 0)
        return stop, due

    def saved(self) -> None:
        self.t_saved = time.monotonic()

    def stop_now(self) -> None:
        self.term.stop_now()

    def checkpoint(self, save: Callable[[], Any], stopped: Callable[[], str]) -> None:
        """The rule after one unit of single-process work (a MATES probe chunk, an influence-model or reference
        step): ``save()`` when SIGTERM arrived or the interval is up; after a SIGTERM, then stop: one warning
        ``stopped()`` + "; rerun the same command to resume from there", and the previous handler acts (the CLI's
        raises ``Terminated``, exit 143), else ``KeyboardInterrupt``."""
        stop, due = self.check(False)
        if stop or due:
            save()
            self.saved()
        if stop:
            log.warning("%s; rerun the same command to resume from there", stopped())
            self.stop_now()
            raise KeyboardInterrupt  # the previous handler did not stop the process (it ignores SIGTERM)


@dataclass
class TrainConfig:
    preset: str = "debug"
    steps: int = 100
    tokens: int | None = None  # when set, steps = ceil(tokens / (global_batch * seq_len)) and `steps` is ignored
    global_batch: int = 32  # sequences per optimizer step, all ranks together
    micro_batch: int = 8  # sequences per forward pass on one device; accumulation = global / (micro · world)
    optim: OptimConfig = field(default_factory=OptimConfig)
    optimizer: Literal["adamw", "lordo"] = "adamw"  # lordo: local steps, parameters averaged every lordo.sync_every
    lordo: LordoConfig = field(default_factory=LordoConfig)  # METHODS §5; train/lordo.py documents every key
    seed: int = 0  # model init = seed; epoch e's data order = seed + e
    log_every: int = 10
    save_every: int = 0  # periodic checkpoints (for resume); 0 = only the final one
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    device: str = "auto"
    compile: bool = False
    attn: str = "sdpa"
    backends: list[str] = field(default_factory=list)  # extra loggers: tensorboard, wandb
    fsdp: bool = False  # FSDP2 (fully_shard) instead of DDP when world size > 1
    continue_optimizer: bool = False  # with init_from: also continue its AdamW moments (multi-round target)
    peak_tflops: float | None = None  # bf16 dense peak per GPU for MFU; None = look the GPU up


# ----------------------------------------------------------------------------------------------------------------
# pieces of the loop (also used by bench/train_throughput.py)


def resolve_steps(cfg: TrainConfig, seq_len: int) -> int:
    if cfg.tokens is not None:
        return max(1, math.ceil(cfg.tokens / (cfg.global_batch * seq_len)))
    if cfg.steps <= 0:
        raise LmselectError(f"steps must be > 0, got {cfg.steps}")
    return cfg.steps


def grad_accum_steps(cfg: TrainConfig, world_size: int) -> int:
    per_step = cfg.micro_batch * world_size
    if cfg.micro_batch <= 0 or cfg.global_batch <= 0 or cfg.global_batch % per_step:
        raise LmselectError(
            f"global_batch ({cfg.global_batch}) must be a positive multiple of micro_batch ({cfg.micro_batch}) "
            f"x world size ({world_size}) = {per_step}"
        )
    return cfg.global_batch // per_step


def autocast_context(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast (weights and optimizer stay fp32) on CUDA by default or when asked; plain fp32 otherwise."""
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward_ce(model: torch.nn.Module, x: torch.Tensor, autocast: Callable[[], contextlib.AbstractContextManager]) -> torch.Tensor:
    """Per-token CE [B, L-1] (fp32) of one micro-batch; with an autograd graph unless called under no_grad."""
    with autocast():
        logits = model(input_ids=x).logits
    return token_ce(logits, x)


def backward_loss(
    ce: torch.Tensor, accum: int, mask: torch.Tensor | None = None, n_kept: int = 0, world: int = 1
) -> torch.Tensor:
    """Backward of one micro-batch's loss; returns it (detached), scaled so that its mean over the ``accum``
    micro-batches and ``world`` ranks is the step's loss.

    Plain (``mask`` None): the micro-batch's mean CE. Masked: Σ kept CE · accum · world / ``n_kept``, where ``n_kept``
    counts the kept tokens of everything the mask was taken over; ``world`` is the number of ranks whose gradients
    DDP / FSDP average (1 under LoRDO, whose workers step on their own slices).
    """
    loss = ce.mean() if mask is None else (ce * mask).sum() * (accum * world / max(n_kept, 1))
    (loss / accum).backward()  # accumulated gradients = mean over micro-batches (and DDP's mean over ranks)
    return loss.detach()


def micro_step(
    model: torch.nn.Module, x: torch.Tensor, accum: int, autocast: Callable[[], contextlib.AbstractContextManager]
) -> torch.Tensor:
    """Forward + backward of one plain micro-batch (every token counts); returns its (detached) mean loss."""
    return backward_loss(forward_ce(model, x, autocast), accum)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on ``device``. On CUDA through pinned memory, so the copy is queued without stalling the host: from
    pageable memory ``non_blocking`` is a staged, synchronous copy that makes the host wait for the GPU to drain
    before it can launch the next step's kernels. Elsewhere a plain ``.to``."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def gather_rows(x: torch.Tensor, info: D.DistInfo) -> torch.Tensor:
    """Concatenation over ranks of each rank's ``x`` (same shape everywhere), in rank order = global-batch order."""
    return D.all_gather_cat(x) if info.enabled else x


def selected_step(
    model: torch.nn.Module,
    xs: list[torch.Tensor],
    selector: TokenSelector,
    autocast: Callable[[], contextlib.AbstractContextManager],
    info: D.DistInfo,
    global_ranks: bool = True,
) -> torch.Tensor:
    """Forward + backward of one step's micro-batches ``xs`` (this rank's share) under the global top-k token mask.

    ``global_ranks``: the top-k runs over all ranks' tokens (DDP / FSDP); False (LoRDO) over this rank's only.
    Returns the sum of the micro-batch losses as :func:`backward_loss` scales them.
    """
    accum = len(xs)
    ranks = global_ranks and info.enabled
    world = info.world_size if ranks else 1
    sync = lambda i: D.grad_sync(model, enabled=i == accum - 1)  # noqa: E731  all-reduce once, on the last micro-step

    def global_mask(scores: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
        local = torch.cat(scores)  # [rows of this rank, L-1]
        full = gather_rows(local, info) if ranks else local
        mask = topk_token_mask(full, selector.keep_fraction)
        selector.on_mask(mask)
        start = info.rank * local.shape[0] if ranks else 0
        mine = mask[start : start + local.shape[0]].split([x.shape[0] for x in xs])
        return list(mine), int(mask.sum())

    if accum == 1:  # the grad forward doubles as the scoring pass
        with sync(0):
            ce = forward_ce(model, xs[0], autocast)
            (mask,), n_kept = global_mask([selector.token_scores(xs[0], ce.detach()).float()])
            return backward_loss(ce, 1, mask, n_kept, world)
    with torch.no_grad():
        if runs_scoring_forward(selector, accum):
            scores = [selector.token_scores(x, forward_ce(model, x, autocast)).float() for x in xs]
        else:  # the mask does not depend on the CE: no scoring forward (zeros of the CE's shape in its place)
            scores = [selector.token_scores(x, torch.zeros(x.shape[0], x.shape[1] - 1, device=x.device)).float()
                      for x in xs]
    masks, n_kept = global_mask(scores)
    total = torch.zeros((), device=xs[0].device)
    for i, (x, m) in enumerate(zip(xs, masks)):
        with sync(i):
            total += backward_loss(forward_ce(model, x, autocast), accum, m, n_kept, world)
    return total


def clip_grads(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global grad norm (no-op when max_norm <= 0) and return the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2 returns a DTensor


def gpu_peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of one GPU (for MFU), or None when unknown / not a GPU."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    table = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12)]
    return next((f for key, f in table if key in name), None)


class SideStream:
    """``next_batch()`` for token selectors: random micro-batches from the same ids, independent of the data order.

    Draw k of rank r uses the seed sequence [seed, SIDE_STREAM_TAG, r, k], so the stream resumes from a counter.
    """

    def __init__(self, pool: TokenPool, ids: np.ndarray, seed: int, rank: int, batch: int, device: torch.device) -> None:
        self.pool, self.ids, self.seed, self.rank, self.batch, self.device = pool, ids, seed, rank, batch, device
        self.draws = 0

    def __call__(self) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, SIDE_STREAM_TAG, self.rank, self.draws])
        self.draws += 1
        pick = rng.choice(len(self.ids), size=self.batch, replace=len(self.ids) < self.batch)
        return to_device(self.pool.batch(self.ids[pick]), self.device)


def _check_ids(ids: np.ndarray, pool: TokenPool) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise LmselectError(f"training ids must be a non-empty 1-D integer array (got shape {ids.shape}, {ids.dtype})")
    if ids.min() < 0 or ids.max() >= pool.n_sequences:
        raise LmselectError(f"training ids out of range for {pool.path} ({pool.n_sequences} sequences)")
    return ids.astype(np.int64)


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop log records written after the checkpoint we resume from (they will be redone)."""
    if path.is_file():
        keep = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def _summary(out_dir: Path, manifest_extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "step": int(manifest_extra["step"]),
        "tokens_seen": int(manifest_extra["tokens_seen"]),
        "loss": manifest_extra.get("loss"),
        "out_dir": str(out_dir),
    }


# ----------------------------------------------------------------------------------------------------------------
# the loop


def train(
    cfg: TrainConfig,
    pool: TokenPool,
    ids: np.ndarray,
    out_dir: str | Path,
    *,
    init_from: str | Path | None = None,
    token_selector: TokenSelector | None = None,
    model: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Pretrain ``cfg.preset`` (or ``model``, or the checkpoint ``init_from``) on ``ids`` of ``pool``.

    Resumes exactly from the newest complete checkpoint in ``out_dir`` (which then wins over ``model`` /
    ``init_from``); returns at once if that one is at the final step. ``cfg.continue_optimizer`` also loads the AdamW
    moments of ``init_from`` (the step counter, data order and LR schedule of this stage start afresh). Returns ``{"step", "tokens_seen", "loss", "out_dir"}`` (loss = the final step's training loss).
    """
    out_dir = Path(out_dir)
    info = D.init_distributed(cfg.device)
    device = info.device
    ids = _check_ids(ids, pool)
    steps = resolve_steps(cfg, pool.seq_len)
    accum = grad_accum_steps(cfg, info.world_size)
    validate_schedule(cfg.optim, steps)
    preset = get_preset(cfg.preset)
    if pool.seq_len > preset.max_position_embeddings:
        raise LmselectError(f"pool seq_len {pool.seq_len} exceeds preset '{cfg.preset}' context {preset.max_position_embeddings}")
    if init_from is not None and model is not None:
        raise LmselectError("pass either init_from (a checkpoint) or model, not both")
    resolved = replace(cfg, steps=steps, tokens=None)  # recorded next to every output
    selector = token_selector if token_selector is not None else TokenSelector()
    tokens_per_step = cfg.global_batch * pool.seq_len

    # ---- resume from out_dir, or start fresh ----
    resume_dir = ckpt_io.latest_checkpoint(out_dir)
    state = ckpt_io.load_training_state(resume_dir) if resume_dir is not None else None
    if state is not None and state["step"] >= steps:
        if info.is_main and resume_dir != out_dir:  # crashed while publishing the final checkpoint: finish that
            ckpt_io.publish_checkpoint(resume_dir, out_dir)
            ckpt_io.prune_checkpoints(out_dir, keep=None)
        D.barrier(info)
        log.info("%s: already trained to step %d; nothing to do", out_dir, state["step"])
        return _summary(out_dir, read_manifest(out_dir, kind="checkpoint")["extra"])

    torch.manual_seed(cfg.seed)
    if state is not None and info.is_main:
        log.info("%s: resuming from the checkpoint at step %d of %d (%s, %d tokens seen)", out_dir, int(state["step"]),
                 steps, resume_dir, int(state["tokens_seen"]))
    if state is not None:
        model = ckpt_io.load_checkpoint_model(resume_dir, attn_implementation=cfg.attn)
    elif init_from is not None:
        init_extra = read_manifest(init_from, kind="checkpoint")["extra"]
        fp = init_extra.get("tokenizer_fingerprint")
        if fp and pool.tokenizer_fingerprint and fp != pool.tokenizer_fingerprint:
            raise LmselectError(f"{init_from}: checkpoint tokenizer differs from the pool's ({pool.path})")
        model = ckpt_io.load_checkpoint_model(init_from, attn_implementation=cfg.attn)
    elif model is None:
        model = build_model(cfg.preset, pool.vocab_size, seed=cfg.seed, attn_implementation=cfg.attn, eos_token_id=pool.eos_id)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers outside autocast
    if model.config.vocab_size < pool.vocab_size:
        raise LmselectError(f"model vocabulary ({model.config.vocab_size}) is smaller than the pool's ({pool.vocab_size})")
    raw_model = model.to(device)
    raw_model.train()
    selector.setup(raw_model, device)
    lordo = cfg.optimizer == "lordo"
    if lordo and cfg.fsdp:
        raise LmselectError("optimizer 'lordo' keeps full local replicas; it cannot be combined with fsdp")
    # LoRDO: no DDP, so no per-step gradient all-reduce; each rank steps on its own slice and the optimizer averages
    dmodel = raw_model if lordo else D.wrap_model(raw_model, info, fsdp=cfg.fsdp)  # DDP / FSDP2 / itself
    if cfg.compile:
        dmodel = torch.compile(dmodel)
    # FSDP2 shards raw_model's parameters in place: build after
    optimizer = LordoOptimizer(raw_model, cfg.optim, cfg.lordo) if lordo else build_optimizer(raw_model, cfg.optim)

    data = DataOrder(ids, cfg.seed)
    side = SideStream(pool, ids, cfg.seed, info.rank, cfg.micro_batch, device)
    step, tokens_seen, seconds_before = 0, 0, 0.0  # seconds_before: training wall time of earlier (resumed) runs
    if state is not None:
        saved_world = int(state.get("world_size", info.world_size))
        if lordo and saved_world != info.world_size:  # one local replica per worker: the state cannot be re-split
            raise LmselectError(f"{resume_dir}: saved by {saved_world} LoRDO workers, this run has {info.world_size}; "
                                f"resume with {saved_world} processes (nodes x processes per node) or a fresh --out")
        if saved_world != info.world_size:  # DDP / FSDP: the global batch and the data order do not depend on it
            log.info("%s: resuming a %d-process run with %d processes (same global batch)", out_dir, saved_world,
                     info.world_size)
        _load_optimizer(raw_model, optimizer, state["optimizer"], fsdp=cfg.fsdp and info.enabled)
        step, tokens_seen = int(state["step"]), int(state["tokens_seen"])
        seconds_before = float(state.get("train_seconds", 0.0))
        data = DataOrder(ids, cfg.seed, **state["data"])
        side.draws = int(state["side_draws"])
        selector.load_state_dict(state["selector"])
        ckpt_io.set_rng_state(state["rng"])
    elif init_from is not None and cfg.continue_optimizer:
        prev = ckpt_io.load_training_state(init_from)  # moments only: the step, data and schedule start afresh
        _load_optimizer(raw_model, optimizer, prev["optimizer"], fsdp=cfg.fsdp and info.enabled)
        apply_hparams(optimizer, cfg.optim)

    parents = [parent_ref(pool.path)] + ([parent_ref(init_from)] if init_from is not None else [])
    logger = None
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(resolved, out_dir / "config.yaml")
        if state is not None:
            _truncate_log(out_dir / "train_log.jsonl", step)
        logger = MetricLogger(out_dir / "train_log.jsonl", backends=cfg.backends)
        logger.log(
            step, event="resume" if state is not None else "start", tokens_per_step=tokens_per_step, steps=steps,
            global_batch=cfg.global_batch, micro_batch=cfg.micro_batch, grad_accum=accum, world_size=info.world_size,
            params=count_params(raw_model), device=str(device), selector=selector.name,
        )

    def save(step_loss: float) -> Path:
        """Periodic checkpoint of the current state (a collective under FSDP; rank 0 writes)."""
        fsdp = cfg.fsdp and info.enabled
        full_sd = D.full_model_state(raw_model) if fsdp else None
        if lordo and info.enabled:  # the model file holds the workers' mean; training_state their local states
            full_sd = optimizer.average_model_state(raw_model)
        opt_sd = D.full_optimizer_state(raw_model, optimizer) if fsdp else optimizer.state_dict()
        path = ckpt_io.step_dir(out_dir, step)
        if info.is_main:
            training_state = {
                "step": step, "tokens_seen": tokens_seen, "data": data.state(), "side_draws": side.draws,
                "optimizer": opt_sd, "schedule": to_dict(cfg.optim), "rng": ckpt_io.rng_state(),
                "selector": selector.state_dict(), "world_size": info.world_size,
                "train_seconds": seconds_before + time.perf_counter() - t_begin,
            }
            extra = {
                "preset": cfg.preset, "step": step, "tokens_seen": tokens_seen, "loss": step_loss,
                "train_seconds": training_state["train_seconds"],
                "tokenizer_fingerprint": pool.tokenizer_fingerprint, "pool": str(pool.path),
                # whether each step ran a no-grad scoring forward over its micro-batches (the exposure ledger's FLOPs)
                "scoring_forward": runs_scoring_forward(selector, accum),
            }
            ckpt_io.save_checkpoint(
                path, raw_model, tokenizer_dir=pool.tokenizer_dir, training_state=training_state,
                config=to_dict(resolved), extra=extra, parents=parents, seed=cfg.seed, state_dict=full_sd,
            )
            ckpt_io.prune_checkpoints(out_dir, keep=path)  # only the newest is needed to resume
        D.barrier(info)
        return path

    autocast = lambda: autocast_context(device, cfg.dtype)  # noqa: E731
    flops_tok = flops_per_token(preset, raw_model.config.vocab_size, pool.seq_len)
    peak = gpu_peak_flops(device, cfg.peak_tflops)
    per_rank = cfg.micro_batch * accum
    last_loss = float("nan")
    t_last, steps_since = time.perf_counter(), 0
    t_begin = t_last
    # a bar on a terminal, a plain line every 30 s in a log file (no \r); rank 0 only
    progress = Progress(steps, initial=step, desc=f"train {out_dir.name}", enabled=info.is_main)
    # preemption (PreemptionGuard): one process decides after every step; ranks agree at log steps (beside the
    # collective that is there anyway)
    check_every = max(1, cfg.log_every) if info.enabled else 1
    stop = False
    guard = PreemptionGuard().__enter__()
    try:
        while step < steps:
            selector.on_step_start(step, raw_model, side)
            lr = lr_at(step, cfg.optim, steps)
            for g in optimizer.param_groups:
                g["lr"] = lr
            rows = data.next(cfg.global_batch)[info.rank * per_rank : (info.rank + 1) * per_rank]  # this rank's slice
            loss_sum = torch.zeros((), device=device)
            if selector.keep_fraction is None:  # plain training: one pass, every token counts
                for i in range(accum):
                    x = to_device(pool.batch(rows[i * cfg.micro_batch : (i + 1) * cfg.micro_batch]), device)
                    with D.grad_sync(dmodel, enabled=i == accum - 1):  # all-reduce gradients once, on the last micro-step
                        loss_sum += micro_step(dmodel, x, accum, autocast)
            else:  # token selection: top-k over the global batch (LoRDO workers: over their own slice)
                xs = [to_device(pool.batch(rows[i * cfg.micro_batch : (i + 1) * cfg.micro_batch]), device)
                      for i in range(accum)]
                loss_sum += selected_step(dmodel, xs, selector, autocast, info, global_ranks=not lordo)
            grad_norm = clip_grads(raw_model, cfg.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            steps_since += 1
            if lordo:  # outer step (parameter averaging) every lordo.sync_every steps; no other training collective
                optimizer.maybe_sync(step)

            saving = step == steps or (cfg.save_every > 0 and step % cfg.save_every == 0)
            if step % check_every == 0:  # preemption: a SIGTERM, or the wall-clock interval is up
                stop, due = guard.check(info.enabled, device)
                saving = saving or stop or due
            if step % max(1, cfg.log_every) == 0 or saving:
                last_loss = float(D.all_reduce_mean(loss_sum / accum, info))  # every rank joins (collective)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = time.perf_counter() - t_last
                tps = steps_since * tokens_per_step / max(dt, 1e-9)
                t_last, steps_since = time.perf_counter(), 0
                if logger is not None:
                    mfu = flops_tok * tps / (peak * info.world_size) if peak else None
                    sel = {f"sel_{k}": v for k, v in selector.stats().items()}
                    logger.log(step, loss=last_loss, lr=lr, grad_norm=float(grad_norm), tokens_per_s=tps, mfu=mfu,
                               tokens_seen=tokens_seen, **sel)
            progress.update(1, **({"loss": last_loss} if math.isfinite(last_loss) else {}))  # no loss=nan before the first log step
            if saving:
                last_path = save(last_loss)
                guard.saved()
                if stop:
                    break
    finally:
        guard.__exit__()
    progress.close()
    if stop:  # this step's checkpoint is written: stop as SIGTERM asked (Terminated under the CLI, exit 143)
        if logger is not None:
            logger.close()
        log.warning("%s: stopped at step %d of %d; rerun the same command to resume from there", out_dir, step, steps)
        guard.stop_now()
        raise KeyboardInterrupt  # the previous handler did not stop the process (it ignores SIGTERM): stop anyway

    # the final checkpoint becomes out_dir itself (what the pipeline, eval and from_pretrained read)
    if info.is_main:
        ckpt_io.publish_checkpoint(last_path, out_dir)
        ckpt_io.prune_checkpoints(out_dir, keep=None)
        logger.close()
    D.barrier(info)
    if guard.term.requested:  # SIGTERM during the last step: the stage is complete (a rerun skips it); stop now
        guard.stop_now()
    return {"step": step, "tokens_seen": tokens_seen, "loss": last_loss, "out_dir": str(out_dir)}


def _load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, sd: dict[str, Any], fsdp: bool) -> None:
    try:
        if fsdp:
            D.load_full_optimizer_state(model, optimizer, sd)
        else:
            optimizer.load_state_dict(sd)
    except (ValueError, KeyError, RuntimeError) as e:
        raise LmselectError(f"optimizer state does not match this model / parallelism ({str(e).splitlines()[0]})") from None
