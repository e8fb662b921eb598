"""MATES: model-aware data selection with a data-influence model (Yu et al., NeurIPS 2024; METHODS §2).

Objective. The oracle influence of a training sequence x on the current target θ (with optimizer state s) is the
validation loss after one optimizer step on x alone (the paper's locally probed oracle influence):

    I_θ(x) = L(D_val | A(θ, s, ∇_θ L(x)))          A = the target's own optimizer step (AdamW here)

A small influence model Θ is regressed onto z-normalised oracle values of N probe sequences (MSE),

    Θ* = argmin_Θ  Σ_x ( Θ(x) − (I_θ(x) − μ) / σ )²

and the next shard D is selected by Gumbel-top-k on the predictions, keeping the *smallest* predicted post-step loss
keys = −Θ(x)/τ + Gumbel noise, top k = fraction · |D| keys, τ = 0.5, noise seeded.

Implementation notes.
* Probe step = exactly the first optimizer step ``lmselect.train`` takes in the round being trained, on the single
  sequence (batch of 1), from the target's checkpoint **with its optimizer state**. Given that round's
  ``TrainConfig`` (``run_mates_round(train_cfg=...)``; the pipeline passes the one its round training uses):
  the loop's AdamW groups (``build_optimizer``: weight decay on matrices only) with the saved moments and step counts
  and the config's betas / eps / decay (``training_optimizer``, as ``continue_optimizer`` does), the learning rate
  ``lr_at(0, optim, steps)`` of that stage (with ``lr_per_round: halving`` round r's lr·0.5^r, not the previous
  round's), the loop's loss (``micro_step``: mean token CE), its clipping (``clip_grads`` at ``optim.grad_clip``)
  and its autocast (``dtype``). :func:`probe_step` is that step; a test checks it against ``train()`` bit for bit.
  ``probe_lr`` / ``clip_grad_norm`` override the lr / clip norm. Without ``train_cfg`` the probe uses the lr stored
  in the optimizer state and no clipping. The model runs in eval mode for the step and the validation loss (the
  presets have no dropout, so the arithmetic is the training step's).
* Probe sequences (``probe_from``): ``"holdout"`` (default, the paper's held-out part of the pool) = a seeded sample
  of :func:`probe_candidates`, the part of shard 0 the warm-up did not train on, which is in no candidate shard;
  ``"candidates"`` = a seeded sample of the round's own candidate shard.
* :func:`probe_oracle` has two implementations that compute the same numbers:
  ``method="loop"`` (the oracle): per sequence, backward + ``optimizer.step()`` + validation loss, then an exact
  restore (parameters copied back, optimizer ``load_state_dict`` of a deep copy, gradients reset);
  ``method="batched"``: per chunk of C sequences, per-sample gradients with ``torch.func.vmap(grad(...))`` over a
  ``functional_call``, a functional AdamW step per sample from the optimizer's ``exp_avg`` / ``exp_avg_sq`` /
  ``step`` (the same arithmetic as ``torch.optim.AdamW``'s single-tensor path), and the validation loss of the C
  stepped parameter sets with ``vmap`` over the stacked parameters. Memory is ~C × (parameters + Adam state)
  plus C × val batch × L × vocab logits; ``probe_chunk`` bounds it.
  Parameters that receive no gradient at all in a plain backward (unused in the forward) would be skipped by
  ``torch.optim`` but get a zero-gradient step here; every parameter of our presets is used, so the two agree.
* Influence-model backbone: **copied from the target** (``influence_init="target"``, default): it has the pool's
  tokenizer, is already trained on the pool and is "model-aware"; MATES uses a pretrained BERT-base, which we do not
  use (nothing external). ``influence_init="preset"`` builds a fresh ``influence_preset`` with the target's vocabulary
  instead (seed + 1). The head is a ``SequenceScorer(activation="identity")`` (mean-pooled hidden states → Linear).
* The influence model is trained with AdamW on MSE against z-normalised targets on 90 % of the probes; every
  ``influence_eval_every`` steps the Spearman correlation on the 10 % held-out split is measured and the best
  checkpoint is kept (the split uses seed + 2, minibatches seed + 3, Gumbel noise seed + 4).

Outputs of :func:`run_mates_round` in ``out_dir`` (each written atomically; finished pieces are reused on rerun):
``oracle.parquet`` (seq_id, val_loss), ``influence_model/`` (SequenceScorer dir, with the z-normalisation),
``influence_log.jsonl``, ``predictions.parquet`` (seq_id, pred), ``selected.npy`` (sorted int64 ids),
``config.yaml`` and last ``manifest.json`` (kind="influence"). Preemption (``train.loop.PreemptionGuard``, the
training loop's rule): while the probe runs, ``oracle.partial.pt`` holds the probe index reached and the values so
far, and while the influence model trains ``influence_state.pt`` its training state; both are saved on SIGTERM
(the stage then stops in one line) and at least every ``$LMSELECT_CHECKPOINT_EVERY_S`` seconds, resumed by a rerun
with the same inputs (bit-identical to an uninterrupted round) and removed once the finished file is written.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from lmselect.artifacts import (
    LmselectError,
    Manifest,
    atomic_path,
    atomic_save_npy,
    atomic_write_text,
    is_complete,
    parent_ref,
    write_manifest,
)
from lmselect.config import ConfigError, dump_yaml, replace, to_dict
from lmselect.context import STREAM_PROBE, STREAM_SELECT, STREAM_TRAIN, FlopContext, RoundContext
from lmselect.data.valset import validation_loss
from lmselect.log import track
from lmselect.models.losses import token_ce
from lmselect.models.presets import build_model, get_preset
from lmselect.models.scorer import SequenceScorer
from lmselect.models.util import attention_implementation
from lmselect.score import write_scores
from lmselect.select.base import Selection, SelectionMethod, register
from lmselect.select.topk import gumbel_topk, random_fraction
from lmselect.stats import spearman
from lmselect.train.checkpoint import (
    load_checkpoint_model,
    load_partial_state,
    load_training_state,
    rng_state,
    save_partial_state,
    set_rng_state,
    state_fingerprint,
)
from lmselect.train.loop import PreemptionGuard, autocast_context, clip_grads, micro_step, resolve_steps
from lmselect.train.schedules import apply_hparams, build_optimizer, lr_at

logger = logging.getLogger("lmselect.select")

# partial state of the two long sub-steps, saved by the preemption rule (train.loop.PreemptionGuard) and removed once
# the finished artifact (oracle.parquet, influence_model/) is written; never read as a result
PROBE_PARTIAL = "oracle.partial.pt"
INFLUENCE_PARTIAL = "influence_state.pt"


@dataclass
class MatesConfig:
    n_probe: int = 1000  # paper: 80k probe sequences per round
    probe_from: Literal["holdout", "candidates"] = "holdout"  # holdout: shard 0 minus the warm-up (no candidate)
    probe_lr: float | None = None  # None = the round's training lr (train_cfg), else the optimizer state's lr
    clip_grad_norm: float | None = None  # None = the training's optim.grad_clip (train_cfg), else off
    probe_method: Literal["batched", "loop"] = "batched"
    probe_chunk: int = 8  # sequences probed together by the batched method
    # attention for the probe: "auto" = eager for batched (vmap has a batching rule for it), the training's for loop
    probe_attn_implementation: str | None = "auto"
    val_items: int | None = 1024  # LAMBADA items in the probe validation loss (paper 1,024); None = all
    val_batch_size: int = 32
    # influence model
    influence_init: Literal["target", "preset"] = "target"
    influence_preset: str = "pythia-14m"
    influence_steps: int = 500
    influence_lr: float = 5e-5
    influence_batch_size: int = 16
    influence_weight_decay: float = 0.0
    influence_eval_every: int = 25
    holdout: float = 0.1
    predict_batch_size: int = 64
    # selection
    temperature: float = 0.5
    fraction: float = 0.2
    seed: int = 0


# ----------------------------------------------------------------------------------------------------------------
# oracle probe


def _opt_hparams(optimizer: torch.optim.Optimizer) -> tuple[bool, dict[nn.Parameter, dict[str, Any]]]:
    """(decoupled weight decay?, per-parameter group settings); only Adam/AdamW without amsgrad are supported."""
    if isinstance(optimizer, torch.optim.AdamW):
        decoupled = True
    elif isinstance(optimizer, torch.optim.Adam):
        decoupled = bool(optimizer.defaults.get("decoupled_weight_decay", False))
    else:
        raise LmselectError(f"MATES probe: unsupported optimizer {type(optimizer).__name__} (Adam / AdamW)")
    per: dict[nn.Parameter, dict[str, Any]] = {}
    for g in optimizer.param_groups:
        if g.get("amsgrad") or g.get("maximize"):
            raise LmselectError("MATES probe: amsgrad / maximize are not supported")
        for p in g["params"]:
            per[p] = g
    return decoupled, per


def _validation_loss(model: nn.Module, valset: Any, batch_size: int) -> float:
    return validation_loss(model, valset, batch_size=batch_size)


def probe_candidates(pool: Any, warmup_ids: np.ndarray) -> np.ndarray:
    """Held-out probe sequences: the rows of shard 0 the warm-up did not train on (sorted; in no candidate shard)."""
    ids = np.setdiff1d(np.asarray(pool.ids(0), dtype=np.int64), np.asarray(warmup_ids, dtype=np.int64))
    if ids.size == 0:
        raise LmselectError("mates.probe_from 'holdout': the warm-up trained on all of shard 0, so no held-out "
                            "sequences are left; lower warmup.fraction or set mates.probe_from=candidates")
    return ids


def training_optimizer(model: nn.Module, train_cfg: Any, optimizer_state: Any) -> torch.optim.Optimizer:
    """The optimizer ``lmselect.train`` builds for a stage with ``train_cfg`` started from a checkpoint whose
    optimizer state dict is ``optimizer_state``: the loop's AdamW groups, the saved moments when
    ``continue_optimizer`` (else fresh ones), then this config's betas / eps / weight decay."""
    opt = build_optimizer(model, train_cfg.optim)
    if train_cfg.continue_optimizer:
        sd = optimizer_state.state_dict() if isinstance(optimizer_state, torch.optim.Optimizer) else optimizer_state
        try:
            opt.load_state_dict(copy.deepcopy(sd))
        except (ValueError, KeyError, RuntimeError) as e:
            raise LmselectError(f"MATES probe: optimizer state does not match the model ({str(e).splitlines()[0]})") from None
        apply_hparams(opt, train_cfg.optim)
    return opt


