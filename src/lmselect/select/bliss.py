"""BLISS bilevel solver (METHODS §1.1–1.2): learn a score model whose soft reweighting of the training stream
minimises the proxy's validation loss.

Objective (upper / lower level)::

    min_θs  F(θ_p*(θ_s))                                   F = masked CE of the proxy on the validation set
    θ_p*(θ_s) = argmin_θp  G(θ_p, θ_s)
    G = Σ_i P_i · CE_i(θ_p) + γ · KL(target ‖ proxy) + λ · ‖θ_p‖²
    P = softmax(s_1 … s_B) over the *global* batch,  s_i = sigmoid(w · meanpool(h_s(x_i)) + b)

Three models: the **target** (KL teacher: frozen, eval mode, no grad), the **proxy** θ_p (trained by the inner
steps) and the **score model** θ_s (:class:`lmselect.models.scorer.SequenceScorer`).

One outer step (approximate implicit differentiation):

1. K inner AdamW steps on θ_p, each on a fresh training batch (P detached: the inner level does not move θ_s).
2. v = ∇_θp F on one validation batch.
3. z ≈ (H + λ_z I)⁻¹ v, H = ∇²_θp G on the outer training batch, by ``z_steps`` updates
   z ← z − η_z (H z + λ_z z − v) (each tensor's update clipped to unit norm), z re-initialised to ``z_init``;
   Hessian-vector products by double backward through the *math* attention path (fused SDPA is not twice
   differentiable). Under torchrun every z step uses the *global* H·z (per-rank HVPs all-reduced), so z is the
   single-process z of the global batch (see "Distributed" below).
4. c_i = ⟨∇_θp CE_i, z⟩ for every sequence of the outer batch.
5. Hypergradient  ∇Φ(θ_s) ≈ −∇_θs Σ_i P_i(θ_s) c_i  with c held constant.
6. AdamW step on θ_s (per-tensor gradient clip to unit norm, cosine schedule with warm-up).

Steps 4–5 have two implementations (``BlissConfig.hypergrad_impl``), both in :mod:`lmselect.select.bilevel_math`:
``per_sample`` (one backward per sequence through the proxy and one through the score model, as in the released
code; the test oracle and benchmark baseline) and ``batched`` (all c_i as one forward-mode directional derivative or
one double-backward pass, one backward through the score model). The two agree to floating-point tolerance (tests).
``auto`` = ``batched`` on accelerators, where one wide pass replaces B small serial ones (the released code's
bottleneck), and ``per_sample`` on CPU, where there is no parallel width to win: on an idle 2-core CPU
(``bench/bliss_step.py``, pythia-14m, batch 8, seq 128) per-sample c_i took 0.47 s vs 0.87 s (JVP) / 1.01 s
(double backward) at the 50k Pythia vocabulary, 0.13–0.14 s vs 0.11–0.16 s at a 4k vocabulary, and the whole
step differed by < 8 % because the z solve's Hessian-vector products are 75–90 % of it. That choice is for the
c_i; step 5 (one backward through the score model) is the batched VJP under ``auto`` on every device, which on the
CPU is 3x faster than B single-sequence passes and matters once ``hyper_batches`` repeats it per solve.

Distributed (torchrun): no DDP wrapper; gradients are summed by explicit all-reduce. Each rank holds B/W sequences;
scores are all-gathered so P is the global softmax; the inner loss on rank r is Σ_{i∈r} P_i CE_i + (γ KL_r + λ‖θ‖²)/W
so that the summed gradient is ∇G of the global batch. The single-process solver on the global batch is the
reference, and every collective below exists so that W ranks compute the same numbers (to rounding):

* v = ∇F of the *global* validation batch (``val_batch_size`` rows over all ranks): each rank divides its masked CE sum by
  the all-reduced token count and the gradients are summed, i.e. the token-weighted mean one process would take.
* H·z: rank r differentiates the unbiased local estimate G_r = W Σ_{i∈r} P_i CE_i + γ KL_r + λ‖θ‖² (W = 1: exactly
  G) and the HVPs are averaged across ranks *inside every z step*; mean_r G_r = G (equal local batches), so this is
  the global H·z. (Solving z per rank with its local H_r and v_r and averaging the z afterwards — the released
  code's and METHODS' "average of z across ranks" — is not the same: z_{k+1} depends on H_r z_k,r, and mean_r(H_r z_r)
  ≠ H mean_r(z_r) once the per-rank z differ; the update clip is nonlinear too.) Every rank then holds the same v
  and the same H·z, hence the same z, so the average of z across ranks is z itself and needs no collective.
* c_i on each rank's own rows with that z; c all-gathered for ∇_θs; score gradients summed.

Options and diagnostics (METHODS §1.2a): ``profile`` (``paper`` = the released code's behaviour, pinned by a test;
``default`` = the all-token objective), the selection ``objective``, ``z_warm_start`` / ``z_tol``, ``v_ema`` and
``val_batch_size: 0`` (whole set). Each outer step logs cos(z, v), ‖Hz‖/‖v‖, the z residual, the v agreement of two
validation batches, the share of var(c) between sources and the weight ratio; ``solve_round`` summarises them in
``diagnostics.json`` (with ``warnings``) and the manifest, and logs one warning line per round when the solve is
first-order or v noise-dominated.

Rank 0 writes all files.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

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
from lmselect.context import STREAM_METHOD, STREAM_SCORER_INIT, STREAM_SELECT, FlopContext, RoundContext
from lmselect.data.tokenizer import check_same_tokenizer, tokenizer_fingerprint
from lmselect.data.valset import ValidationSet
from lmselect.log import MetricLogger, log, read_jsonl
from lmselect.models.losses import token_ce, token_kl
from lmselect.models.scorer import SequenceScorer
from lmselect.select import bilevel_math as bm
from lmselect.select.base import Selection, SelectionMethod, register
from lmselect.train.distributed import rank_world

STATE_FILE = "solver_state.pt"
LOG_FILE = "bilevel_log.jsonl"
DIAG_FILE = "diagnostics.json"
SCORE_MODEL_DIR = "score_model"
# derived seeds: cfg.seed + offset
SEED_TRAIN_STREAM = 1
SEED_VAL_STREAM = 2
SEED_VAL_AGREE = 3  # the second validation batch of the v-agreement diagnostic (+ step)
STABILITY_SAMPLE = 1024  # candidates scored by both the previous and the current round's score model


@dataclass
class BlissConfig:
    """Every constant of METHODS §1.2; defaults are the released code's except the options of §1.2a (profile)."""

    gamma: float = 1e-2  # KL(target ‖ proxy) weight in G
    lam: float = 1e-7  # L2 weight λ‖θ_p‖² in G
    inner_steps: int = 1  # K
    outer_steps: int = 3000  # T per round
    z_steps: int | None = None  # gradient steps of the linear-system solve (None = the profile's: paper 3)
    z_lr: float = 1e-2  # η_z
    z_damping: float = 1e-2  # λ_z
    # z is re-initialised to this constant every outer step. METHODS says "a small constant"; any constant c in
    # every coordinate adds c·Σ_j ∂CE_i/∂θ_j to every c_i, which on a 0.6M-parameter proxy (‖z₀‖ = c·√n ≈ 0.79 for
    # c = 1e-3, measured in the demo) outweighs the 3·η_z·v part (≈ 0.07) and drowns the validation signal. 0 makes
    # the first z step η_z·v, the classic influence direction; set it to reproduce other choices.
    z_init: float = 0.0
    z_clip: float = 1.0  # per-tensor norm cap of each z update
    proxy_lr: float = 1e-5
    score_lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1  # AdamW, matrices (≥2-D) only, like lmselect.train
    proxy_clip: float = 1.0  # global grad-norm clip of the inner steps
    score_clip: float = 1.0  # per-tensor grad-norm clip of the score model
    warmup_ratio: float = 0.1  # linear warm-up fraction, then cosine to 0 (both optimizers)
    batch_size: int = 32  # global outer / inner batch, in sequences
    micro_batch: int | None = None  # per-rank chunk for memory (None = whole local batch)
    val_batch_size: int = 32  # validation sequences per outer step, all ranks together (like batch_size)
    hypergrad_impl: Literal["auto", "per_sample", "batched"] = "auto"  # auto: batched on GPU, per_sample on CPU
    batched_dots: Literal["jvp", "double_backward"] = "jvp"  # how the batched path gets all c_i
    cache_teacher: bool = True  # keep target logits of the outer batch across the z steps (memory B·L·V)
    seed: int = 0
    log_every: int = 10  # stdout cadence (every step goes to the jsonl)
    save_every: int = 100  # solver-state checkpoint cadence (outer steps)
    dtype: Literal["auto", "float32", "float64", "bfloat16", "float16"] = "auto"  # autocast dtype; auto = bf16 on CUDA
    # ---- options that give the solver a real signal (METHODS §1.2a). ``None`` = the profile's value (PROFILES):
    # ``paper`` is the released code's behaviour (final-word v of one batch, z re-initialised every step, a fixed
    # number of z steps); ``default`` is lmselect's choice, measured with bench/bliss_signal.py.
    profile: Literal["paper", "default"] = "default"
    objective: Literal["final_word", "all_tokens", "mix"] | None = None  # which validation tokens F counts
    objective_mix: float = 0.5  # `mix`: F = a·F_final_word + (1 − a)·F_all_tokens
    z_warm_start: bool | None = None  # start z from the previous outer step's z instead of z_init
    z_tol: float | None = None  # > 0: extra z steps (up to z_max_steps) until the relative residual < z_tol
    z_max_steps: int = 20
    v_ema: float | None = None  # > 0: v = bias-corrected running average of v over outer steps (β); 0 = off
    diag_every: int | None = None  # outer steps between the diagnostics that cost an HVP + a validation gradient
    # (None = log_every, 0 = never); the cheap ones are computed every step. val_batch_size 0 = the whole set.
    # c_i / ‖∇_θp CE_i‖ (a gradient cosine with z): the raw dot product ranks a sequence by its gradient norm as much
    # as by its direction, and one sentence repeated has the largest gradient norms of the pool (measured, issue 12)
    c_normalize: bool | None = None
    # extra score-model steps per z solve: each draws one more batch of batch_size sequences, takes their c_i with
    # the same z and takes one AdamW step on θ_s. The z solve is the expensive part of an outer step; the score
    # model is what has to generalise to the whole pool, and it sees only batch_size labels per outer step without.
    hyper_batches: int | None = None
    score_activation: Literal["sigmoid", "identity"] | None = None  # s = sigmoid(w·h + b) (paper) or w·h + b


