"""BLISS settings (METHODS §1.2, §1.2a): ``BlissConfig``, the profiles' values of its ``None`` options
(``PROFILES``, ``resolve_profile``), the offsets of the solver's derived seeds and the warning thresholds of
``diagnostics.json``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from lmselect.artifacts import LmselectError

# derived seeds: cfg.seed + offset
SEED_TRAIN_STREAM = 1
SEED_VAL_STREAM = 2
SEED_VAL_AGREE = 3  # the second validation batch of the v-agreement diagnostic (+ step)


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