class _ProbeProgress:
    """Probes done so far, resumable: with a ``partial`` path, the index reached and the values are saved there
    (atomically) when SIGTERM arrives or ``$LMSELECT_CHECKPOINT_EVERY_S`` is up (``train.loop.PreemptionGuard``), and
    a rerun with the same inputs (``key``) starts at that index; after a SIGTERM the probe stops in one line. Probes
    are independent of each other (each starts from the same restored state), so a resumed run gives the values of
    an uninterrupted one bit for bit. Without a path nothing is saved and SIGTERM is left alone."""

    def __init__(self, partial: str | Path | None, key: str, n: int) -> None:
        self.path = Path(partial) if partial is not None else None
        self.key, self.n = key, n
        self.values = np.full(n, np.nan, dtype=np.float64)
        self.done = 0
        st = load_partial_state(self.path, key, "the MATES probe") if self.path is not None else None
        if st is not None and len(st["values"]) == n:
            self.done = int(st["done"])
            self.values[: self.done] = np.asarray(st["values"], dtype=np.float64)[: self.done]
            logger.info("%s: resuming the MATES probe at probe %d of %d", self.path, self.done, n)
        self._guard: Any = None

    def __enter__(self) -> _ProbeProgress:
        if self.path is not None:
            self._guard = PreemptionGuard().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._guard is not None:
            self._guard.__exit__()

    def save(self) -> None:
        assert self.path is not None
        save_partial_state(self.path, {"key": self.key, "done": self.done, "n": self.n, "values": self.values.copy()})

    def advance(self, done: int) -> None:
        """Probes [0, done) are measured: save / stop by the preemption rule."""
        self.done = done
        if self._guard is not None:
            self._guard.checkpoint(self.save, lambda: f"MATES probe {self.path}: stopped at probe {done} of {self.n}")