# the values a ``None`` option takes under each profile (resolve_profile)
PROFILES: dict[str, dict[str, Any]] = {
    "paper": {"objective": "final_word", "z_warm_start": False, "z_tol": 0.0, "v_ema": 0.0, "c_normalize": False,
              "hyper_batches": 0, "score_activation": "sigmoid", "z_steps": 3},
    # measured (issue 12, bench/bliss_signal.py): the all-token objective is what aligns v with the validation set's
    # own kind of text; z warm start / tolerance / v EMA are offered but not yet measured to help at demo scale
    "default": {"objective": "all_tokens", "z_warm_start": False, "z_tol": 0.0, "v_ema": 0.0, "c_normalize": True,
                "hyper_batches": 7, "score_activation": "sigmoid", "z_steps": 1},
}
# warning thresholds (diagnostics.json "warnings"; METHODS §1.2a)
FIRST_ORDER_COS = 0.99  # cos(z, v) above this …
FIRST_ORDER_HZ = 0.1  # … and ‖Hz‖ / ‖v‖ below this: c_i is the plain gradient dot product ⟨∇CE_i, v⟩
NOISY_V_SIGNAL = 0.5  # estimated cos(v, E v) below this: the validation noise is larger than its signal


def resolve_profile(cfg: BlissConfig) -> BlissConfig:
    """A copy of ``cfg`` with every ``None`` option set from its profile; checks the options' ranges."""
    from dataclasses import replace

    if cfg.profile not in PROFILES:
        raise LmselectError(f"config key 'bliss.profile' must be one of {sorted(PROFILES)}, got {cfg.profile!r}")
    fill = {k: v for k, v in PROFILES[cfg.profile].items() if getattr(cfg, k) is None}
    out = replace(cfg, **fill)
    if out.objective not in ("final_word", "all_tokens", "mix"):
        raise LmselectError(f"config key 'bliss.objective' must be final_word, all_tokens or mix, got {out.objective!r}")
    checks = [("objective_mix", 0.0 <= out.objective_mix <= 1.0, "in [0, 1]"),
              ("v_ema", 0.0 <= float(out.v_ema) < 1.0, "in [0, 1)"), ("z_tol", float(out.z_tol) >= 0, ">= 0"),
              ("z_steps", int(out.z_steps) >= 1, ">= 1"),
              ("z_max_steps", out.z_max_steps >= out.z_steps or not out.z_tol, ">= z_steps when z_tol > 0"),
              ("val_batch_size", out.val_batch_size >= 0, ">= 0 (0 = the whole set)"),
              ("diag_every", out.diag_every is None or out.diag_every >= 0, ">= 0"),
              ("hyper_batches", int(out.hyper_batches) >= 0, ">= 0"),
              ("score_activation", out.score_activation in ("sigmoid", "identity"), "sigmoid or identity")]
    for key, ok, want in checks:
        if not ok:
            raise LmselectError(f"config key 'bliss.{key}' must be {want}, got {getattr(out, key)!r}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# small utilities: distributed, schedules, attention path, data streams


def _dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_gather_cat(t: Tensor) -> Tensor:
    """Concatenate equal-sized tensors of all ranks along dim 0 (no gradient: callers re-insert their own slice)."""
    if not _dist():
        return t
    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def all_reduce_(tensors: Sequence[Tensor], mean: bool = False) -> None:
    if not _dist():
        return
    w = torch.distributed.get_world_size()
    for t in tensors:
        torch.distributed.all_reduce(t)
        if mean:
            t.div_(w)


def warmup_cosine(total: int, warmup_ratio: float) -> Callable[[int], float]:
    """LR multiplier of optimizer step s (0-based): (s+1)/W during warm-up, then cosine from 1 to 0 at the end."""
    total = max(1, int(total))
    warm = max(1, int(round(warmup_ratio * total))) if warmup_ratio > 0 else 0

    def fn(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (s - warm) / max(1, total - warm))))

    return fn


