"""The BLISS bilevel solver (METHODS §1.2; the objective and the algorithm are in the package docstring):
``BilevelSolver`` holds the proxy, the KL teacher and the score model with both optimizers, and ``outer_step`` runs
steps 1–6 once, building the closures that :mod:`.bilevel_math` differentiates. Also the compatibility check of the
three models (``check_compatible``) and the round-1 score model (``init_score_model``)."""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from lmselect.artifacts import LmselectError
from lmselect.data.tokenizer import check_same_tokenizer
from lmselect.data.valset import ValidationSet
from lmselect.models.losses import token_ce, token_kl
from lmselect.models.scorer import SequenceScorer
from lmselect.models.util import math_attention
from lmselect.select.bliss import bilevel_math as bm
from lmselect.select.bliss.config import SEED_VAL_AGREE, SEED_VAL_STREAM, BlissConfig, resolve_profile
from lmselect.train.distributed import all_gather_cat, all_reduce_, rank_world
from lmselect.train.order import IndexStream
from lmselect.train.schedules import adamw, warmup_cosine


def check_compatible(
    proxy: nn.Module, target: nn.Module, scorer: SequenceScorer | None = None, *,
    proxy_tokenizer: Any = None, target_tokenizer: Any = None,
) -> None:
    """Raise LmselectError before any compute unless proxy, target (and score model) share one tokenizer.

    Tokenizers may be given as tokenizer objects, HF tokenizer directories or 16-hex fingerprints
    (``lmselect.data.tokenizer.check_same_tokenizer``). Independently, the models' vocabulary sizes must agree: the
    KL term compares the two output distributions token by token.
    """
    if proxy_tokenizer is not None and target_tokenizer is not None:
        check_same_tokenizer(proxy_tokenizer, target_tokenizer, "proxy", "target")
    vp = proxy.get_output_embeddings().weight.shape[0]
    vt = target.get_output_embeddings().weight.shape[0]
    if vp != vt:
        raise LmselectError(
            f"tokenizer mismatch: proxy vocabulary has {vp} entries, target {vt}; BLISS needs one shared tokenizer "
            "(the KL term compares the two models token by token)"
        )
    if scorer is not None:
        vs = scorer.lm.get_input_embeddings().weight.shape[0]
        if vs != vp:
            raise LmselectError(f"tokenizer mismatch: score model vocabulary has {vs} entries, proxy {vp}")


def init_score_model(proxy: nn.Module, seed: int, activation: str = "sigmoid",
                     head_init: str = "normal") -> SequenceScorer:
    """Round-1 score model: backbone deep-copied from the warm-up proxy, a seeded fresh head (``head_init``: normal
    = N(0, 0.02) weight and zero bias; torch_default = U(±1/√d) weight and bias, the released code's)."""
    return SequenceScorer.from_causal_lm(proxy, activation=activation, seed=seed, head_init=head_init)


@dataclass
class Hypergradient:
    """Everything one hypergradient evaluation produced (grads are *before* clipping)."""

    grads: tuple[Tensor, ...]
    c: Tensor  # [B_local]
    scores: Tensor  # [B_global] detached
    weights: Tensor  # [B_global] P
    upper_loss: float
    z_norm: float
    v_norm: float
    timings: dict[str, float] = field(default_factory=dict)
    diag: dict[str, float] = field(default_factory=dict)  # solver diagnostics (METHODS §1.2a)
    z: tuple[Tensor, ...] = ()  # the solve's z (for the hyper batches of the same outer step)


# ----------------------------------------------------------------------------------------------------------------
# the solver