def _probe_key(method: str, model: nn.Module, optimizer: torch.optim.Optimizer, probe_batch: torch.Tensor, valset: Any,
               **settings: Any) -> str:
    """What the probe values depend on: method and settings, the model and its optimizer state, probes, validation."""
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return state_fingerprint(method, sorted(settings.items()), attn, model, optimizer, probe_batch,
                             getattr(valset, "input_ids", None), getattr(valset, "loss_mask", None), len(valset))


def probe_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    *,
    lr: float | None = None,
    grad_clip: float | None = None,
    dtype: str = "float32",
) -> None:
    """One training step on the batch ``x`` in place, with the training loop's own pieces: its lr setting, loss
    (``micro_step``), clipping (``clip_grads``; None / <= 0 = off) and autocast policy (``dtype``)."""
    if lr is not None:
        for g in optimizer.param_groups:
            g["lr"] = lr
    dev = next(model.parameters()).device
    optimizer.zero_grad(set_to_none=True)
    micro_step(model, x.to(dev), 1, lambda: autocast_context(dev, dtype))
    clip_grads(model, grad_clip or 0.0)
    optimizer.step()


def probe_oracle_loop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    probe_batch: torch.Tensor,
    valset: Any,
    *,
    lr: float | None = None,
    clip_grad_norm: float | None = None,
    val_batch_size: int = 32,
    dtype: str = "float32",
    partial: str | Path | None = None,
) -> np.ndarray:
    """The plain oracle: :func:`probe_step` on each sequence with the real optimizer, measure, restore exactly.
    ``partial``: resumable (:class:`_ProbeProgress`)."""
    progress = _ProbeProgress(partial, _probe_key("loop", model, optimizer, probe_batch, valset, lr=lr,
                                                  clip=clip_grad_norm, val_batch_size=val_batch_size, dtype=dtype)
                              if partial is not None else "", probe_batch.shape[0])
    params = [p for p in model.parameters()]
    saved_params = [p.detach().clone() for p in params]
    saved_grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    saved_opt = copy.deepcopy(optimizer.state_dict())
    was = model.training
    out = progress.values
    model.eval()
    try:
        with progress:
            for i in track(range(progress.done, probe_batch.shape[0]), desc="mates probes", unit="seq"):
                probe_step(model, optimizer, probe_batch[i : i + 1], lr=lr, grad_clip=clip_grad_norm, dtype=dtype)
                out[i] = _validation_loss(model, valset, val_batch_size)
                # exact restore: values copied in place, optimizer state from a deep copy (load_state_dict copies again)
                with torch.no_grad():
                    for p, s in zip(params, saved_params):
                        p.copy_(s)
                optimizer.load_state_dict(copy.deepcopy(saved_opt))
                progress.advance(i + 1)
    finally:
        for p, g in zip(params, saved_grads):
            p.grad = None if g is None else g.clone()
        model.train(was)
    return out