def _adamw(params: Sequence[nn.Parameter], lr: float, cfg: BlissConfig) -> torch.optim.AdamW:
    from lmselect.train.schedules import param_groups  # the training loop's grouping: matrices decay, the rest not

    return torch.optim.AdamW(param_groups(((str(i), p) for i, p in enumerate(params)), cfg.weight_decay), lr=lr,
                             betas=tuple(cfg.betas))


@contextlib.contextmanager
def math_attention(*models: nn.Module) -> Iterator[None]:
    """Twice-differentiable attention for HVPs / forward-mode AD: SDPA restricted to the math backend, and models
    configured with a fused non-SDPA kernel (flash-attention) temporarily switched to eager attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    switched: list[tuple[nn.Module, str]] = []
    try:
        for m in models:
            impl = getattr(getattr(m, "config", None), "_attn_implementation", None)
            if impl not in (None, "sdpa", "eager"):
                m.set_attn_implementation("eager")
                switched.append((m, impl))
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        for m, impl in switched:
            m.set_attn_implementation(impl)


class IndexStream:
    """Deterministic, resumable batches of rows: epoch e is ``default_rng(seed + e).permutation(n)`` cut into global
    batches (last partial batch dropped); rank r takes rows [r·b, (r+1)·b) of each global batch. ``batch(k)`` is a
    pure function of k, so a resumed run recomputes its position instead of storing iterator state."""

    def __init__(self, n: int, global_batch: int, seed: int, rank: int = 0, world: int = 1):
        if n < 1:
            raise LmselectError("bilevel solver: no sequences to draw batches from")
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.global_batch = min(global_batch, n - n % world) if global_batch > n else global_batch
        if self.global_batch < world:
            raise LmselectError(f"bilevel solver: {n} sequences cannot feed {world} ranks")
        self.local = self.global_batch // world
        self.per_epoch = n // self.global_batch
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def batch(self, k: int) -> np.ndarray:
        g = self.global_rows(k)
        return g[self.rank * self.local : (self.rank + 1) * self.local]

    def global_rows(self, k: int) -> np.ndarray:
        """Rows of global batch k, all ranks' shares in rank order (rank r's ``batch(k)`` is its r-th slice)."""
        epoch, j = divmod(int(k), self.per_epoch)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng(self.seed + epoch).permutation(self.n)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm[j * self.global_batch : j * self.global_batch + self.local * self.world]


def _sq_norm(params: Sequence[Tensor]) -> Tensor:
    """‖θ‖² accumulated in float32 at least (float64 stays float64)."""
    return sum(p.to(torch.promote_types(p.dtype, torch.float32)).pow(2).sum() for p in params)  # type: ignore[return-value]


_FP = re.compile(r"[0-9a-f]{16}")


def _fingerprint(x: Any) -> str:
    if isinstance(x, str) and _FP.fullmatch(x) and not Path(x).exists():
        return x
    return tokenizer_fingerprint(x)


def check_compatible(
    proxy: nn.Module, target: nn.Module, scorer: SequenceScorer | None = None, *,
    proxy_tokenizer: Any = None, target_tokenizer: Any = None,
) -> None:
    """Raise LmselectError before any compute unless proxy, target (and score model) share one tokenizer.

    Tokenizers may be given as tokenizer objects, HF tokenizer directories or 16-hex fingerprints
    (``lmselect.data.tokenizer.tokenizer_fingerprint``). Independently, the models' vocabulary sizes must agree: the
    KL term compares the two output distributions token by token.
    """
    if proxy_tokenizer is not None and target_tokenizer is not None:
        if any(isinstance(t, str) and _FP.fullmatch(t) and not Path(t).exists() for t in (proxy_tokenizer, target_tokenizer)):
            fa, fb = _fingerprint(proxy_tokenizer), _fingerprint(target_tokenizer)
            if fa != fb:
                raise LmselectError(f"tokenizer mismatch: proxy ({fa}) and target ({fb}) must share one tokenizer")
        else:
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


def init_score_model(proxy: nn.Module, seed: int, activation: str = "sigmoid") -> SequenceScorer:
    """Round-1 score model: backbone deep-copied from the warm-up proxy, head ~ normal(0, 0.02), bias 0 (seeded)."""
    return SequenceScorer.from_causal_lm(proxy, activation=activation, seed=seed)


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

        self.p_opt = _adamw(self.p_params, cfg.proxy_lr, cfg)
        self.s_opt = _adamw(self.s_params, cfg.score_lr, cfg)
        self.p_sched = torch.optim.lr_scheduler.LambdaLR(self.p_opt, warmup_cosine(cfg.outer_steps * cfg.inner_steps, cfg.warmup_ratio))
        # one score step per outer step plus one per hyper batch: the schedule spans all of them
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

    # ---- configuration helpers --------------------------------------------------------------------------------
    @property
    def impl(self) -> str:
        if self.cfg.hypergrad_impl == "auto":  # measured choice, see the module docstring
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
                loss = loss + reg_scale * self.cfg.lam * _sq_norm(params)
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
        """(all scores, P over the global batch, this rank's P slice); P in float32 at least."""
        s_all = all_gather_cat(s_local.detach())
        p_all = torch.softmax(s_all.to(torch.promote_types(s_all.dtype, torch.float32)), 0)
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
                    loss = loss + self.cfg.lam * _sq_norm(self.p_params) / self.world
            loss.backward()
            tot += torch.stack([loss.detach().double(), kl.detach().double() / self.world, wce.detach().double()])
        all_reduce_([p.grad for p in self.p_params if p.grad is not None])
        all_reduce_([tot])
        gnorm = torch.nn.utils.clip_grad_norm_(self.p_params, self.cfg.proxy_clip if self.cfg.proxy_clip > 0 else float("inf"))
        self.p_opt.step()
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
        """H·vec with H = ∇²_θp G of the global batch: each rank's HVP of its local estimate G_r (module docstring),
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
        init = self.z_prev if (cfg.z_warm_start and self.z_prev is not None) else cfg.z_init
        z, info = bm.solve_z(hvp, v, steps=cfg.z_steps, lr=cfg.z_lr, damping=cfg.z_damping, init=init,
                             clip=cfg.z_clip, tol=float(cfg.z_tol), max_steps=cfg.z_max_steps, return_info=True)
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
        self.s_sched.step()
        self.s_opt.zero_grad(set_to_none=True)
        return norm

    def outer_step(self, train_batches: Iterator[Tensor], sources: Sequence[str] | None = None) -> dict[str, float]:
        """One outer step; draws K + 1 batches ([B_local, L] LongTensors) from ``train_batches``:
        K for the inner steps, one fresh outer batch for the HVPs, the c_i and the hypergradient.
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
        # hyper batches: more labelled sequences for θ_s from the same z (steps 4–6 again on a fresh batch)
        for _ in range(int(self.cfg.hyper_batches)):
            ids = next(train_batches).to(self.device)
            s_all, _, _ = self.global_weights(self.scores(ids))
            self.score_update(self.score_grads(ids, s_all, self.compute_c(ids, hg.z)))
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


# ----------------------------------------------------------------------------------------------------------------
# one round: stream, log, checkpoint, resume, finalise


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
                                                     "c_normalize", "hyper_batches", "score_activation")}}


