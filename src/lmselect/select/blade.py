"""BLADE: bi-level adaptive data selection with a dynamic reference (Wang, Xiang et al., arXiv 2606.18650; METHODS §4).

Objective (penalised single-level form of the bilevel problem, value-function constraint with multiplier λ)::

    min_{α, w}  L_val(w) + λ · [ L_train(w; α) − L_train(u*(α); α) ]

u is the model being trained, w the reference, α the token selection weights (α_j ∈ [0, 1], a γ fraction of the
batch's tokens). Its α-gradient is λ · (CE_w − CE_u) per token: an excess-loss score with no Hessian. A block
Frank-Wolfe step with step size 1 on α is the top-γ mask of the score CE_u − CE_w (memoryless, recomputed per batch).

Algorithm (episodes of τ target steps; here, at every step with ``step % tau == 0``):
  1. w ← copy(u)
  2. K AdamW steps on w minimising  L_val(w) + λ · mean_{j selected} CE_j(w)  on a fresh training batch from
     ``next_batch()``, where "selected" = top-γ tokens by CE_u − CE_w *at that step* (u frozen during these steps).
  3. freeze w (eval mode, no grad) for the rest of the episode.
  Each target step: score CE_u − CE_w per token (:meth:`BladeSelector.token_scores`); the training loop keeps the
  top γ of the **global** batch (all micro-batches and ranks; the same :func:`lmselect.train.hooks.topk_token_mask`
  as RHO-1: k = max(1, round(γ·n)), ties by global position) and trains u on them.

Choices where the paper is not visible (all config options):
  * λ = 1.0 (not visible in the paper; our default), reference lr 1e-4, AdamW betas (0.9, 0.95), no weight decay,
    grad-norm clip 1.0; the reference optimizer is created fresh each episode (w is re-copied from u, so Adam moments
    of a previous w do not apply).
  * ``pause_target=True`` (default): the K reference steps run inside ``on_step_start`` before the target's step, so u
    is paused. ``pause_target=False``: u keeps training while w trains, one reference step per target step; until
    the new w has taken its K steps the previous (frozen) reference keeps scoring tokens (in the very first episode
    that is the unadapted copy of u).
  * L_val(w) is the token-weighted mean CE over the masked positions of ``ref_batch_size`` validation items per
    step, drawn without replacement from a seeded permutation (seed + 1000·sync index + epoch; offset documented
    here) that is recycled when exhausted.
  * τ = None or inf: only the initial copy (and its K steps) is made; the reference is never refreshed.
With τ = ∞ and K = 0 BLADE is RHO-1 with the initial target as the reference (tested).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from lmselect.artifacts import LmselectError
from lmselect.config import check_fraction, replace
from lmselect.context import STREAM_REFERENCE, FlopContext, RoundContext
from lmselect.models.losses import token_ce
from lmselect.models.util import freeze
from lmselect.select.base import SelectionMethod, register
from lmselect.train.hooks import TokenSelector, topk_token_mask


@dataclass
class BladeConfig:
    tau: float | None = 1000  # episode length in target steps; None / inf = never refresh after the initial copy
    ref_steps: int = 300  # K
    lam: float = 1.0  # λ: not visible in the paper, our default
    keep_fraction: float = 0.6  # γ
    ref_lr: float = 1e-4
    ref_batch_size: int = 16  # validation items per reference step (the training batch is whatever next_batch() gives)
    ref_weight_decay: float = 0.0
    ref_betas: tuple[float, float] = (0.9, 0.95)
    ref_grad_clip: float = 1.0
    pause_target: bool = True
    seed: int = 0


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


class BladeSelector(TokenSelector):
    """Online top-γ excess-loss token selection against a reference re-derived from the target every τ steps."""

    name = "blade"

    def __init__(self, cfg: BladeConfig, valset: Any):
        check_fraction(cfg.keep_fraction, "blade.keep_fraction")
        if cfg.tau is not None and not (cfg.tau > 0):
            raise LmselectError(f"blade.tau must be > 0 (or null for never), got {cfg.tau}")
        if cfg.ref_steps < 0:
            raise LmselectError(f"blade.ref_steps must be >= 0, got {cfg.ref_steps}")
        self.cfg = cfg
        self.keep_fraction = float(cfg.keep_fraction)  # γ: the loop keeps this fraction of the global batch
        self.valset = valset
        self.reference: nn.Module | None = None  # the frozen w scoring tokens now
        self._template: nn.Module | None = None  # the target, for rebuilding w after a resume
        self._device: torch.device | None = None
        # a w being trained while the target keeps training (pause_target=False only)
        self._pending: nn.Module | None = None
        self._pending_opt: torch.optim.Optimizer | None = None
        self._pending_done = 0
        self._loaded: dict[str, Any] | None = None  # state loaded before setup() gave us a model to rebuild w from
        # episode bookkeeping and stats
        self.n_syncs = 0
        self.last_sync_step: int | None = None
        self._val_perm: torch.Tensor | None = None
        self._val_pos = 0
        self._val_epoch = 0
        self._last_kept_fraction = float("nan")
        self._last_ref_val = float("nan")
        self._last_ref_train = float("nan")
        self._ref_seconds = 0.0

    # ---- episode schedule ------------------------------------------------------------------------------------------
    @property
    def _finite_tau(self) -> int | None:
        t = self.cfg.tau
        if t is None or math.isinf(float(t)):
            return None
        return int(t)

    def _is_episode_start(self, step: int) -> bool:
        if self.reference is None and self._pending is None:
            return True  # the initial copy (also after a resume without selector state)
        if self.last_sync_step == step:
            return False  # already refreshed at this step (on_step_start called twice)
        tau = self._finite_tau
        return tau is not None and step % tau == 0

    # ---- TokenSelector ---------------------------------------------------------------------------------------------
    def setup(self, model: nn.Module, device: torch.device) -> None:
        self._template = model
        self._device = torch.device(device) if device is not None else next(model.parameters()).device
        if self._loaded is not None:
            self._materialise(self._loaded)
            self._loaded = None
        if self.reference is not None:
            freeze(self.reference.to(self._device))

    def on_step_start(self, step: int, model: nn.Module, next_batch: Callable[[], torch.Tensor]) -> None:
        if self._template is None:
            self.setup(model, next(model.parameters()).device)
        t0 = time.perf_counter()
        if self._is_episode_start(step):
            self.n_syncs += 1
            self.last_sync_step = step
            w = self._copy_target(model)
            opt = self._make_opt(w)
            if self.cfg.pause_target:
                for _ in range(self.cfg.ref_steps):
                    self._ref_step(w, opt, model, next_batch)
                self.reference = freeze(w)
            else:
                self._pending, self._pending_opt, self._pending_done = w, opt, 0
                if self.reference is None:  # first episode: the unadapted copy scores until w is ready
                    self.reference = freeze(self._copy_target(model))
        if self._pending is not None:
            if self._pending_done < self.cfg.ref_steps:
                self._ref_step(self._pending, self._pending_opt, model, next_batch)
                self._pending_done += 1
            if self._pending_done >= self.cfg.ref_steps:
                self.reference = freeze(self._pending)
                self._pending, self._pending_opt, self._pending_done = None, None, 0
        self._ref_seconds += time.perf_counter() - t0

    @torch.no_grad()
    def reference_ce(self, input_ids: torch.Tensor) -> torch.Tensor:
        assert self.reference is not None, "BladeSelector.on_step_start must run before token_scores"
        dev = next(self.reference.parameters()).device
        x = input_ids.to(dev)
        return token_ce(self.reference(input_ids=x).logits, x).float().to(input_ids.device)

    def token_scores(self, input_ids: torch.Tensor, token_ce: torch.Tensor) -> torch.Tensor:
        """Excess loss CE_u − CE_w [B, L-1] of one micro-batch against the current frozen reference."""
        return token_ce.detach().float() - self.reference_ce(input_ids)

    def on_mask(self, mask: torch.Tensor) -> None:
        self._last_kept_fraction = int(mask.sum()) / max(mask.numel(), 1)

    def stats(self) -> dict[str, Any]:
        return {
            "kept_fraction": self._last_kept_fraction,
            "last_sync_step": self.last_sync_step,
            "n_syncs": self.n_syncs,
            "ref_val_loss": self._last_ref_val,
            "ref_train_loss": self._last_ref_train,
            "ref_seconds": self._ref_seconds,
        }

    # ---- reference training ----------------------------------------------------------------------------------------
    def _copy_target(self, model: nn.Module) -> nn.Module:
        w = copy.deepcopy(model)
        w.zero_grad(set_to_none=True)
        return w.to(self._device) if self._device is not None else w

    def _make_opt(self, w: nn.Module) -> torch.optim.Optimizer:
        for p in w.parameters():
            p.requires_grad_(True)
        c = self.cfg
        return torch.optim.AdamW(w.parameters(), lr=c.ref_lr, betas=tuple(c.ref_betas), weight_decay=c.ref_weight_decay)

    def _val_batch(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.valset)
        b = min(self.cfg.ref_batch_size, n)
        if self._val_perm is None or self._val_pos + b > n:
            g = torch.Generator().manual_seed(self.cfg.seed + 1000 * self.n_syncs + self._val_epoch)
            self._val_perm = torch.randperm(n, generator=g)
            self._val_pos = 0
            self._val_epoch += 1
        idx = self._val_perm[self._val_pos : self._val_pos + b]
        self._val_pos += b
        ids, m = self.valset.input_ids[idx], self.valset.loss_mask[idx]
        last = int(m.any(0).nonzero().max()) + 2 if m.any() else ids.shape[1]  # trim shared right padding
        return ids[:, :last].to(device), m[:, : last - 1].to(device)

    def _ref_step(self, w: nn.Module, opt: torch.optim.Optimizer, u: nn.Module, next_batch: Callable[[], torch.Tensor]) -> None:
        """One AdamW step on L_val(w) + λ · mean CE_w over the top-γ tokens (by CE_u − CE_w) of a training batch."""
        dev = next(w.parameters()).device
        w.train()
        x = next_batch().to(dev)
        with torch.no_grad():  # u is frozen here; evaluate it as the loop's keep_mask sees it (no dropout)
            was = u.training
            u.eval()
            ce_u = token_ce(u(input_ids=x.to(next(u.parameters()).device)).logits, x.to(next(u.parameters()).device))
            u.train(was)
        ce_w = token_ce(w(input_ids=x).logits, x)
        sel = topk_token_mask(ce_u.to(dev).float() - ce_w.detach().float(), self.cfg.keep_fraction)
        l_train = (ce_w * sel).sum() / sel.sum().clamp_min(1)
        vx, vm = self._val_batch(dev)
        ce_v = token_ce(w(input_ids=vx).logits, vx)
        l_val = (ce_v * vm).sum() / vm.sum().clamp_min(1)
        loss = l_val + self.cfg.lam * l_train
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.ref_grad_clip and self.cfg.ref_grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(w.parameters(), self.cfg.ref_grad_clip)
        opt.step()
        self._last_ref_val = float(l_val.detach())
        self._last_ref_train = float(l_train.detach())

    # ---- exact resume ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "reference": _cpu_state(self.reference) if self.reference is not None else None,
            "pending": _cpu_state(self._pending) if self._pending is not None else None,
            "pending_opt": self._pending_opt.state_dict() if self._pending_opt is not None else None,
            "pending_done": self._pending_done,
            "n_syncs": self.n_syncs,
            "last_sync_step": self.last_sync_step,
            "val_perm": self._val_perm.clone() if self._val_perm is not None else None,
            "val_pos": self._val_pos,
            "val_epoch": self._val_epoch,
            "ref_seconds": self._ref_seconds,
            "last_kept_fraction": self._last_kept_fraction,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n_syncs = int(state["n_syncs"])
        self.last_sync_step = state["last_sync_step"]
        self._val_perm = state["val_perm"]
        self._val_pos = int(state["val_pos"])
        self._val_epoch = int(state["val_epoch"])
        self._ref_seconds = float(state.get("ref_seconds", 0.0))
        self._last_kept_fraction = float(state.get("last_kept_fraction", float("nan")))
        if self._template is not None:
            self._materialise(state)
        else:  # weights need the architecture: rebuilt from the target in setup()
            self._loaded = state

    def _materialise(self, state: dict[str, Any]) -> None:
        """Rebuild w (and a pending w with its optimizer) as deep copies of the target carrying the saved weights."""
        assert self._template is not None
        self.reference = None
        if state.get("reference") is not None:
            w = self._copy_target(self._template)
            w.load_state_dict(state["reference"])
            self.reference = freeze(w)
        self._pending, self._pending_opt, self._pending_done = None, None, 0
        if state.get("pending") is not None:
            w = self._copy_target(self._template)
            w.load_state_dict(state["pending"])
            opt = self._make_opt(w)
            if state.get("pending_opt") is not None:
                opt.load_state_dict(state["pending_opt"])
            self._pending, self._pending_opt, self._pending_done = w, opt, int(state["pending_done"])


# ----------------------------------------------------------------------------------------------------------------
# the pipeline method


@register
class Blade(SelectionMethod):
    """BLADE in the multi-round runner (METHODS §4): the whole shard is fed; the loss keeps the top ``keep_fraction``
    of tokens by excess loss against a reference re-derived from the target every ``tau`` steps (``ref_steps`` on
    the selection set)."""

    name = "blade"
    description = "token-level: excess loss against a reference re-synchronised from the target every tau steps"
    config_cls = BladeConfig
    level = "token"
    needs = frozenset({"selection_set"})
    stages = ("selection", "target", "eval")
    color = "#d62728"

    def check_config(self) -> None:
        super().check_config()
        if self.cfg.tau is not None and not self.cfg.tau > 0:
            raise LmselectError(f"recipe key 'blade.tau': must be > 0 (or null for never), got {self.cfg.tau}")

    def token_selector(self, ctx: RoundContext) -> TokenSelector:
        return BladeSelector(replace(self.cfg, seed=ctx.derived_seed(STREAM_REFERENCE, per_round=False)),
                             ctx.selection_set)

    def selection_flops(self, f: FlopContext) -> float:
        nt, c, r = f.params(f.recipe.target.preset), self.cfg, f.recipe
        syncs = max(1, math.ceil(r.round_steps / c.tau)) if c.tau else 1
        return float(f.target_tokens_per_round * 2 * nt + syncs * c.ref_steps * c.ref_batch_size * f.seq_len * 8 * nt)
