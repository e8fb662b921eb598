"""BLISS, bilevel influence scoring (METHODS §1.1–1.3): learn a score model whose soft reweighting of the training stream
minimises the proxy's validation loss.

Objective (upper / lower level)::

    min_θs  F(θ_p*(θ_s))                                   F = masked CE of the proxy on the validation set
    θ_p*(θ_s) = argmin_θp  G(θ_p, θ_s)
    G = Σ_i P_i · CE_i(θ_p) + γ · KL(target ‖ proxy) + λ · ‖θ_p‖²
    P = softmax(s_1 … s_B) over the *global* batch,  s_i = sigmoid(w · meanpool(h_s(x_i)) + b)

Three models: the **target** (KL teacher: frozen, eval mode, no grad), the **proxy** θ_p (trained by the inner
steps) and the **score model** θ_s (:class:`lmselect.models.scorer.SequenceScorer`).

One outer step (approximate implicit differentiation):

1. K inner AdamW steps on θ_p, each on a training batch (P detached: the inner level does not move θ_s).
2. v = ∇_θp F on one validation batch.
3. z ≈ (H + λ_z I)⁻¹ v, H = ∇²_θp G on the outer training batch (``outer_batch``: a fresh batch, or the released
   code's stream batch t), by ``z_steps`` updates z ← z − η_z (H z + λ_z z − v), per tensor either the step or (as
   released) the residual clipped to norm ``z_clip`` (``z_clip_mode``), z re-initialised to ``z_init`` (a constant,
   or the released 1/numel per tensor);
   Hessian-vector products by double backward through the *math* attention path (fused SDPA is not twice
   differentiable). Under torchrun every z step uses the *global* H·z (per-rank HVPs all-reduced), so z is the
   single-process z of the global batch (see "Distributed" below).
4. c_i = ⟨∇_θp CE_i, z⟩ for every sequence of the outer batch.
5. Hypergradient  ∇Φ(θ_s) ≈ −∇_θs Σ_i P_i(θ_s) c_i  with c held constant.
6. AdamW step on θ_s (per-tensor gradient clip to unit norm, cosine schedule with warm-up).

Steps 4–5 have two implementations (``BlissConfig.hypergrad_impl``), both in :mod:`lmselect.select.bliss.bilevel_math`:
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

Options and diagnostics (METHODS §1.2a): ``profile`` (``paper`` = the released code's single-process behaviour,
checked against a transcription of its loop to 1e-10 by tests/select/test_bliss_released.py, its bugs not
reproduced, METHODS §1.2; ``default`` = lmselect's measured choices, each difference an option), the selection ``objective``, ``z_warm_start`` / ``z_tol``, ``v_ema`` and
``val_batch_size: 0`` (whole set). Each outer step logs cos(z, v), ‖Hz‖/‖v‖, the z residual, the v agreement of two
validation batches, the share of var(c) between sources and the weight ratio; ``solve_round`` summarises them in
``diagnostics.json`` (with ``warnings``) and the manifest, and logs one warning line per round when the solve is
first-order or v noise-dominated.

Rank 0 writes all files.

Modules (each says what it holds):

* :mod:`.config`: ``BlissConfig`` (every constant of METHODS §1.2), the ``PROFILES`` and ``resolve_profile``, the
  derived-seed offsets and the diagnostics' warning thresholds;
* :mod:`.bilevel_math`: the model-agnostic math on parameter tuples and closures (z solve, HVP, c_i, hypergradient);
* :mod:`.solver`: ``BilevelSolver`` (the three models, both optimizers, ``outer_step`` = steps 1–6 above) and
  ``Hypergradient``; ``check_compatible``, ``init_score_model``;
* :mod:`.round`: one round's solve — the training stream, per-step log, checkpoint / resume, ``diagnostics.json``
  and the ``bilevel`` manifest (``solve_round``);
* :mod:`.method`: the registered ``Bliss`` selection method (rounds, scoring, top fraction, rank stability).

Generic helpers live in the rooms that own them: collectives in :mod:`lmselect.train.distributed`, the LR multiplier
and the AdamW builder in :mod:`lmselect.train.schedules`, the batch stream in :mod:`lmselect.train.order`, the
twice-differentiable attention switch in :mod:`lmselect.models.util`, tokenizer checks in
:mod:`lmselect.data.tokenizer`.
"""

from lmselect.select.bliss import bilevel_math
from lmselect.select.bliss.config import (
    FIRST_ORDER_COS,
    FIRST_ORDER_HZ,
    NOISY_V_SIGNAL,
    PROFILES,
    BlissConfig,
    resolve_profile,
)
from lmselect.select.bliss.method import Bliss, score_sequences
from lmselect.select.bliss.round import (
    DIAG_KEYS,
    batches_per_step,
    distinct_batches,
    solve_round,
    step_batches,
    summarise_diagnostics,
    train_batch_indices,
    train_stream,
)
from lmselect.select.bliss.solver import BilevelSolver, Hypergradient, check_compatible, init_score_model
from lmselect.train.order import IndexStream

__all__ = [
    "DIAG_KEYS", "FIRST_ORDER_COS", "FIRST_ORDER_HZ", "NOISY_V_SIGNAL", "PROFILES", "BilevelSolver", "Bliss",
    "BlissConfig", "Hypergradient", "IndexStream", "batches_per_step", "bilevel_math", "check_compatible", "distinct_batches",
    "init_score_model", "resolve_profile", "score_sequences", "solve_round", "step_batches", "summarise_diagnostics",
    "train_batch_indices", "train_stream",
]