def train_stream(cfg: BlissConfig, n: int, rank: int = 0, world: int = 1) -> IndexStream:
    """The seeded order in which a round's ``n`` candidates feed the solver (this rank's rows of each batch)."""
    return IndexStream(n, cfg.batch_size, cfg.seed + SEED_TRAIN_STREAM, rank, world)


def batches_per_step(cfg: BlissConfig) -> int:
    """Training batches one outer step draws: K inner, one outer, one per hyper batch."""
    return cfg.inner_steps + 1 + int(cfg.hyper_batches)


def step_batches(pool: Any, train_ids: np.ndarray, stream: IndexStream, cfg: BlissConfig, step: int) -> Iterator[Tensor]:
    """The batches of outer step ``step`` (and on), as :meth:`BilevelSolver.outer_step` draws them."""
    k = step * batches_per_step(cfg)
    while True:
        yield pool.batch(train_ids[stream.batch(k)])
        k += 1


def _save_state(solver: BilevelSolver, out_dir: Path) -> None:
    if solver.rank == 0:
        with atomic_path(out_dir / STATE_FILE) as tmp:
            torch.save(solver.state_dict(), tmp)
    if _dist():
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
        fp_t = _fingerprint(target_tokenizer)
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
    per_step = batches_per_step(cfg)

    has_sources = callable(getattr(pool, "sources", None))

    def outer_sources(step: int) -> list[str] | None:
        """Sources of the global outer batch of outer step ``step`` (the last of its K + 1 batches)."""
        if not has_sources:
            return None
        return [str(x) for x in pool.sources(train_ids[stream.global_rows(step * per_step + cfg.inner_steps)])]

    logger = MetricLogger(out_dir / LOG_FILE if rank == 0 else None, stdout_every=cfg.log_every, prefix="bliss ")
    from lmselect.log import Progress

    bar = Progress(cfg.outer_steps, initial=solver.step, desc="bliss", unit="outer step", enabled=progress and rank == 0)
    last: dict[str, float] = {}
    try:
        while solver.step < cfg.outer_steps:
            last = solver.outer_step(step_batches(pool, train_ids, stream, cfg, solver.step), outer_sources(solver.step))
            logger.log(solver.step, **last)
            bar.update(1, F=last["upper_loss"], G=last["lower_loss"])
            stopping = stop_after is not None and solver.step >= stop_after and solver.step < cfg.outer_steps
            if solver.step % max(1, cfg.save_every) == 0 or stopping:
                _save_state(solver, out_dir)
            if stopping:
                return scorer
    finally:
        bar.close()
        logger.close()

    if rank == 0:
        diagnostics = summarise_diagnostics(read_jsonl(out_dir / LOG_FILE), solver.c_by_source, cfg)
        if diagnostics["warnings"]:  # one line per round
            log.warning("bliss %s: %s", out_dir, "; ".join(diagnostics["warnings"]))
        atomic_write_text(out_dir / DIAG_FILE, json.dumps(diagnostics, indent=2) + "\n")
        scorer.save_pretrained(out_dir / SCORE_MODEL_DIR, extra={"tokenizer_fingerprint": getattr(pool, "tokenizer_fingerprint", "")})
        write_manifest(out_dir, Manifest(
            kind="bilevel", config=to_dict(cfg), seed=cfg.seed, parents=parents or [],
            counts={"outer_steps": solver.step, "train_candidates": int(len(train_ids)),
                    "sequences_seen": int(solver.step * per_step * cfg.batch_size)},
            timings={"solve_s": solver.elapsed},
            extra={"hypergrad_impl": solver.impl, "world_size": world, "final": last,
                   "tokenizer_fingerprint": getattr(pool, "tokenizer_fingerprint", ""),
                   "diagnostics": {k: v for k, v in diagnostics.items() if k != "c_by_source"}},
        ))
        state_path.unlink(missing_ok=True)  # the manifest marks completion; the large state is no longer needed
    if _dist():
        torch.distributed.barrier()
    return scorer


