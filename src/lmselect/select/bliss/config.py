"""BLISS settings (METHODS §1.2, §1.2a): ``BlissConfig``, the profiles' values of its ``None`` options
(``PROFILES``, ``resolve_profile``), the offsets of the solver's derived seeds and the warning thresholds of
``diagnostics.json``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from lmselect.artifacts import LmselectError

# derived seeds: cfg.seed + offset
SEED_TRAIN_STREAM = 1
SEED_VAL_STREAM = 2
SEED_VAL_AGREE = 3  # the second validation batch of the v-agreement diagnostic (+ step)


@dataclass
class BlissConfig:
    """Every constant of METHODS §1.2; defaults are the released code's except the options of §1.2a, whose ``None``
    takes the profile's value (PROFILES: ``paper`` the released code's, ``default`` lmselect's)."""

    gamma: float = 1e-2  # KL(target ‖ proxy) weight in G
    lam: float = 1e-7  # L2 weight λ‖θ_p‖² in G
    inner_steps: int = 1  # K
    outer_steps: int = 3000  # T per round
    z_steps: int | None = None  # gradient steps of the linear-system solve (None = the profile's: paper 3)
    z_lr: float = 1e-2  # η_z
    z_damping: float = 1e-2  # λ_z
    # z is re-initialised to this every outer step (None = the profile's). A float fills every coordinate; any
    # constant c adds c·Σ_j ∂CE_i/∂θ_j to every c_i, which on a 0.6M-parameter proxy (‖z₀‖ = c·√n ≈ 0.79 for
    # c = 1e-3, measured in the demo) outweighs the 3·η_z·v part (≈ 0.07) and drowns the validation signal; 0
    # (default profile) makes the first z step η_z·v, the classic influence direction. "inv_numel" (paper) is the
    # released code's 1/numel(θ_k) per tensor, float16-rounded in a solve's first outer step, float32 after
    # (bilevel_selection.py:375, 513; bilevel_math.inv_numel_init).
    z_init: float | str | None = None
    z_clip: float = 1.0  # per-tensor norm cap in the z loop (of the step or of the residual: z_clip_mode)
    # what z_clip caps (None = the profile's): "step" = the update η_z·r (default; bites only when ‖r‖ > z_clip/η_z),
    # "residual" = r before the step, the released code (bilevel_selection.py:474-478; it normalises r to unit norm,
    # the same as z_clip = 1)
    z_clip_mode: Literal["residual", "step"] | None = None
    proxy_lr: float = 1e-5
    score_lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1  # AdamW, both optimizers
    # also decay 1-D tensors (biases, LayerNorm), one AdamW group as released (bilevel_selection.py:272-289); the
    # default profile decays matrices (≥ 2-D) only, like lmselect.train. None = the profile's
    weight_decay_1d: bool | None = None
    proxy_clip: float = 1.0  # global grad-norm clip of the inner steps
    score_clip: float = 1.0  # per-tensor grad-norm clip of the score model
    warmup_ratio: float = 0.1  # linear warm-up fraction, then cosine to 0 (both optimizers)
    # "lmselect": warm-up multiplier (s+1)/W with W = round(ratio·steps), the proxy schedule stepped per inner step
    # over outer_steps·K and the score schedule per score step; "released": transformers'
    # get_cosine_schedule_with_warmup as the released code uses it (bilevel_selection.py:359-368, 553-554): s/W with
    # the unrounded W = ratio·outer_steps, so outer step 1 runs at LR 0, both schedules stepped once per outer step.
    schedule: Literal["released", "lmselect"] | None = None
    batch_size: int = 32  # global outer / inner batch, in sequences
    micro_batch: int | None = None  # per-rank chunk for memory (None = whole local batch)
    # which training batch is the outer batch (H, c_i, hypergradient). "fresh": a new batch after the K inner ones.
    # "released": the released code's two cursors on one stream (bilevel_selection.py:392-403): inner steps read
    # stream batches t·K … t·K+K−1, the outer batch is stream batch t (K = 1: the batch just trained on); hyper
    # batches continue the outer cursor (train_batch_indices). None = the profile's
    outer_batch: Literal["released", "fresh"] | None = None
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
    # round-1 score head: "normal" = N(0, 0.02) weight, zero bias (METHODS); "torch_default" = nn.Linear's default
    # U(±1/√d) weight and bias, which is what the released code ends up with (its head is replaced after the weight
    # init, bilevel_selection.py:246, 254-257). Seeded either way. None = the profile's
    score_head_init: Literal["torch_default", "normal"] | None = None
    # inner-step and Hessian weights w_i: "fresh" = softmax of the batch's scores; "previous" = exp(s_i − m)/S with
    # the max m and normaliser S of the previous outer step's (global) outer batch, as released
    # (bilevel_selection.py:409-410, 449-450; the hypergradient's own softmax is always fresh). None = the profile's
    softmax_normaliser: Literal["previous", "fresh"] | None = None