def _functional_adam_step(
    params: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    named: dict[str, nn.Parameter],
    lr: float | None,
) -> dict[str, torch.Tensor]:
    """New parameters [C, ...] after one Adam(W) step per sample (grads [C, ...]), from the optimizer's state.

    Same operation order as ``torch.optim.adam._single_tensor_adam`` (non-capturable): weight decay, lerp of the first
    moment, second moment, bias corrections, ``p − (lr / bc1) · m / (sqrt(v) / sqrt(bc2) + eps)``.
    """
    decoupled, per = _opt_hparams(optimizer)
    new: dict[str, torch.Tensor] = {}
    for name, p in params.items():
        g = grads[name]
        grp = per.get(named[name])
        if grp is None:  # not optimised: unchanged
            new[name] = p.unsqueeze(0).expand_as(g)
            continue
        st = optimizer.state.get(named[name], {})
        b1, b2 = grp["betas"]
        eps, wd = grp["eps"], grp["weight_decay"]
        step_lr = grp["lr"] if lr is None else lr
        step_lr = float(step_lr)
        m0 = st.get("exp_avg")
        v0 = st.get("exp_avg_sq")
        t = float(st["step"]) + 1.0 if "step" in st else 1.0
        p_ = p.unsqueeze(0)
        if wd != 0:
            if decoupled:
                p_ = p_ * (1 - step_lr * wd)
            else:
                g = g + wd * p.unsqueeze(0)
        m = (torch.zeros_like(p) if m0 is None else m0).unsqueeze(0)
        m = torch.lerp(m.expand_as(g), g, 1 - b1)
        v = (torch.zeros_like(p) if v0 is None else v0).unsqueeze(0) * b2 + (1 - b2) * g * g
        bc1 = 1 - b1**t
        bc2 = 1 - b2**t
        denom = v.sqrt() / (bc2**0.5) + eps
        new[name] = p_ - (step_lr / bc1) * (m / denom)
    return new