# ----------------------------------------------------------------------------------------------------------------
# the pipeline method


@register
class Bliss(SelectionMethod):
    """BLISS in the multi-round runner (METHODS §1.3): per round (a) the proxy is reset to the warm-up proxy, the
    score model is inherited from round r-1 (round 1: the warm-up proxy's backbone + a fresh head) and the KL teacher
    is the target at the end of round r-1; the bilevel solve runs on the round's candidates; (b) the score model
    scores every candidate; (c) the top ``select_fraction`` is kept deterministically (ties by sequence id)."""

    name = "bliss"
    description = "bilevel influence scoring: a score model trained so that its reweighting lowers the proxy's validation loss"
    config_cls = BlissConfig
    needs = frozenset({"proxy", "selection_set"})
    stages = ("bilevel", "scores", "selection", "target", "eval")
    collective = True  # the solve and the scoring are distributed-aware (global-batch math, rank-sharded scoring)
    color = "#1f77b4"

    def resolved_config(self) -> BlissConfig:
        return resolve_profile(self.cfg)  # the profile's values count for stage identity

    def check_config(self) -> None:
        super().check_config()
        resolve_profile(self.cfg)  # profile, objective and option ranges, each error naming bliss.<key>
        for key in ("outer_steps", "batch_size", "inner_steps"):
            if getattr(self.cfg, key) < 1:
                raise LmselectError(f"recipe key 'bliss.{key}': must be >= 1, got {getattr(self.cfg, key)}")

    def select(self, ctx: RoundContext) -> Selection:
        from lmselect.artifacts import parent_ref
        from lmselect.config import replace
        from lmselect.score import read_scores, score_pool
        from lmselect.select.topk import top_fraction
        from lmselect.train.checkpoint import load_checkpoint_model

        bdir, sdir = ctx.stage_dir("bilevel"), ctx.stage_dir("scores")
        proxy = load_checkpoint_model(ctx.run.layout.warmup("proxy"), device=ctx.device)
        target = load_checkpoint_model(ctx.prev_target, device=ctx.device)
        prev = ctx.prev_stage_dir("bilevel")
        if prev is None:
            scorer = init_score_model(proxy, seed=ctx.derived_seed(STREAM_SCORER_INIT, per_round=False),
                                      activation=resolve_profile(self.cfg).score_activation)
        else:
            scorer = SequenceScorer.load(prev / SCORE_MODEL_DIR, device=ctx.device)
        cfg = replace(self.cfg, seed=ctx.derived_seed(STREAM_METHOD))
        # rank stability: the inherited (previous round's) score model on a seeded sample of this round's
        # candidates, compared after the solve with this round's scores of the same sequences
        stab_ids = stab_prev = None
        if prev is not None:
            rng = np.random.default_rng(ctx.derived_seed(STREAM_SELECT))
            stab_ids = np.sort(rng.choice(ctx.candidates, min(STABILITY_SAMPLE, len(ctx.candidates)), replace=False))
            stab_prev = score_sequences(scorer, ctx.pool, stab_ids, ctx.recipe.score_batch_size, ctx.device)
        scorer = solve_round(cfg, proxy, target, scorer, ctx.candidates, ctx.pool, ctx.selection_set, bdir,
                             device=ctx.device)
        del proxy, target
        # under torchrun each rank scores its own part; the last part to finish writes the manifest, so wait for
        # every rank before reading
        score_pool(scorer, ctx.pool, ctx.candidates, sdir, batch_size=ctx.recipe.score_batch_size, device=ctx.device,
                   progress=ctx.run.is_main)
        ctx.run.sync()
        ids, scores = read_scores(sdir)
        diag: dict[str, Any] = {}
        if stab_ids is not None and stab_prev is not None:
            from lmselect.select.diagnostics import spearman

            diag["rank_stability"] = {"spearman_prev_round": spearman(stab_prev, _aligned(stab_ids, ids, scores)),
                                      "n": int(len(stab_ids)), "scorers": f"round {ctx.round - 1} vs round {ctx.round}"}
        return Selection(top_fraction(ids, scores, ctx.fraction), scores=_aligned(ctx.candidates, ids, scores),
                         parents=[parent_ref(bdir), parent_ref(sdir)], diagnostics=diag)

    def selection_flops(self, f: FlopContext) -> float:
        b, T = resolve_profile(self.cfg), f.seq_len
        hb = int(b.hyper_batches)
        npx, nt = f.params(f.recipe.proxy.preset), f.params(f.recipe.target.preset)
        per_outer = (
            b.inner_steps * b.batch_size * T * (6 * npx + 2 * nt)  # inner AdamW steps on G (proxy fwd+bwd, teacher fwd)
            + b.val_batch_size * T * 6 * npx  # validation gradient
            + b.z_steps * b.batch_size * T * 12 * npx  # Hessian-vector products (double backward ≈ 2× fwd+bwd)
            + (1 + hb) * b.batch_size * T * 6 * npx  # c_i (one JVP / double-backward pass), also per hyper batch
            + (1 + hb) * b.batch_size * T * 6 * npx  # score model forward + backward, also per hyper batch
        )
        return float(b.outer_steps * per_outer + f.shard_size * T * 2 * npx)  # + scoring the shard


def score_sequences(scorer: SequenceScorer, pool: Any, ids: np.ndarray, batch_size: int, device: Any) -> np.ndarray:
    """The score model's scores of pool sequences ``ids`` in memory (for small samples), through the same forward
    (no grad, the device's autocast dtype) as ``score_pool`` uses for the sidecar they are compared with."""
    from lmselect.score.job import forward_scores, resolve_amp_dtype

    dev = torch.device(device) if device is not None else next(scorer.parameters()).device
    amp, was = resolve_amp_dtype(None, dev), scorer.training
    scorer.eval()
    out = [forward_scores(scorer, pool.batch(ids[i : i + batch_size]), None, dev, amp)
           for i in range(0, len(ids), batch_size)]
    scorer.train(was)
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def _aligned(cand: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``scores`` (keyed by ``ids``) in the order of ``cand``."""
    pos = {int(i): k for k, i in enumerate(ids)}
    return np.asarray([scores[pos[int(c)]] for c in cand], dtype=np.float64)
