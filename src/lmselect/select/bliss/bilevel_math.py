"""Model-agnostic math of the BLISS bilevel solver (METHODS §1.2), on tuples of parameter tensors and closures.

Everything here works on ``params``: a tuple of tensors, and on *closures* ``fn(params, ...) -> Tensor``. The solver
(:mod:`lmselect.select.bliss.solver`) builds those closures from Hugging Face models with ``torch.func.functional_call``;
the tests build them from tiny hand-written problems. Both run exactly these functions, so a check on a toy problem
(hypergradient vs finite differences of the converged validation loss) is a check of the solver's math.

Implicit hypergradient. With θ_p*(θ_s) = argmin G(θ_p, θ_s) and ∇_θp G(θ_p*, θ_s) = 0,

    dF/dθ_s = −(∂²G/∂θ_s∂θ_p) · H⁻¹ · ∇_θp F,       H = ∇²_θp G,
            = −∇_θs ⟨∇_θp G(θ_p, θ_s), z⟩ |_{z const},  z = H⁻¹ v,  v = ∇_θp F.

Only the weighted-CE term of G = Σ_i P_i(θ_s) CE_i(θ_p) + γ KL + λ‖θ_p‖² depends on θ_s, so

    dF/dθ_s = −∇_θs Σ_i P_i(θ_s) c_i,   c_i = ⟨∇_θp CE_i, z⟩  (c held constant),

and with P = softmax(s), ∂/∂s_j [−Σ_i P_i c_i] = −P_j (c_j − Σ_i P_i c_i)  (:func:`softmax_weight_grad`).

z is approximated by a few damped gradient steps on ½ zᵀ(H + λ_z I)z − vᵀz (:func:`solve_z`, the clip on the
step or, as released, on the residual), from 0, a constant, the released 1/numel (:func:`inv_numel_init`) or the
previous z, optionally run to a residual tolerance; :func:`cosine` and :func:`source_variance_share` are the solver's
diagnostics (METHODS §1.2a).

Two ways to get the c_i and the hypergradient:

* per-sample (the authors' released code; kept as oracle / baseline): one backward pass per sequence for ∇CE_i
  (:func:`dots_per_sample`), and one backward pass per sequence through the score model (:func:`hypergrad_per_sample`);
* batched: all c_i at once as the directional derivative d/dε CE_i(θ_p + ε z) — one forward-mode pass
  (:func:`dots_jvp`, ``torch.func.jvp``) or one double-backward pass w.r.t. dummy weights u = 1
  (:func:`dots_double_backward`) — and one backward pass through the score model over the whole batch with the
  upstream gradient ∂/∂s from autograd through the softmax (:func:`hypergrad_batched`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

Params = tuple[Tensor, ...]
# fn(params, idx) -> per-sequence values [len(idx)] for the rows ``idx`` (a slice) of the current batch
PerSeqFn = Callable[[Params, slice], Tensor]
ScalarFn = Callable[[Params], Tensor]


# ----------------------------------------------------------------------------------------------------------------
# parameter-tuple algebra


def tree_dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Σ over tensors of ⟨a_k, b_k⟩, accumulated in float32 at least (bf16 sums lose too many digits)."""
    acc_dtype = torch.promote_types(a[0].dtype, torch.float32)
    return sum(((x.to(acc_dtype) * y.to(acc_dtype)).sum() for x, y in zip(a, b)), torch.zeros((), dtype=acc_dtype, device=a[0].device))


def tree_norm(a: Sequence[Tensor]) -> Tensor:
    return tree_dot(a, a).sqrt()


def sq_norm(params: Sequence[Tensor]) -> Tensor:
    """‖θ‖² accumulated in float32 at least (float64 stays float64)."""
    return sum(p.to(torch.promote_types(p.dtype, torch.float32)).pow(2).sum() for p in params)  # type: ignore[return-value]


def chunks(n: int, size: int | None) -> list[slice]:
    """Contiguous slices of ``range(n)`` of at most ``size`` rows (one slice when size is None)."""
    size = n if not size or size <= 0 else size
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