def probe_oracle_batched(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    probe_batch: torch.Tensor,
    valset: Any,
    *,
    lr: float | None = None,
    clip_grad_norm: float | None = None,
    val_batch_size: int = 32,
    chunk_size: int = 8,
    dtype: str = "float32",
    partial: str | Path | None = None,
) -> np.ndarray:
    """The same values as :func:`probe_oracle_loop`, vectorised with ``torch.func`` over chunks of sequences.

    Does not modify the model, its gradients or the optimizer. ``partial``: resumable at a chunk boundary
    (:class:`_ProbeProgress`; the chunk size is part of the key, so chunks are the same on a resume).
    """
    from torch.func import functional_call, grad, vmap


    named = dict(model.named_parameters())
    params = {n: p.detach() for n, p in named.items()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    dev = next(iter(params.values())).device
    was = model.training
    model.eval()

    def seq_loss(ps: dict[str, torch.Tensor], seq: torch.Tensor) -> torch.Tensor:
        ids = seq.unsqueeze(0)
        return token_ce(functional_call(model, (ps, buffers), args=(), kwargs={"input_ids": ids}).logits, ids).mean()

    per_sample_grad = vmap(grad(seq_loss), in_dims=(None, 0))
    val_batches = list(valset.batches(val_batch_size, dev))

    def val_ce_sum(ps: dict[str, torch.Tensor], ids: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        ce = token_ce(functional_call(model, (ps, buffers), args=(), kwargs={"input_ids": ids}).logits, ids)
        return (ce * m).sum()

    batched_val = vmap(val_ce_sum, in_dims=(0, None, None))
    count = sum(int(m.sum()) for _, m in val_batches)
    n = probe_batch.shape[0]
    progress = _ProbeProgress(partial, _probe_key("batched", model, optimizer, probe_batch, valset, lr=lr,
                                                  clip=clip_grad_norm, val_batch_size=val_batch_size, dtype=dtype,
                                                  chunk_size=chunk_size)
                              if partial is not None else "", n)
    out = progress.values
    try:
        with torch.no_grad(), progress:  # torch.func.grad computes its own gradients inside
            for s in track(range(progress.done, n, chunk_size), desc=f"mates probes (x{chunk_size})", unit="chunk"):
                x = probe_batch[s : s + chunk_size].to(dev)
                with torch.enable_grad(), autocast_context(dev, dtype):
                    grads = per_sample_grad(params, x)
                if clip_grad_norm and clip_grad_norm > 0:
                    norms = torch.stack([g.reshape(g.shape[0], -1).norm(dim=1) for g in grads.values()], 1).norm(dim=1)
                    coef = (clip_grad_norm / (norms + 1e-6)).clamp(max=1.0)
                    grads = {n: g * coef.view(-1, *([1] * (g.dim() - 1))).to(g.dtype) for n, g in grads.items()}
                stepped = _functional_adam_step(params, grads, optimizer, named, lr)
                del grads
                total = torch.zeros(x.shape[0], dtype=torch.float64, device=dev)
                for ids, m in val_batches:
                    total += batched_val(stepped, ids, m).double()
                out[s : s + x.shape[0]] = (total / max(count, 1)).cpu().numpy()
                del stepped
                progress.advance(s + x.shape[0])
    finally:
        model.train(was)
    return out


def probe_oracle(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    probe_batch: torch.Tensor,
    valset: Any,
    *,
    method: Literal["batched", "loop"] = "batched",
    lr: float | None = None,
    clip_grad_norm: float | None = None,
    val_batch_size: int = 32,
    chunk_size: int = 8,
    attn_implementation: str | None = "auto",
    dtype: str = "float32",
    partial: str | Path | None = None,
) -> np.ndarray:
    """Oracle influence [N]: validation loss after one optimizer step on each row of ``probe_batch`` [N, L] alone.

    ``method="batched"`` (torch.func, chunks of ``chunk_size``) or ``"loop"`` (the real optimizer, restored exactly
    after each probe). Both leave the model parameters, gradients and optimizer state as they found them.
    ``attn_implementation`` temporarily switches the model's attention ("auto": eager for batched, which vmap
    batches natively; unchanged for loop); ``dtype`` is the training loop's autocast setting.
    ``partial`` (a file path): the probe is resumable: the probes done so far are saved there on SIGTERM (which
    then stops the probe in one line) and at least every ``$LMSELECT_CHECKPOINT_EVERY_S`` seconds, and a call with
    the same inputs resumes there, with the values of an uninterrupted probe bit for bit. The caller removes the
    file once it has written the finished values.
    """
    if attn_implementation == "auto":
        attn_implementation = "eager" if method == "batched" else None
    with attention_implementation(model, attn_implementation):
        if method == "loop":
            return probe_oracle_loop(
                model, optimizer, probe_batch, valset, lr=lr, clip_grad_norm=clip_grad_norm,
                val_batch_size=val_batch_size, dtype=dtype, partial=partial,
            )
        if method == "batched":
            return probe_oracle_batched(
                model, optimizer, probe_batch, valset, lr=lr, clip_grad_norm=clip_grad_norm,
                val_batch_size=val_batch_size, chunk_size=chunk_size, dtype=dtype, partial=partial,
            )
    raise LmselectError(f"unknown MATES probe method '{method}' (batched, loop)")


# ----------------------------------------------------------------------------------------------------------------
# influence model


@torch.no_grad()
def predict(scorer: nn.Module, pool: Any, ids: np.ndarray, batch_size: int = 64, device: Any = None) -> np.ndarray:
    """Influence-model outputs for pool rows ``ids`` (eval mode, no grad, batched)."""
    was = scorer.training
    scorer.eval()
    dev = device or next(scorer.parameters()).device
    out = np.empty(len(ids), dtype=np.float64)
    for i in range(0, len(ids), batch_size):
        x = pool.batch(ids[i : i + batch_size]).to(dev)
        out[i : i + len(x)] = scorer(x).double().cpu().numpy()
    scorer.train(was)
    return out


def train_influence_model(
    cfg: MatesConfig, target_model: nn.Module, tokens: torch.Tensor, values: np.ndarray, vocab_size: int, device: Any = None,
    *, partial: str | Path | None = None,
) -> tuple[Any, dict[str, Any], list[dict[str, Any]]]:
    """Regress z-normalised ``values`` from ``tokens`` [N, L]; returns (best scorer, info, log records).

    ``partial`` (a file path): resumable by the preemption rule (``train.loop.PreemptionGuard``): the training state
    (scorer, optimizer, step, best step and its weights, log, minibatch generator and global RNG) is saved there on
    SIGTERM (which then stops the training in one line) and at least every ``$LMSELECT_CHECKPOINT_EVERY_S`` seconds;
    a call with the same inputs resumes there and returns what an uninterrupted call returns, bit for bit. The
    caller removes the file once it has saved the finished model.
    """
    n = len(values)
    if n < 4:
        raise LmselectError(f"MATES: need at least 4 probe sequences to fit the influence model, got {n}")
    dev = torch.device(device) if device is not None else next(target_model.parameters()).device
    y = np.asarray(values, dtype=np.float64)
    mu, sd = float(y.mean()), float(y.std())
    z = torch.from_numpy((y - mu) / (sd if sd > 0 else 1.0)).float()
    perm = np.random.default_rng(cfg.seed + 2).permutation(n)
    n_hold = min(max(1, int(round(cfg.holdout * n))), n - 2)
    hold, train = perm[:n_hold], perm[n_hold:]

    if cfg.influence_init == "target":
        lm = copy.deepcopy(target_model)
    else:
        lm = build_model(cfg.influence_preset, vocab_size, seed=cfg.seed + 1)
    scorer = SequenceScorer(lm.to(dev), activation="identity", seed=cfg.seed + 1).to(dev).float()
    for p in scorer.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(scorer.parameters(), lr=cfg.influence_lr, weight_decay=cfg.influence_weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    x_hold = tokens[hold]
    z_hold = z[hold].numpy()

    def evaluate() -> float:
        scorer.eval()
        with torch.no_grad():
            preds = np.concatenate(
                [scorer(x_hold[i : i + cfg.predict_batch_size].to(dev)).double().cpu().numpy() for i in range(0, len(hold), cfg.predict_batch_size)]
            )
        scorer.train()
        return spearman(preds, z_hold, undefined=float("nan"))  # nan: never the best step

    key = ""
    st = None
    if partial is not None:
        settings = {k: v for k, v in vars(cfg).items() if k.startswith("influence_")}
        settings.update(holdout=cfg.holdout, seed=cfg.seed, predict_batch_size=cfg.predict_batch_size, device=str(dev))
        key = state_fingerprint(sorted(settings.items()), vocab_size, tokens, y,
                                target_model if cfg.influence_init == "target" else None)
        st = load_partial_state(partial, key, "the MATES influence model")
    if st is not None:  # resume: everything the remaining steps read
        scorer.load_state_dict(st["scorer"])
        opt.load_state_dict(st["optimizer"])
        gen.set_state(st["generator"])
        set_rng_state(st["rng"])
        start, best, best_step, best_state, log = st["step"], st["best"], st["best_step"], st["best_state"], st["log"]
        logger.info("%s: resuming the influence model at step %d of %d", partial, start, cfg.influence_steps)
    else:
        best = evaluate()
        best = best if np.isfinite(best) else -np.inf
        best_state = {k: v.detach().clone() for k, v in scorer.state_dict().items()}
        best_step, start = 0, 0
        log = [{"step": 0, "holdout_spearman": best}]
    step = start

    def save() -> None:
        save_partial_state(partial, {
            "key": key, "step": step, "scorer": scorer.state_dict(), "optimizer": opt.state_dict(),
            "generator": gen.get_state(), "rng": rng_state(), "best": best, "best_step": best_step,
            "best_state": best_state, "log": log,
        })

    scorer.train()
    with PreemptionGuard() if partial is not None else contextlib.nullcontext() as guard:
        for step in track(range(start + 1, cfg.influence_steps + 1), desc="influence model", unit="step"):
            rows = torch.from_numpy(train)[torch.randint(0, len(train), (min(cfg.influence_batch_size, len(train)),), generator=gen)]
            pred = scorer(tokens[rows].to(dev))
            loss = torch.mean((pred.float() - z[rows].to(dev)) ** 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % cfg.influence_eval_every == 0 or step == cfg.influence_steps:
                rho = evaluate()
                log.append({"step": step, "mse": float(loss.detach()), "holdout_spearman": rho})
                if np.isfinite(rho) and rho > best:
                    best, best_step = rho, step
                    best_state = {k: v.detach().clone() for k, v in scorer.state_dict().items()}
            if guard is not None:
                guard.checkpoint(save, lambda s=step: f"MATES influence model {partial}: stopped at step {s} of "
                                                     f"{cfg.influence_steps}")
    scorer.load_state_dict(best_state)
    scorer.eval()
    info = {"best_spearman": float(best), "best_step": best_step, "y_mean": mu, "y_std": sd, "n_train": len(train), "n_holdout": len(hold)}
    return scorer, info, log


# ----------------------------------------------------------------------------------------------------------------
# one round


def _as_optimizer(model: nn.Module, optimizer_state: Any, source_model: nn.Module | None = None) -> torch.optim.Optimizer:
    """An optimizer over ``model``'s parameters carrying ``optimizer_state``.

    Accepts a live Adam(W) optimizer whose params are ``model``'s, or an AdamW ``state_dict``. For a state dict the
    group structure is rebuilt from its ``param_names`` when present (optimizers built from ``named_parameters()``),
    else the saved parameter indices are taken to enumerate ``model.parameters()`` in order.
    """
    named = dict(model.named_parameters())
    if isinstance(optimizer_state, torch.optim.Optimizer):
        live = optimizer_state
        if source_model is None or all(p is named.get(n) for n, p in source_model.named_parameters()):
            return live
        # The live optimizer holds ``source_model``'s tensors and ``model`` is a copy: rebuild the same groups over
        # the copy by parameter *name*. (State-dict indices number the parameters group by group, which is not
        # ``model.parameters()`` order once weight decay splits them into groups.)
        src_names = {id(p): n for n, p in source_model.named_parameters()}
        groups = [{"params": [named[src_names[id(p)]] for p in g["params"]]} for g in live.param_groups]
        opt = torch.optim.AdamW(groups)
        opt.load_state_dict(live.state_dict())
        return opt
    sd = optimizer_state
    plist = list(model.parameters())
    groups = []
    for g in sd["param_groups"]:
        if g.get("param_names"):
            ps = [named[n] for n in g["param_names"]]
        else:
            ps = [plist[i] for i in g["params"]]
        groups.append({"params": ps})
    opt = torch.optim.AdamW(groups)
    opt.load_state_dict(sd)  # restores lr, betas, eps, weight_decay and the moments
    # Without param_names the index -> parameter mapping is an assumption; a shape check catches a wrong one.
    for p, st in opt.state.items():
        if "exp_avg" in st and st["exp_avg"].shape != p.shape:
            raise LmselectError("MATES probe: optimizer state does not line up with the model's parameters "
                                "(pass the live optimizer, or a state dict saved with param_names)")
    return opt


def _write_parquet(path: Path, cols: dict[str, np.ndarray]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(pa.table(cols), tmp)


def _read_parquet(path: Path) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    return {c: t.column(c).to_numpy() for c in t.column_names}


def run_mates_round(
    cfg: MatesConfig,
    target_model: nn.Module,
    optimizer_state: Any,
    pool: Any,
    probe_ids: np.ndarray,
    candidate_ids: np.ndarray,
    valset: Any,
    out_dir: str | Path,
    device: Any = None,
    train_cfg: Any = None,
) -> np.ndarray:
    """One MATES round: oracle probe -> influence model -> predictions over ``candidate_ids`` -> Gumbel-top-k.

    ``target_model`` is deep-copied onto ``device`` (the caller's model is untouched); ``optimizer_state`` is the
    target's AdamW state dict (or optimizer). ``train_cfg``: the ``TrainConfig`` of the round about to be trained;
    the probe step is then its first step (optimizer groups and hyper-parameters, lr, clipping, autocast; see the
    module notes). The first ``cfg.n_probe`` of ``probe_ids`` are probed. Returns the selected sequence ids (sorted
    int64). Resumable: finished sub-steps in ``out_dir`` are reused.
    """
    out = Path(out_dir)
    if is_complete(out, kind="influence"):
        return np.load(out / "selected.npy")
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    atomic_write_text(out / "config.yaml", dump_yaml(cfg))
    dev = torch.device(device) if device is not None else next(target_model.parameters()).device
    timings: dict[str, float] = {}
    probe_ids = np.asarray(probe_ids, dtype=np.int64)[: cfg.n_probe]
    candidate_ids = np.asarray(candidate_ids, dtype=np.int64)
    vset = valset.subset(slice(0, cfg.val_items)) if cfg.val_items else valset

    # 1. oracle probe
    if (out / "oracle.parquet").is_file():
        oracle = _read_parquet(out / "oracle.parquet")
        if not np.array_equal(oracle["seq_id"], probe_ids):
            raise LmselectError(f"{out / 'oracle.parquet'}: probe ids differ from this round's; remove the directory")
        values = oracle["val_loss"].astype(np.float64)
    else:
        t0 = time.perf_counter()
        model = copy.deepcopy(target_model).to(dev)
        lr, clip, dtype, attn = cfg.probe_lr, cfg.clip_grad_norm, "float32", cfg.probe_attn_implementation
        if train_cfg is not None:  # the round's first training step (module notes)

            opt = training_optimizer(model, train_cfg, optimizer_state)
            lr = lr_at(0, train_cfg.optim, resolve_steps(train_cfg, pool.seq_len)) if lr is None else lr
            clip = train_cfg.optim.grad_clip if clip is None else clip
            dtype = train_cfg.dtype
            if attn == "auto" and cfg.probe_method == "loop":
                attn = train_cfg.attn
        else:
            opt = _as_optimizer(model, optimizer_state, source_model=target_model)
        values = probe_oracle(
            model, opt, pool.batch(probe_ids), vset, method=cfg.probe_method, lr=lr, clip_grad_norm=clip,
            val_batch_size=cfg.val_batch_size, chunk_size=cfg.probe_chunk, attn_implementation=attn, dtype=dtype,
            partial=out / PROBE_PARTIAL,
        )
        del model, opt
        _write_parquet(out / "oracle.parquet", {"seq_id": probe_ids, "val_loss": values})
        (out / PROBE_PARTIAL).unlink(missing_ok=True)  # after the finished file: a kill in between loses nothing
        timings["oracle_s"] = time.perf_counter() - t0

    # 2. influence model
    if (out / "influence_model" / "scorer.json").is_file():
        scorer = SequenceScorer.load(out / "influence_model", device=dev)
        info = json.loads((out / "influence_model" / "scorer.json").read_text())
    else:
        t0 = time.perf_counter()
        scorer, info, log = train_influence_model(cfg, target_model, pool.batch(probe_ids), values, pool.vocab_size, dev,
                                                  partial=out / INFLUENCE_PARTIAL)
        atomic_write_text(out / "influence_log.jsonl", "".join(json.dumps(r) + "\n" for r in log))
        scorer.save_pretrained(out / "influence_model", extra={**info, "method": "mates", "tokenizer_fingerprint": pool.tokenizer_fingerprint})
        (out / INFLUENCE_PARTIAL).unlink(missing_ok=True)
        timings["influence_s"] = time.perf_counter() - t0

    # 3. predictions over the next shard
    if (out / "predictions.parquet").is_file():
        preds = _read_parquet(out / "predictions.parquet")
        if not np.array_equal(preds["seq_id"], candidate_ids):
            raise LmselectError(f"{out / 'predictions.parquet'}: candidate ids differ from this round's")
        pred = preds["pred"].astype(np.float64)
    else:
        t0 = time.perf_counter()
        pred = predict(scorer, pool, candidate_ids, cfg.predict_batch_size, dev)
        _write_parquet(out / "predictions.parquet", {"seq_id": candidate_ids, "pred": pred})
        timings["predict_s"] = time.perf_counter() - t0

    # 4. Gumbel-top-k, keeping the smallest predicted post-step loss
    selected = gumbel_topk(candidate_ids, pred, cfg.fraction, cfg.temperature, cfg.seed + 4, largest=False)
    atomic_save_npy(out / "selected.npy", selected)
    write_manifest(
        out,
        Manifest(
            kind="influence",
            config=to_dict(cfg),
            seed=cfg.seed,
            counts={"probes": len(probe_ids), "candidates": len(candidate_ids), "selected": len(selected), "val_items": len(vset)},
            timings=timings,
            extra={
                "method": "mates",
                "best_spearman": info.get("best_spearman"),
                "best_step": info.get("best_step"),
                "oracle_mean": float(np.mean(values)),
                "oracle_std": float(np.std(values)),
            },
        ),
    )
    return selected


# ----------------------------------------------------------------------------------------------------------------
# the pipeline method


@register
class Mates(SelectionMethod):
    """MATES in the multi-round runner (METHODS §2): oracle probes from the current target *with its optimizer
    state*, an influence model fitted to them, predictions over the round's candidates, Gumbel-top-k of the lowest
    predicted post-step validation loss."""

    name = "mates"
    description = "model-aware data selection: oracle one-step probes, an influence model, Gumbel-top-k"
    config_cls = MatesConfig
    needs = frozenset({"selection_set"})
    stages = ("influence", "scores", "selection", "target", "eval")
    collective = False  # single-process code: rank 0 first, the other ranks then read its artifacts
    color = "#ff7f0e"

    def select(self, ctx: RoundContext) -> Selection:
        idir, sdir = ctx.stage_dir("influence"), ctx.stage_dir("scores")
        # Oracle probes start from the current target *with its optimizer state* (METHODS §2 step 1), and a probe
        # step is the first step stage_train takes in this round: its config (lr × lr_scale(r), clipping, AdamW).
        model = load_checkpoint_model(ctx.prev_target, device=ctx.device)
        optimizer_state = load_training_state(ctx.prev_target)["optimizer"]
        round_cfg = ctx.run.train_cfg(ctx.recipe.round_steps, rnd=ctx.round, seed=ctx.seed, stream=STREAM_TRAIN)
        cfg = replace(self.cfg, seed=ctx.derived_seed(STREAM_SELECT), fraction=ctx.fraction)
        # Probe sequences: a seeded sample of held-out shard-0 sequences (default: in no candidate shard, never
        # trained on) or of the round's own candidates; the influence model then predicts every candidate.
        source = probe_candidates(ctx.pool, ctx.run.warmup_ids()) if cfg.probe_from == "holdout" else ctx.candidates
        probe = random_fraction(source, min(1.0, cfg.n_probe / max(1, len(source))), seed=ctx.derived_seed(STREAM_PROBE))
        selected = run_mates_round(cfg, model, optimizer_state, ctx.pool, probe, ctx.candidates, ctx.selection_set, idir,
                                   device=ctx.device, train_cfg=round_cfg)
        del model, optimizer_state
        preds = _read_parquet(idir / "predictions.parquet")
        # MATES keeps the *lowest* predicted post-step loss; stored negated so that higher = preferred everywhere.
        scores = -np.asarray(preds["pred"], dtype=np.float64)
        if not is_complete(sdir, kind="scores"):
            write_scores(sdir, np.asarray(preds["seq_id"]), scores, parents=[parent_ref(idir)],
                         extra={"score": "-predicted_val_loss"})
        return Selection(selected, scores=scores, parents=[parent_ref(idir), parent_ref(sdir)],
                         extra={"score": "-predicted_val_loss"})

    def check_config(self) -> None:
        super().check_config()
        c = self.cfg
        for key in ("n_probe", "influence_steps", "influence_batch_size"):
            if getattr(c, key) < 1:
                raise LmselectError(f"recipe key 'mates.{key}': must be >= 1, got {getattr(c, key)}")
        if not c.temperature > 0:
            raise LmselectError(f"recipe key 'mates.temperature': must be > 0, got {c.temperature}")
        if c.probe_from not in ("holdout", "candidates"):
            raise LmselectError(f"recipe key 'mates.probe_from': must be holdout or candidates, got {c.probe_from!r}")

    def model_contexts(self) -> list[tuple[str, str, int]]:
        """The influence model, when it is a fresh ``influence_preset`` rather than a copy of the target (whose
        context the recipe checks anyway)."""
        c = self.cfg
        if c is None or c.influence_init != "preset":
            return []
        try:
            ctx = get_preset(c.influence_preset).max_position_embeddings
        except LmselectError as e:
            raise ConfigError(str(e), key="mates.influence_preset") from None
        return [("mates.influence_preset", f"MATES influence preset '{c.influence_preset}'", ctx)]

    def selection_flops(self, f: FlopContext) -> float:
        m, T, r = self.cfg, f.seq_len, f.recipe
        nt = f.params(r.target.preset)
        val_items = min(m.val_items or r.validation.max_items, r.validation.max_items)
        n_inf = nt if m.influence_init == "target" else f.params(m.influence_preset)  # influence-model backbone
        return float(m.n_probe * T * 6 * nt + m.n_probe * val_items * T * 2 * nt
                     + m.influence_steps * m.influence_batch_size * T * 6 * n_inf + f.shard_size * T * 2 * n_inf)