# the values a ``None`` option takes under each profile (resolve_profile)
PROFILES: dict[str, dict[str, Any]] = {
    # the released code's single-process behaviour (bilevel_selection.py at 420da66), checked against a
    # transcription of its loop to 1e-10 (tests/select/test_bliss_released.py); its bugs are not reproduced
    # (METHODS §1.2)
    "paper": {"objective": "final_word", "z_warm_start": False, "z_tol": 0.0, "v_ema": 0.0, "c_normalize": False,
              "hyper_batches": 0, "score_activation": "sigmoid", "z_steps": 3,
              "z_init": "inv_numel", "z_clip_mode": "residual", "weight_decay_1d": True, "outer_batch": "released",
              "schedule": "released", "score_head_init": "torch_default", "softmax_normaliser": "previous"},
    # measured (issue 12, bench/bliss_signal.py): the all-token objective is what aligns v with the validation set's
    # own kind of text; z warm start / tolerance / v EMA are offered but not yet measured to help at demo scale.
    # Each difference from the released code and its measured effect: METHODS §1.2
    "default": {"objective": "all_tokens", "z_warm_start": False, "z_tol": 0.0, "v_ema": 0.0, "c_normalize": True,
                "hyper_batches": 7, "score_activation": "sigmoid", "z_steps": 1,
                "z_init": 0.0, "z_clip_mode": "step", "weight_decay_1d": False, "outer_batch": "fresh",
                "schedule": "lmselect", "score_head_init": "normal", "softmax_normaliser": "fresh"},
}
Z_INIT_NAMES = ("inv_numel",)  # the named z initialisations (besides a float fill)
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
              ("score_activation", out.score_activation in ("sigmoid", "identity"), "sigmoid or identity"),
              ("z_clip_mode", out.z_clip_mode in ("residual", "step"), "residual or step"),
              ("z_clip", out.z_clip > 0, "> 0"),
              ("weight_decay_1d", isinstance(out.weight_decay_1d, bool), "true or false"),
              ("outer_batch", out.outer_batch in ("released", "fresh"), "released or fresh"),
              ("schedule", out.schedule in ("released", "lmselect"), "released or lmselect"),
              ("score_head_init", out.score_head_init in ("torch_default", "normal"), "torch_default or normal"),
              ("softmax_normaliser", out.softmax_normaliser in ("previous", "fresh"), "previous or fresh")]
    for key, ok, want in checks:
        if not ok:
            raise LmselectError(f"config key 'bliss.{key}' must be {want}, got {getattr(out, key)!r}")
    return replace(out, z_init=_check_z_init(out.z_init))


def _check_z_init(value: Any) -> float | str:
    """``bliss.z_init``: a finite float (a string holding one is converted) or one of Z_INIT_NAMES."""
    if isinstance(value, str) and value in Z_INIT_NAMES:
        return value
    try:
        if isinstance(value, bool):
            raise ValueError
        f = float(value)
    except (TypeError, ValueError):
        f = math.nan
    if not math.isfinite(f):
        raise LmselectError(f"config key 'bliss.z_init' must be a finite number or one of {list(Z_INIT_NAMES)}, "
                            f"got {value!r}")
    return f