# ----------------------------------------------------------------------------------------------------------------
# gradients and Hessian-vector products


def grad_of(fn: ScalarFn, params: Params) -> Params:
    """∇ fn(params) as a tuple (zeros for tensors that do not influence fn)."""
    loss = fn(params)
    g = torch.autograd.grad(loss, params, allow_unused=True)
    return tuple(torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g))


def hvp(fn: ScalarFn, params: Params, vec: Sequence[Tensor]) -> Params:
    """Hessian-vector product ∇²fn · vec by double backward: ∇_θ ⟨∇_θ fn(θ), vec⟩.

    ``params`` must be leaves with ``requires_grad``. The caller is responsible for an attention implementation
    that is twice differentiable (fused SDPA kernels are not; see ``lmselect.models.util.math_attention``).
    """
    loss = fn(params)
    g = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    pairs = [(gi, vi) for gi, vi in zip(g, vec) if gi is not None]
    inner = tree_dot([gi for gi, _ in pairs], [vi.detach() for _, vi in pairs])
    hv = torch.autograd.grad(inner, params, allow_unused=True)
    return tuple(torch.zeros_like(p) if h is None else h.detach() for p, h in zip(params, hv))


@dataclass
class ZSolveInfo:
    """What :func:`solve_z` learned about its own solve."""

    steps: int  # z updates taken
    residual: float | None  # ‖(H + λ_z I) z − v‖ / ‖v‖ at the returned z, when it was computed (tolerance stop)
    hz: Params | None  # H z at the returned z, when it was computed


def inv_numel_init(like: Sequence[Tensor], first_step: bool) -> Params:
    """The released code's z₀: 1/numel(θ_k) in every entry of tensor k, as that code *stores* it.

    It builds ``1/numel * torch.ones(...)`` in float32 (fp32(1/n)) and, before the first outer step of a run only,
    casts it to float16 (bilevel_selection.py:375; after every step it is rebuilt in float32, :513). Float16 rounds
    1/n by up to 2⁻¹¹ relative and to 0 for n ≥ 2²⁵ (pythia-160m's embedding starts its first step at z = 0). The
    stored value is widened exactly to each tensor's dtype."""
    out = []
    for t in like:
        stored = torch.tensor(1.0 / t.numel(), dtype=torch.float32)
        if first_step:
            stored = stored.to(torch.float16)
        out.append(torch.full_like(t, float(stored)))
    return tuple(out)