class BilevelSolver:
    """Holds the three models and both optimizers; ``outer_step`` runs steps 1–6 of METHODS §1.2 once."""

    def __init__(
        self,
        cfg: BlissConfig,
        proxy: nn.Module,
        target: nn.Module,
        scorer: SequenceScorer,
        valset: ValidationSet,
        device: torch.device | str | None = None,
        *,
        proxy_tokenizer: Any = None,
        target_tokenizer: Any = None,
    ):
        check_compatible(proxy, target, scorer, proxy_tokenizer=proxy_tokenizer, target_tokenizer=target_tokenizer)
        cfg = resolve_profile(cfg)
        if cfg.hypergrad_impl not in ("auto", "per_sample", "batched"):
            raise LmselectError(f"config key 'hypergrad_impl' must be auto, per_sample or batched, got {cfg.hypergrad_impl!r}")
        self.cfg = cfg
        self.device = torch.device(device) if device is not None else next(proxy.parameters()).device
        self.rank, self.world = rank_world(env_fallback=False)  # collectives need a process group
        if cfg.batch_size % self.world:
            raise LmselectError(f"bliss batch_size {cfg.batch_size} is not divisible by the world size {self.world}")
        if cfg.val_batch_size % self.world:
            raise LmselectError(f"bliss val_batch_size {cfg.val_batch_size} is not divisible by the world size {self.world}")
        self.local_batch = cfg.batch_size // self.world
        self.proxy = proxy.to(self.device).train()
        # the KL teacher: frozen, eval mode, never differentiated
        self.target = target.to(self.device).eval().requires_grad_(False)
        self.scorer = scorer.to(self.device).train()
        self.valset = valset

        self.p_names = [n for n, p in proxy.named_parameters() if p.requires_grad]
        self.p_params: tuple[nn.Parameter, ...] = tuple(p for _, p in proxy.named_parameters() if p.requires_grad)
        # score parameters: everything that reaches s (the scorer's LM head is saved with it but never used)
        unused = {id(p) for p in scorer.lm.get_output_embeddings().parameters()}
        named = [(n, p) for n, p in scorer.named_parameters() if p.requires_grad and id(p) not in unused]
        self.s_names = [n for n, _ in named]
        self.s_params: tuple[nn.Parameter, ...] = tuple(p for _, p in named)

        # weight_decay_1d: one group that decays every tensor, as released (bilevel_selection.py:272-289)
        self.p_opt = adamw(self.p_params, cfg.proxy_lr, cfg.betas, cfg.weight_decay, decay_1d=cfg.weight_decay_1d)
        self.s_opt = adamw(self.s_params, cfg.score_lr, cfg.betas, cfg.weight_decay, decay_1d=cfg.weight_decay_1d)
        if cfg.schedule == "released":  # both stepped once per outer step (bilevel_selection.py:553-554)
            self.p_sched = torch.optim.lr_scheduler.LambdaLR(
                self.p_opt, warmup_cosine(cfg.outer_steps, cfg.warmup_ratio, released=True))
            self.s_sched = torch.optim.lr_scheduler.LambdaLR(
                self.s_opt, warmup_cosine(cfg.outer_steps, cfg.warmup_ratio, released=True))
        else:  # the proxy's per inner step; one score step per outer step plus one per hyper batch
            self.p_sched = torch.optim.lr_scheduler.LambdaLR(
                self.p_opt, warmup_cosine(cfg.outer_steps * cfg.inner_steps, cfg.warmup_ratio))
            self.s_sched = torch.optim.lr_scheduler.LambdaLR(
                self.s_opt, warmup_cosine(cfg.outer_steps * (1 + int(cfg.hyper_batches)), cfg.warmup_ratio))
        self.step = 0
        self.elapsed = 0.0
        if cfg.val_batch_size > 0:
            self.val_stream: IndexStream | None = IndexStream(len(valset), cfg.val_batch_size, cfg.seed + SEED_VAL_STREAM,
                                                              self.rank, self.world)
        else:  # the whole set every step, in a fixed order (rows beyond a multiple of the world size dropped)
            if len(valset) < self.world:
                raise LmselectError(f"bilevel solver: {len(valset)} validation items cannot feed {self.world} ranks")
            self.val_stream = None
        self.last: Hypergradient | None = None
        # state of the §1.2a options (saved with the solver state so a resumed run continues them)
        self.z_prev: bm.Params | None = None
        self.v_avg: bm.Params | None = None
        self.v_count = 0
        self.c_by_source: dict[str, list[float]] = {}  # source -> [n, Σ c, Σ standardised c]
        # softmax_normaliser "previous": (max, Σ exp(s − max)) of the previous outer batch's global scores
        self.norm_prev: tuple[float, float] | None = None

    # ---- configuration helpers --------------------------------------------------------------------------------
    @property
    def impl(self) -> str:
        if self.cfg.hypergrad_impl == "auto":  # measured choice, see the package docstring
            return "batched" if self.device.type != "cpu" else "per_sample"
        return self.cfg.hypergrad_impl

    def _amp_dtype(self) -> torch.dtype | None:
        d = self.cfg.dtype
        if d == "auto":
            return torch.bfloat16 if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else None
        return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(d)

    def autocast(self) -> contextlib.AbstractContextManager:
        dt = self._amp_dtype()
        return torch.autocast(self.device.type, dtype=dt) if dt is not None else contextlib.nullcontext()

    # ---- closures over parameter tuples (what bilevel_math differentiates) --------------------------------------
    def proxy_logits(self, params: Sequence[Tensor], ids: Tensor) -> Tensor:
        return functional_call(self.proxy, dict(zip(self.p_names, params)), (), {"input_ids": ids}).logits

    def ce_fn(self, ids: Tensor) -> bm.PerSeqFn:
        """CE_i(θ_p) of rows ``sl`` of ``ids``: mean next-token CE per sequence."""

        def fn(params: bm.Params, sl: slice) -> Tensor:
            x = ids[sl]
            return token_ce(self.proxy_logits(params, x), x).mean(1)

        return fn

    def score_fn(self, ids: Tensor) -> bm.PerSeqFn:
        def fn(params: bm.Params, sl: slice) -> Tensor:
            return functional_call(self.scorer, dict(zip(self.s_names, params)), (ids[sl],))

        return fn

    def lower_fn(self, ids: Tensor, weights: Tensor, sl: slice, teacher_logits: Tensor | None, *,
                 ce_scale: float, reg_scale: float, with_l2: bool) -> bm.ScalarFn:
        """The part of G contributed by rows ``sl``: ce_scale·Σ P_i CE_i + reg_scale·(γ KL·|sl|/B + [λ‖θ‖²])."""
        x = ids[sl]
        frac = x.shape[0] / ids.shape[0]

        def fn(params: bm.Params) -> Tensor:
            logits = self.proxy_logits(params, x)
            ce = token_ce(logits, x).mean(1)
            teacher = teacher_logits if teacher_logits is not None else self.teacher_logits(x)
            loss = ce_scale * (weights[sl].to(ce.dtype) * ce).sum()
            loss = loss + reg_scale * self.cfg.gamma * frac * token_kl(teacher, logits)
            if with_l2 and self.cfg.lam:
                loss = loss + reg_scale * self.cfg.lam * bm.sq_norm(params)
            return loss

        return fn

    @torch.no_grad()
    def teacher_logits(self, ids: Tensor) -> Tensor:
        with self.autocast():
            return self.target(input_ids=ids).logits

    @torch.no_grad()
    def scores(self, ids: Tensor) -> Tensor:
        """Local scores [B_local] (no grad) in chunks, in float32 at least (a float64 score model stays float64:
        rounding s to float32 would cap the precision of P, ds and the hypergradient in float64 oracle checks)."""
        fn = self.score_fn(ids)
        with self.autocast():
            s = torch.cat([fn(self.s_params, sl) for sl in bm.chunks(ids.shape[0], self.cfg.micro_batch)])
        return s.to(torch.promote_types(s.dtype, torch.float32))

    def global_weights(self, s_local: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(all scores, the weights w of G over the global batch, this rank's slice of w); w in float32 at least.

        w = P = softmax over the global batch, or with ``softmax_normaliser: previous`` (after the first outer step)
        exp(s_i − m)/S with the previous outer batch's global (m, S), as released (bilevel_selection.py:409-410,
        449-450): Σ w is then only ≈ 1. Computed from the global m and S, so under torchrun Σ over all ranks stays
        ≈ 1 (the released code divides each rank's local scores by the global S: Σ_local w ≈ 1/W, a bug not
        reproduced). The hypergradient's softmax is always fresh (``score_grads``)."""
        s_all = all_gather_cat(s_local.detach())
        s_w = s_all.to(torch.promote_types(s_all.dtype, torch.float32))
        if self.cfg.softmax_normaliser == "previous" and self.norm_prev is not None:
            m, S = self.norm_prev
            p_all = torch.exp(s_w - m) / S
        else:
            p_all = torch.softmax(s_w, 0)
        off = self.rank * s_local.shape[0]
        return s_all, p_all, p_all[off : off + s_local.shape[0]]

    # ---- step 1: inner step -----------------------------------------------------------------------------------
    def inner_step(self, ids: Tensor) -> dict[str, float]:
        ids = ids.to(self.device)
        _, _, p_loc = self.global_weights(self.scores(ids))
        self.p_opt.zero_grad(set_to_none=True)
        tot = torch.zeros(3, dtype=torch.float64, device=self.device)  # G, KL, weighted CE (local contributions)
        for i, sl in enumerate(bm.chunks(ids.shape[0], self.cfg.micro_batch)):
            x = ids[sl]
            teacher = self.teacher_logits(x)
            with self.autocast():
                logits = self.proxy_logits(self.p_params, x)
                ce = token_ce(logits, x).mean(1)
                wce = (p_loc[sl].to(ce.dtype) * ce).sum()
                kl = token_kl(teacher, logits) * (x.shape[0] / ids.shape[0])
                loss = wce + (self.cfg.gamma * kl) / self.world
                if i == 0 and self.cfg.lam:
                    loss = loss + self.cfg.lam * bm.sq_norm(self.p_params) / self.world
            loss.backward()
            tot += torch.stack([loss.detach().double(), kl.detach().double() / self.world, wce.detach().double()])
        all_reduce_([p.grad for p in self.p_params if p.grad is not None])
        all_reduce_([tot])
        gnorm = torch.nn.utils.clip_grad_norm_(self.p_params, self.cfg.proxy_clip if self.cfg.proxy_clip > 0 else float("inf"))
        self.p_opt.step()
        if self.cfg.schedule != "released":  # released: once per outer step (outer_step)
            self.p_sched.step()
        self.p_opt.zero_grad(set_to_none=True)
        return {"lower_loss": float(tot[0]), "kl": float(tot[1]), "weighted_ce": float(tot[2]), "proxy_grad_norm": float(gnorm)}

    # ---- steps 2–5: hypergradient ------------------------------------------------------------------------------
    def _val_global_rows(self, step: int) -> np.ndarray:
        """Rows of the global validation batch of outer step ``step``, all ranks together."""
        n = len(self.valset)
        if self.val_stream is None:
            return np.arange(n - n % self.world)
        vs = self.val_stream
        return np.concatenate([IndexStream(n, self.cfg.val_batch_size, vs.seed, r, self.world).batch(step)
                               for r in range(self.world)]) if self.world > 1 else vs.batch(step)

    def _val_rows_batch(self, rows: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
        """This rank's share of the global rows ``rows`` as (ids, final-word/loss mask, all-token mask), trimmed."""
        local = len(rows) // self.world
        mine = rows[self.rank * local : (self.rank + 1) * local]
        return self.valset.subset(torch.as_tensor(mine)).objective_masks(self.device)

    def next_val_batch(self) -> tuple[Tensor, Tensor, Tensor]:
        """(ids, loss_mask, token_mask) of this rank's rows of the current step's validation batch."""
        if self.val_stream is not None:
            sub = self.valset.subset(torch.as_tensor(self.val_stream.batch(self.step)))
            return sub.objective_masks(self.device)
        return self._val_rows_batch(self._val_global_rows(self.step))

    def agreement_batches(self) -> tuple[tuple[Tensor, Tensor, Tensor] | None, tuple[Tensor, Tensor, Tensor], float]:
        """Validation batches for the v-agreement diagnostic: (A, B, k). A None means "compare with this step's v";
        otherwise A and B are two disjoint halves of the step's batch (the whole set, or too few items left for a
        second batch). k = rows of the v in use / rows of each compared batch (for the Spearman–Brown correction)."""
        first = self._val_global_rows(self.step)
        n, w = len(self.valset), self.world
        rest = np.setdiff1d(np.arange(n), first)
        rng = np.random.default_rng(self.cfg.seed + SEED_VAL_AGREE + self.step)
        if len(rest) >= len(first):
            return None, self._val_rows_batch(rng.permutation(rest)[: len(first)]), 1.0
        perm = rng.permutation(first)
        half = (len(perm) // 2) // w * w
        if half < w:
            raise LmselectError(f"bilevel solver: {n} validation items are too few for the v-agreement diagnostic")
        return self._val_rows_batch(perm[:half]), self._val_rows_batch(perm[half : 2 * half]), len(first) / half

    def validation_grad(self, val_ids: Tensor, val_mask: Tensor, val_token_mask: Tensor | None = None
                        ) -> tuple[bm.Params, float]:
        """v = ∇_θp F: token-weighted masked CE of one validation batch — the global one under torchrun (each
        rank's rows together), so every rank gets the same v and F as one process on the concatenated batch.

        ``objective`` picks the tokens: the set's loss mask (``final_word``; for a ``text`` set every token), every
        real token (``all_tokens``, ``val_token_mask``) or a·final_word + (1 − a)·all_tokens (``mix``), each part
        the token-weighted mean over its own positions."""
        obj = self.cfg.objective
        if obj != "final_word" and val_token_mask is None:
            raise LmselectError(f"bliss objective '{obj}' needs the validation set's token mask")
        parts = {"final_word": [(1.0, val_mask)], "all_tokens": [(1.0, val_token_mask)],
                 "mix": [(self.cfg.objective_mix, val_mask), (1.0 - self.cfg.objective_mix, val_token_mask)]}[obj]
        parts = [(a, m) for a, m in parts if a > 0]
        n_tok = torch.stack([m.sum().to(device=self.device, dtype=torch.float64) for _, m in parts])
        all_reduce_([n_tok])  # global token counts: a mean of per-rank means would over-weight short-masked ranks
        with self.autocast():
            ce = token_ce(self.proxy_logits(self.p_params, val_ids), val_ids)
            f = None
            for j, (a, mask) in enumerate(parts):
                m = mask.to(ce.dtype)
                term = (ce * m).sum() / n_tok[j].clamp_min(1).to(ce.dtype)
                f = term if (f is None and a == 1.0) else (a * term if f is None else f + a * term)
        v = torch.autograd.grad(f, self.p_params, allow_unused=True)
        v = tuple(torch.zeros_like(p) if g is None else g for p, g in zip(self.p_params, v))
        all_reduce_(v)  # Σ_r ∇(local sum / global count) = ∇F of the global batch
        f_all = f.detach().to(torch.float64).reshape(1)
        all_reduce_([f_all])
        return v, float(f_all)

    def lower_hvp(self, ids: Tensor, weights: Tensor, vec: Sequence[Tensor], teachers: list[Tensor] | None = None) -> bm.Params:
        """H·vec with H = ∇²_θp G of the global batch: each rank's HVP of its local estimate G_r (package docstring),
        averaged across ranks. A collective under torchrun: every rank must call it with the same ``vec``."""
        ids = ids.to(self.device)
        out: list[Tensor] | None = None
        for i, sl in enumerate(bm.chunks(ids.shape[0], self.cfg.micro_batch)):
            fn = self.lower_fn(ids, weights, sl, teachers[i] if teachers is not None else None,
                               ce_scale=float(self.world), reg_scale=1.0, with_l2=(i == 0))
            with math_attention(self.proxy), self.autocast():
                hv = bm.hvp(fn, self.p_params, vec)
            out = list(hv) if out is None else [a + b for a, b in zip(out, hv)]
        assert out is not None
        all_reduce_(out, mean=True)  # mean_r ∇²G_r = ∇²G: the z solve then sees the global Hessian
        return tuple(out)

    def compute_c(self, ids: Tensor, z: Sequence[Tensor], impl: str | None = None) -> Tensor:
        """c_i = ⟨∇_θp CE_i, z⟩ for this rank's sequences [B_local] (``c_normalize``: / ‖∇_θp CE_i‖)."""
        n = ids.shape[0]
        fn = self.ce_fn(ids)
        if self.cfg.c_normalize:  # per-sequence gradient norms need the per-sequence gradients
            with self.autocast():
                return bm.dots_per_sample(fn, self.p_params, z, n, normalize=True)
        impl = impl or self.impl
        if impl == "per_sample":
            with self.autocast():  # first-order only: the fused attention path is fine here
                return bm.dots_per_sample(fn, self.p_params, z, n)
        with math_attention(self.proxy), self.autocast():
            if self.cfg.batched_dots == "jvp":
                return bm.dots_jvp(fn, self.p_params, z, n, self.cfg.micro_batch)
            return bm.dots_double_backward(fn, self.p_params, z, n, self.cfg.micro_batch)

    def score_grads(self, ids: Tensor, s_all: Tensor, c_local: Tensor, impl: str | None = None) -> bm.Params:
        """∇_θs of −Σ_i P_i(θ_s) c_i over the global batch (c constant), summed over ranks. ``auto`` is the batched
        VJP on every device: one backward through the score model instead of B (on 2 CPU cores, batch 32, a 2-layer
        score model: 0.05–0.07 s against 0.19–0.22 s per sequence-by-sequence pass)."""
        impl = impl or ("batched" if self.cfg.hypergrad_impl == "auto" else self.impl)
        c_all = all_gather_cat(c_local.to(s_all.dtype))
        off = self.rank * ids.shape[0]
        fn = self.score_fn(ids)
        with self.autocast():
            if impl == "per_sample":
                ds = bm.softmax_weight_grad(s_all, c_all)[off : off + ids.shape[0]]
                grads = bm.hypergrad_per_sample(fn, self.s_params, ds)
            else:
                ds = bm.softmax_weight_grad_autograd(s_all, c_all)[off : off + ids.shape[0]]
                grads = bm.hypergrad_batched(fn, self.s_params, ds, self.cfg.micro_batch)
        all_reduce_(grads)
        return grads

    def _v_in_use(self, v_raw: bm.Params) -> bm.Params:
        """v itself, or with ``v_ema`` = β the bias-corrected running average (1 − β) Σ_t β^(T−t) v_t / (1 − β^T)."""
        beta = float(self.cfg.v_ema)
        if beta <= 0:
            return v_raw
        self.v_count += 1
        if self.v_avg is None:
            self.v_avg = tuple(torch.zeros_like(t) for t in v_raw)
        self.v_avg = tuple(beta * a + (1.0 - beta) * t for a, t in zip(self.v_avg, v_raw))
        corr = 1.0 - beta**self.v_count
        return tuple(a / corr for a in self.v_avg)

    def diag_due(self) -> bool:
        """Whether this outer step runs the diagnostics that cost an extra HVP and validation gradient: the first
        step and every ``diag_every``-th (default ``log_every``)."""
        every = self.cfg.log_every if self.cfg.diag_every is None else self.cfg.diag_every
        return every > 0 and (self.step == 0 or (self.step + 1) % every == 0)

    def hypergradient(self, ids: Tensor, val_ids: Tensor, val_mask: Tensor, impl: str | None = None, *,
                      val_token_mask: Tensor | None = None, diagnose: bool = False) -> Hypergradient:
        """Steps 2–5 of METHODS §1.2 on the outer batch ``ids`` (this rank's rows). Updates nothing but the
        §1.2a carry-over state (previous z, running v). ``diagnose``: also the HVP / second-v diagnostics."""
        cfg, t = self.cfg, {}
        ids = ids.to(self.device)
        t0 = time.perf_counter()
        v_raw, f_val = self.validation_grad(val_ids, val_mask, val_token_mask)
        v = self._v_in_use(v_raw)
        t["t_val"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        s_loc = self.scores(ids)
        s_all, p_all, p_loc = self.global_weights(s_loc)
        # teacher logits of the outer batch, kept across the z steps' HVPs; computed at the first HVP, so a solve that
        # needs none (one step from z = 0: H·0 = 0) never pays for them
        teachers: list[Tensor] = []

        def hvp(vec: Sequence[Tensor]) -> bm.Params:
            if cfg.cache_teacher and not teachers:
                teachers.extend(self.teacher_logits(ids[sl]) for sl in bm.chunks(ids.shape[0], cfg.micro_batch))
            return self.lower_hvp(ids, p_loc, vec, teachers or None)

        # v and every H·z are global (all-reduced), so each rank computes the same z: nothing left to average
        if cfg.z_warm_start and self.z_prev is not None:
            init: float | bm.Params = self.z_prev
        elif cfg.z_init == "inv_numel":  # float16-rounded in the solve's first outer step, as released
            init = bm.inv_numel_init(self.p_params, first_step=self.step == 0)
        else:
            init = float(cfg.z_init)
        z, info = bm.solve_z(hvp, v, steps=cfg.z_steps, lr=cfg.z_lr, damping=cfg.z_damping, init=init,
                             clip=cfg.z_clip, clip_mode=cfg.z_clip_mode, tol=float(cfg.z_tol),
                             max_steps=cfg.z_max_steps, return_info=True)
        if cfg.z_warm_start:
            self.z_prev = tuple(zi.detach() for zi in z)
        t["t_z"] = time.perf_counter() - t0

        # diagnostics (METHODS §1.2a): cheap ones every step, the HVP / second-v ones when asked
        v_norm = float(bm.tree_norm(v))
        diag: dict[str, float] = {"cos_zv": bm.cosine(z, v), "z_steps_used": float(info.steps)}
        if info.residual is not None:
            diag["z_residual"] = info.residual
        if diagnose:
            t0 = time.perf_counter()
            hz = info.hz if info.hz is not None else hvp(z)
            diag["hz_ratio"] = float(bm.tree_norm(hz)) / max(v_norm, 1e-300)
            diag["z_residual"] = float(bm.tree_norm([h + cfg.z_damping * zi - vi for h, zi, vi in zip(hz, z, v)])) / max(v_norm, 1e-300)
            a, b, k = self.agreement_batches()
            v_a = v_raw if a is None else self.validation_grad(a[0], a[1], a[2])[0]
            v_b = self.validation_grad(b[0], b[1], b[2])[0]
            rho = bm.cosine(v_a, v_b)
            if cfg.v_ema > 0:  # an EMA of independent batches averages ≈ (1 + β) / (1 − β) of them
                k *= (1.0 + cfg.v_ema) / (1.0 - cfg.v_ema)
            rho_k = k * rho / (1.0 + (k - 1.0) * rho) if rho > 0 else 0.0  # Spearman–Brown to the v in use
            diag.update(v_agreement=rho, v_signal=math.sqrt(max(0.0, rho_k)))
            t["t_diag"] = time.perf_counter() - t0
        teachers.clear()  # the cached teacher logits (B·L·V) are no longer needed
        del hvp

        t0 = time.perf_counter()
        c = self.compute_c(ids, z, impl)
        t["t_c"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        grads = self.score_grads(ids, s_all, c, impl)
        t["t_hyper"] = time.perf_counter() - t0
        return Hypergradient(grads=grads, c=c, scores=s_all, weights=p_all, upper_loss=f_val,
                             z_norm=float(bm.tree_norm(z)), v_norm=v_norm, timings=t, diag=diag, z=z)

    # ---- step 6 + the whole outer step ------------------------------------------------------------------------
    def score_update(self, grads: Sequence[Tensor]) -> float:
        """AdamW step on θ_s with the per-tensor clipped hypergradient; returns the unclipped global norm."""
        norm = float(bm.tree_norm(grads))
        for p, g in zip(self.s_params, grads):
            p.grad = g.detach().to(p.dtype).clone()
        bm.clip_per_tensor_([p.grad for p in self.s_params], self.cfg.score_clip)
        self.s_opt.step()
        if self.cfg.schedule != "released":  # released: once per outer step (outer_step)
            self.s_sched.step()
        self.s_opt.zero_grad(set_to_none=True)
        return norm

    def outer_step(self, train_batches: Iterator[Tensor], sources: Sequence[str] | None = None) -> dict[str, float]:
        """One outer step; draws K + 1 + hyper_batches batches ([B_local, L] LongTensors) from ``train_batches``:
        K for the inner steps, the outer batch for the HVPs, the c_i and the hypergradient, then the hyper batches.
        Which stream batches those are (``outer_batch``: a fresh one, or as released stream batch t, for K = 1 the
        batch just trained on) is the stream's business: :func:`train_batch_indices` / :func:`step_batches`.
        ``sources``: the source label of every row of the *global* outer batch (rank order), for the share of
        var(c) explained by source and the per-source mean c (diagnostics)."""
        t_start = time.perf_counter()
        lr_p, lr_s = self.p_opt.param_groups[0]["lr"], self.s_opt.param_groups[0]["lr"]
        inner: dict[str, float] = {}
        for _ in range(self.cfg.inner_steps):
            inner = self.inner_step(next(train_batches))
        t_inner = time.perf_counter() - t_start
        outer_ids = next(train_batches).to(self.device)
        val_ids, val_mask, val_tok = self.next_val_batch()
        hg = self.hypergradient(outer_ids, val_ids, val_mask, val_token_mask=val_tok, diagnose=self.diag_due())
        t0 = time.perf_counter()
        hnorm = self.score_update(hg.grads)
        if self.cfg.softmax_normaliser == "previous":  # the next step's normaliser (bilevel_selection.py:510)
            m = hg.scores.max()
            self.norm_prev = (float(m), float(torch.exp(hg.scores - m).sum()))
        # hyper batches: more labelled sequences for θ_s from the same z (steps 4–6 again on a fresh batch)
        for _ in range(int(self.cfg.hyper_batches)):
            ids = next(train_batches).to(self.device)
            s_all, _, _ = self.global_weights(self.scores(ids))
            self.score_update(self.score_grads(ids, s_all, self.compute_c(ids, hg.z)))
        if self.cfg.schedule == "released":  # both schedules once per outer step (bilevel_selection.py:553-554)
            self.p_sched.step()
            self.s_sched.step()
        self.last = hg
        self.step += 1
        # log statistics of the whole global batch (hg.c holds only this rank's rows)
        s, p, c = hg.scores.double(), hg.weights.double(), all_gather_cat(hg.c.double())
        diag = dict(hg.diag)
        if sources is not None and len(sources) == c.numel():
            diag.update(self._source_stats(c, list(sources)))
        secs = time.perf_counter() - t_start
        self.elapsed += secs
        return {
            "upper_loss": hg.upper_loss, **inner, "hypergrad_norm": hnorm, "z_norm": hg.z_norm, "v_norm": hg.v_norm,
            "c_mean": float(c.mean()), "c_std": float(c.std()) if c.numel() > 1 else 0.0,
            "score_mean": float(s.mean()), "score_std": float(s.std()) if s.numel() > 1 else 0.0,
            "score_min": float(s.min()), "score_max": float(s.max()), "weight_ratio": float(p.max() / p.min()),
            "weight_max_b": float(p.max() * p.numel()), **diag,
            "lr_proxy": lr_p, "lr_score": lr_s, "seconds": secs, "t_inner": t_inner,
            **hg.timings, "t_update": time.perf_counter() - t0,
        }

    def _source_stats(self, c: Tensor, sources: list[str]) -> dict[str, float]:
        """Share of var(c) between sources (and its no-effect expectation); accumulates the per-source mean c."""
        vals = c.tolist()
        sd = float(c.std()) if c.numel() > 1 else 0.0
        mu = float(c.mean())
        for ci, src in zip(vals, sources):
            acc = self.c_by_source.setdefault(str(src), [0.0, 0.0, 0.0])
            acc[0] += 1
            acc[1] += ci
            acc[2] += (ci - mu) / sd if sd > 0 else 0.0
        k, n = len(set(sources)), len(sources)
        return {"c_source_share": bm.source_variance_share(vals, sources),
                "c_source_share_null": (k - 1) / (n - 1) if n > 1 else 0.0}

    # ---- resumable state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "step": self.step, "elapsed": self.elapsed,
            "proxy": self.proxy.state_dict(), "scorer": self.scorer.state_dict(),
            "proxy_opt": self.p_opt.state_dict(), "score_opt": self.s_opt.state_dict(),
            "proxy_sched": self.p_sched.state_dict(), "score_sched": self.s_sched.state_dict(), "rng": rng,
            "z_prev": self.z_prev, "v_avg": self.v_avg, "v_count": self.v_count, "c_by_source": self.c_by_source,
            "norm_prev": self.norm_prev,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.proxy.load_state_dict(d["proxy"])
        self.scorer.load_state_dict(d["scorer"])
        self.p_opt.load_state_dict(d["proxy_opt"])
        self.s_opt.load_state_dict(d["score_opt"])
        self.p_sched.load_state_dict(d["proxy_sched"])
        self.s_sched.load_state_dict(d["score_sched"])
        self.step, self.elapsed = int(d["step"]), float(d.get("elapsed", 0.0))
        to_dev = (lambda ts: None if ts is None else tuple(t.to(self.device) for t in ts))  # noqa: E731
        self.z_prev, self.v_avg = to_dev(d.get("z_prev")), to_dev(d.get("v_avg"))
        self.v_count = int(d.get("v_count", 0))
        self.norm_prev = tuple(float(x) for x in d["norm_prev"]) if d.get("norm_prev") is not None else None  # type: ignore[assignment]
        self.c_by_source = {k: list(v) for k, v in d.get("c_by_source", {}).items()}
        rng = d.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "numpy" in rng:
            np.random.set_state(rng["numpy"])
        if "python" in rng:
            random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