def solve_z(
    hvp_fn: Callable[[Params], Params],
    v: Sequence[Tensor],
    *,
    steps: int,
    lr: float,
    damping: float,
    init: float | Sequence[Tensor] = 0.0,
    clip: float | None = 1.0,
    clip_mode: str = "step",
    tol: float = 0.0,
    max_steps: int | None = None,
    return_info: bool = False,
) -> Params | tuple[Params, ZSolveInfo]:
    """Approximate z ≈ (H + λ_z I)⁻¹ v by ``steps`` gradient steps  z ← z − η_z (H z + λ_z z − v).

    ``clip_mode`` says what is clipped, per tensor, to norm ``clip`` (METHODS §1.2):

    * ``step``: the update η_z·r (r = H z + λ_z z − v), so a large curvature direction cannot blow z up in the first
      step; the clip bites only when ‖r‖ > clip/η_z (lmselect's default profile);
    * ``residual``: r itself before the step, so no tensor of z moves by more than η_z·clip per update. This is the
      released code's z loop (bilevel_selection.py:474-478 at 420da66), which normalises r to *unit* norm when
      ‖r‖ > grad_clip; at its default grad_clip = 1 (and ``z_clip`` = 1) the two are the same operation.

    With the clip inactive this is plain Richardson iteration, which converges to the exact solve when
    0 < η_z < 2 / λ_max(H + λ_z I).
    ``init``: a constant fill value or tensors (a warm start from the previous outer step's z, or the released
    per-tensor 1/numel of :func:`inv_numel_init`).
    ``tol`` > 0: after the first ``steps`` updates keep going, up to ``max_steps`` updates in all, until the relative
    residual ‖(H + λ_z I) z − v‖ / ‖v‖ < tol. The residual of the current z is the update direction the next step
    computes anyway, so checking it costs nothing; a tolerance stop returns that residual and H z with the z.
    """
    if clip_mode not in ("step", "residual"):
        raise ValueError(f"clip_mode must be step or residual, got {clip_mode!r}")
    zero_start = isinstance(init, (int, float)) and float(init) == 0.0
    if isinstance(init, (int, float)):
        z = tuple(torch.full_like(vi, float(init)) for vi in v)
    else:
        z = tuple(t.detach().clone() for t in init)
    total = max(steps, max_steps or steps) if tol > 0 else steps
    v_norm = float(tree_norm(v)) if tol > 0 else 0.0
    info = ZSolveInfo(steps=0, residual=None, hz=None)
    for k in range(total):
        # H·0 = 0 exactly: from a zero start the first step needs no Hessian-vector product.
        hz = tuple(torch.zeros_like(zi) for zi in z) if (k == 0 and zero_start) else hvp_fn(z)
        r = tuple(hi + damping * zi - vi for zi, hi, vi in zip(z, hz, v))
        if tol > 0 and k >= steps:
            res = float(tree_norm(r)) / max(v_norm, 1e-300)
            if res < tol:
                info.residual, info.hz = res, hz
                break
        new = []
        for zi, ri in zip(z, r):
            if clip is not None and clip_mode == "residual":
                n = ri.norm()
                upd = lr * (ri * (clip / n) if n > clip else ri)
            else:
                upd = lr * ri
                if clip is not None:
                    n = upd.norm()
                    if n > clip:
                        upd = upd * (clip / n)
            new.append(zi - upd)
        z = tuple(new)
        info.steps += 1
    return (z, info) if return_info else z


# ----------------------------------------------------------------------------------------------------------------
# c_i = <grad CE_i, z>


def dots_per_sample(ce_fn: PerSeqFn, params: Params, z: Sequence[Tensor], n: int, normalize: bool = False) -> Tensor:
    """Oracle: one backward pass per sequence, c_i = ⟨∇ CE_i, z⟩ (the authors' loop).

    ``normalize``: c_i = ⟨∇ CE_i, z⟩ / ‖∇ CE_i‖ (the per-sequence gradient norm needs the per-sequence gradient, so
    this is the one path that offers it; a zero gradient gives c_i = 0)."""
    out = []
    for i in range(n):
        g = grad_of(lambda p, i=i: ce_fn(p, slice(i, i + 1)).sum(), params)
        d = tree_dot(g, z)
        if normalize:
            gn = tree_norm(g)
            d = d / gn if float(gn) > 0 else torch.zeros_like(d)
        out.append(d)
    return torch.stack(out).detach()


def dots_jvp(ce_fn: PerSeqFn, params: Params, z: Sequence[Tensor], n: int, chunk: int | None = None) -> Tensor:
    """All c_i at once: forward-mode directional derivative d/dε CE(θ + ε z) (one dual-number forward per chunk)."""
    primals = tuple(p.detach() for p in params)  # no reverse-mode graph is needed: detach to save memory
    tangents = tuple(t.detach().to(p.dtype) for p, t in zip(primals, z))
    out = []
    for sl in chunks(n, chunk):
        _, t = torch.func.jvp(lambda *ps, sl=sl: ce_fn(tuple(ps), sl), primals, tangents)
        out.append(t.detach())
    return torch.cat(out)


def dots_double_backward(ce_fn: PerSeqFn, params: Params, z: Sequence[Tensor], n: int, chunk: int | None = None) -> Tensor:
    """All c_i at once by double backward: c = ∂/∂u ⟨∇_θ Σ_i u_i CE_i(θ), z⟩ at u = 1."""
    out = []
    for sl in chunks(n, chunk):
        ce = ce_fn(params, sl)
        u = torch.ones_like(ce, requires_grad=True)
        g = torch.autograd.grad((u * ce).sum(), params, create_graph=True, allow_unused=True)
        pairs = [(gi, zi) for gi, zi in zip(g, z) if gi is not None]
        inner = tree_dot([gi for gi, _ in pairs], [zi.detach() for _, zi in pairs])
        out.append(torch.autograd.grad(inner, u)[0].detach())
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------------------
# hypergradient through the score model


def softmax_weight_grad(s: Tensor, c: Tensor) -> Tensor:
    """Analytic ∂/∂s_j of −Σ_i softmax(s)_i c_i = −P_j (c_j − Σ_i P_i c_i) (used by the per-sample oracle)."""
    s64, c64 = s.detach().double(), c.detach().double()
    p = torch.softmax(s64, 0)
    return (-p * (c64 - (p * c64).sum())).to(s.dtype)


def softmax_weight_grad_autograd(s: Tensor, c: Tensor) -> Tensor:
    """The same quantity by autograd through the softmax (used by the batched path; independent of the formula)."""
    leaf = s.detach().double().requires_grad_(True)
    obj = -(torch.softmax(leaf, 0) * c.detach().double()).sum()
    return torch.autograd.grad(obj, leaf)[0].to(s.dtype)


def hypergrad_per_sample(score_fn: PerSeqFn, score_params: Params, ds: Tensor) -> Params:
    """Oracle: Σ_j ds_j ∇θ_s s_j with one forward + backward per sequence through the score model."""
    acc = [torch.zeros_like(p) for p in score_params]
    for j in range(ds.shape[0]):
        g = grad_of(lambda p, j=j: score_fn(p, slice(j, j + 1)).sum(), score_params)
        for a, gi in zip(acc, g):
            a.add_(gi, alpha=float(ds[j]))
    return tuple(acc)


def hypergrad_batched(score_fn: PerSeqFn, score_params: Params, ds: Tensor, chunk: int | None = None) -> Params:
    """Σ_j ds_j ∇θ_s s_j as one vector-Jacobian product per chunk (the whole batch when chunk is None)."""
    acc: list[Tensor] | None = None
    for sl in chunks(ds.shape[0], chunk):
        s = score_fn(score_params, sl)
        g = torch.autograd.grad(s, score_params, grad_outputs=ds[sl].to(s.dtype), allow_unused=True)
        g = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(score_params, g)]
        acc = g if acc is None else [a + gi for a, gi in zip(acc, g)]
    assert acc is not None
    return tuple(acc)


def clip_per_tensor_(tensors: Sequence[Tensor], max_norm: float) -> None:
    """Scale each tensor in place to norm ≤ max_norm (the score model's per-tensor gradient clip, METHODS §1.2)."""
    for t in tensors:
        n = t.norm()
        if n > max_norm:
            t.mul_(max_norm / n)


# ----------------------------------------------------------------------------------------------------------------
# diagnostics


def cosine(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """cos(a, b) of two parameter tuples (0 when either is zero)."""
    na, nb = float(tree_norm(a)), float(tree_norm(b))
    return float(tree_dot(a, b)) / (na * nb) if na > 0 and nb > 0 else 0.0


def source_variance_share(c: Sequence[float], labels: Sequence[str]) -> float:
    """Between-group variance of ``c`` over its total variance (η², in [0, 1]; 0 when c is constant).

    Under no source effect its expectation is (k − 1) / (n − 1) for k groups of n values, which the caller reports
    next to it: on a batch of 32 with 8 sources, 0.23 is what pure noise gives."""
    x = torch.as_tensor(list(c), dtype=torch.float64)
    tot = float(((x - x.mean()) ** 2).sum())
    if tot <= 0 or len(labels) != len(x):
        return 0.0
    between = 0.0
    lab = list(labels)
    for g in sorted(set(lab)):  # sorted: a set of strings iterates in a per-process order (hash seed), and float sums follow it
        idx = torch.tensor([i for i, s in enumerate(lab) if s == g])
        between += len(idx) * float((x[idx].mean() - x.mean()) ** 2)
    return between / tot
