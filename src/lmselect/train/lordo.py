"""LoRDO: low-rank optimisation with infrequent communication (METHODS §5; Jovanović et al., arXiv 2602.04396).

Objective: minimise the mean training loss over M workers (the torch.distributed ranks) that each see their own
slice of every global batch, while communicating only every ``K_x = sync_every`` steps. There is **no per-step
gradient all-reduce**: each rank steps on its own clipped gradient, and every K_x steps the ranks average what they
did (DiLoCo-style outer step on the pseudo-gradient).

Notation per 2-D weight W (a matrix of shape d_out × d_in). It is *oriented* so that the projected side comes first:
X ↦ X (side "left") or X ↦ Xᵀ (side "right"); the oriented matrix is a × b. ``side="auto"`` projects the smaller
dimension (a = min(d_out, d_in), as GaLore does), so the low-rank state r × b is the cheaper one.
Rank r = min(``rank``, a). State: orthonormal Q (a × r), Adam moments m, v (r × b), error feedback E (a × b), the
full-rank second moment (see ``second_moment``), the period's start θ₀ (the "anchor") and the outer momentum buffer.

Local step t (lr η, betas β₁ β₂, eps ε, decoupled weight decay λ, all from ``OptimConfig``; G = the clipped gradient,
clipping done by the loop on this rank's gradients only)::

    A     = G + E                       (A = G without error feedback)
    g     = Qᵀ A                        (r × b)
    E     ← A − Q g                     (what the projection dropped; re-injected next step, so Q g + E_new = G + E_old)
    m     ← β₁ m + (1 − β₁) g ;   v ← β₂ v + (1 − β₂) g² ;   m̂, v̂ = bias-corrected m, v
    low   = Q (m̂ / (√v̂ + ε))                                  low-rank Adam direction, a × b
    full  = G / (μ (√v̄ + ε))                                  full-rank normalised gradient, a × b
    W     ← W (1 − η λ) − η [ ω · low + (1 − ω) · full ]       (quasi-hyperbolic mix)

The full-rank term is what lets the trajectory leave span(Q) between basis refreshes. Its second moment v̄ (how the
paper forms it is not visible) is ``second_moment``:

* ``"factored"`` (default): an Adafactor-style rank-1 second moment of G itself: row and column EMAs
  R ← β₂ R + (1 − β₂) mean_cols(G²), C ← β₂ C + (1 − β₂) mean_rows(G²) (bias-corrected), v̄ = R Cᵀ / mean(R).
  Chosen because it normalises the quantity actually applied (G, including the part outside span(Q)), can never
  vanish on a direction that Q misses, and costs only a + b floats and no communication.
* ``"broadcast"``: the low-rank v broadcast over the projected dimension with its energy preserved:
  v̄[i, j] = (1/a) Σ_k v̂[k, j]. At full rank (r = a, Q square) this is exactly the per-column mean square of
  Qᵀ(G + E), i.e. of G + E, so with ω = 0 the step is column-RMS-normalised SGD. With r < a it only sees the
  energy inside span(Q) and can under-estimate G's scale.

Sync (every ``sync_every`` steps, from ``maybe_sync``): for every parameter (2-D or not) the pseudo-gradient
Δ = θ₀ − θ_local is all-reduced to its mean over ranks (flattened into buckets: one collective per bucket), then
the outer step: b ← β_o b + Δ̄ (outer momentum β_o), θ ← θ₀ − η_o (Δ̄ + β_o b) (Nesterov; with β_o = 0 it is
θ₀ − η_o Δ̄, and η_o = 1 is plain parameter averaging), θ₀ ← θ. Then each low-rank weight refreshes its basis from
the averaged (oriented) pseudo-gradient: Q' = top-r left singular vectors of Δ̄ (exact ``torch.linalg.svd``, which
is deterministic, so every rank derives the same Q' from the same Δ̄ without sending it). The moments are re-projected
into the new basis with P = Q'ᵀ Q (r × r): m ← P m (the first moment is a vector in the full space, Q m, projected
onto the new basis) and v ← (P ∘ P) v (the diagonal-covariance image of v under the same map; non-negative, and the
energy that leaves the subspace is dropped). E is full-rank and basis-free, so it is kept. Before the first sync Q
comes from the first local gradient (top-r left singular vectors of G, as GaLore does), so it is rank-local.

What is communicated: the full pseudo-gradient of every parameter, once every K_x steps (Δ is full-rank because of
the full-rank term, so averaging it exactly needs all of it). Per optimizer step that is N / K_x elements against N
for DDP's gradient all-reduce (see :func:`communication_bytes`). Nothing else is sent: Q is derived locally.

Non-2-D parameters (biases, norm scales) and, unless ``lowrank_embeddings``, ``nn.Embedding`` weights use plain
AdamW locally (same betas / eps / lr; decay for ≥ 2-D only, as in ``schedules.param_groups``) and are averaged at
syncs with everything else.

Checkpoints: ``state_dict()`` is a collective when world > 1: it gathers every rank's local state (including the
rank's local parameters, which differ between syncs) to rank 0, the one that writes ``training_state.pt``, so a resumed run continues exactly the trajectory
of an uninterrupted one; ``average_model_state`` gives the workers' mean weights for the checkpoint's model file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

from lmselect.artifacts import LmselectError
from lmselect.train.distributed import rank_world
from lmselect.train.schedules import OptimConfig


@dataclass
class LordoConfig:
    """LoRDO constants the paper does not pin down; lr, betas, eps, weight decay and clipping come from OptimConfig.

    rank = 64: r of each projection, clipped to the matrix's smaller dimension.
    omega = 0.9: weight ω of the low-rank Adam term (1 − ω goes to the full-rank normalised term).
    mu = 1.0: divisor μ of the full-rank term (its RMS is ~1/μ of an Adam step's).
    sync_every = 32: K_x, local steps between parameter averages.
    outer_lr = 1.0: η_o of the outer step (1.0 with outer_momentum 0 = plain averaging).
    outer_momentum = 0.0: β_o, Nesterov momentum on the averaged pseudo-gradient.
    error_feedback = True: keep E (the part of G + E outside span(Q)) and re-inject it next step.
    second_moment = "factored": v̄ of the full-rank term, "factored" (Adafactor row/col) or "broadcast" (module doc).
    side = "auto": project the smaller dimension ("auto"), d_out ("left") or d_in ("right").
    lowrank_embeddings = False: also treat nn.Embedding weights as low-rank matrices (default: plain AdamW).
    bucket_numel = 2**25: elements per all-reduce bucket at a sync (128 MiB in fp32).
    """

    rank: int = 64
    omega: float = 0.9
    mu: float = 1.0
    sync_every: int = 32
    outer_lr: float = 1.0
    outer_momentum: float = 0.0
    error_feedback: bool = True
    second_moment: Literal["factored", "broadcast"] = "factored"
    side: Literal["auto", "left", "right"] = "auto"
    lowrank_embeddings: bool = False
    bucket_numel: int = 2**25


def validate_lordo(cfg: LordoConfig) -> None:
    """One-line errors for settings that cannot work."""
    if cfg.rank < 1 or cfg.sync_every < 1 or cfg.bucket_numel < 1:
        raise LmselectError("lordo.rank, lordo.sync_every and lordo.bucket_numel must be >= 1")
    if not 0.0 <= cfg.omega <= 1.0:
        raise LmselectError(f"lordo.omega must be in [0, 1], got {cfg.omega}")
    if cfg.mu <= 0 or cfg.outer_lr <= 0 or not 0.0 <= cfg.outer_momentum < 1.0:
        raise LmselectError("lordo.mu and lordo.outer_lr must be > 0 and lordo.outer_momentum in [0, 1)")
    if cfg.second_moment not in ("factored", "broadcast") or cfg.side not in ("auto", "left", "right"):
        raise LmselectError("lordo.second_moment must be factored|broadcast and lordo.side auto|left|right")


def projected_side(shape: torch.Size | tuple[int, ...], side: str) -> str:
    """"left" (project d_out = rows) or "right" (project d_in = columns) for a 2-D weight."""
    if side == "auto":
        return "left" if shape[0] <= shape[1] else "right"
    return side


def _orient(x: torch.Tensor, side: str) -> torch.Tensor:
    """The a × b view with the projected dimension first."""
    return x if side == "left" else x.transpose(0, 1)


def top_left_singular(x: torch.Tensor, r: int) -> torch.Tensor:
    """Orthonormal a × r basis of the top-r left singular vectors of the a × b matrix ``x`` (computed in fp32+)."""
    u, _, _ = torch.linalg.svd(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, full_matrices=False)
    return u[:, :r].to(x.dtype).contiguous()


def lowrank_ids(model: torch.nn.Module, cfg: LordoConfig) -> set[int]:
    """ids of the parameters LoRDO treats as low-rank matrices: 2-D, and not embeddings unless asked."""
    emb = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return {
        id(p) for p in model.parameters()
        if p.requires_grad and p.ndim == 2 and (cfg.lowrank_embeddings or id(p) not in emb)
    }


class LordoOptimizer(torch.optim.Optimizer):
    """LoRDO local steps (``step``) plus the periodic outer step (``maybe_sync``); equations in the module doc.

    Two param groups like ``schedules.param_groups`` (≥ 2-D with decay, the rest without), so the loop's LR setting
    and ``apply_hparams`` work unchanged; whether a matrix is low-rank is per parameter (``lowrank`` in its state).
    """

    def __init__(self, model: torch.nn.Module, optim: OptimConfig, cfg: LordoConfig) -> None:
        validate_lordo(cfg)
        self.cfg = cfg
        lowrank = lowrank_ids(model, cfg)
        decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
        defaults = {"lr": optim.lr, "betas": tuple(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay}
        super().__init__(
            [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], defaults
        )
        for g in self.param_groups:
            for p in g["params"]:
                st = self.state[p]
                st["lowrank"] = id(p) in lowrank
                st["anchor"] = p.detach().clone()  # θ₀: start of the current communication period
        self.syncs = 0

    # ---- world --------------------------------------------------------------------------------------------------

    @staticmethod
    def _world() -> tuple[int, int]:
        return rank_world(env_fallback=False)  # collectives need a process group: without one, one process

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.param_groups for p in g["params"]]

    # ---- local step ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # noqa: D401 - torch API
        """One local step on this rank's (already clipped) gradients; never communicates."""
        if closure is not None:
            raise LmselectError("LordoOptimizer.step does not take a closure")
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                st["t"] = int(st.get("t", 0)) + 1
                t = st["t"]
                bc1, bc2 = 1.0 - b1**t, 1.0 - b2**t
                if wd:
                    p.mul_(1.0 - lr * wd)  # decoupled, as AdamW
                if st["lowrank"]:
                    p.add_(self._lowrank_direction(p, st, b1, b2, bc1, bc2, eps), alpha=-lr)
                else:
                    self._adam(p, st, b1, b2, bc1, bc2, eps, lr)

    def _adam(self, p: torch.Tensor, st: dict[str, Any], b1: float, b2: float, bc1: float, bc2: float, eps: float,
              lr: float) -> None:
        """Plain Adam step (decay already applied by the caller) for parameters that are not low-rank."""
        grad = p.grad
        if "exp_avg" not in st:
            st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        st["exp_avg"].lerp_(grad, 1.0 - b1)
        st["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1.0 - b2)
        denom = (st["exp_avg_sq"] / bc2).sqrt_().add_(eps)
        p.addcdiv_(st["exp_avg"], denom, value=-lr / bc1)

    def _lowrank_direction(self, p: torch.Tensor, st: dict[str, Any], b1: float, b2: float, bc1: float, bc2: float,
                           eps: float) -> torch.Tensor:
        """ω·Q(m̂/(√v̂+ε)) + (1−ω)·G/(μ(√v̄+ε)) for the low-rank weight ``p`` (updates its state)."""
        cfg = self.cfg
        # stored as a bool: torch's load_state_dict rebuilds strings in optimizer state as iterables (mangling them)
        side = "right" if st.setdefault("transposed", projected_side(p.shape, cfg.side) == "right") else "left"
        G = _orient(p.grad, side)  # a × b view
        a, b = G.shape
        if "Q" not in st:  # first step: basis from this rank's first gradient (GaLore); refreshed at every sync
            r = min(cfg.rank, a, b)
            st["Q"] = top_left_singular(G, r)
            st["m"] = G.new_zeros(r, b)
            st["v"] = G.new_zeros(r, b)
            if cfg.error_feedback:
                st["E"] = torch.zeros_like(G)
            if cfg.second_moment == "factored":
                st["row_sq"], st["col_sq"] = G.new_zeros(a), G.new_zeros(b)
        Q = st["Q"]
        A = G + st["E"] if cfg.error_feedback else G
        g = Q.T @ A
        if cfg.error_feedback:
            st["E"] = A - Q @ g  # the part of G + E outside span(Q), carried to the next step
        st["m"].lerp_(g, 1.0 - b1)
        st["v"].mul_(b2).addcmul_(g, g, value=1.0 - b2)
        v_hat = st["v"] / bc2
        low = Q @ ((st["m"] / bc1) / (v_hat.sqrt() + eps))
        if cfg.second_moment == "factored":
            sq = G * G
            st["row_sq"].mul_(b2).add_(sq.mean(dim=1), alpha=1.0 - b2)
            st["col_sq"].mul_(b2).add_(sq.mean(dim=0), alpha=1.0 - b2)
            R, C = st["row_sq"] / bc2, st["col_sq"] / bc2
            v_bar = torch.outer(R, C) / R.mean().clamp_min(torch.finfo(R.dtype).tiny)
        else:  # broadcast the low-rank v over the a rows, energy preserved: (1/a) Σ_k v̂[k, j]
            v_bar = (v_hat.sum(dim=0, keepdim=True) / a).expand(a, b)
        full = G / (cfg.mu * (v_bar.sqrt() + eps))
        d = cfg.omega * low + (1.0 - cfg.omega) * full
        return _orient(d, side)  # back to the parameter's layout (a transposed view is fine for add_)

    # ---- sync ---------------------------------------------------------------------------------------------------

    def maybe_sync(self, step: int, force: bool = False) -> bool:
        """Sync after the ``step``-th optimizer step when it is a multiple of ``sync_every`` (or ``force``)."""
        if force or step % self.cfg.sync_every == 0:
            self.sync()
            return True
        return False

    @torch.no_grad()
    def _all_reduce_mean(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Mean over ranks of ``tensors`` (new tensors), flattened into buckets of ≤ bucket_numel elements."""
        _, world = self._world()
        if world == 1:
            return tensors
        out: list[torch.Tensor] = []
        i = 0
        while i < len(tensors):  # greedy buckets of whole tensors, in order
            j, n = i, 0
            while j < len(tensors) and (j == i or n + tensors[j].numel() <= self.cfg.bucket_numel):
                n += tensors[j].numel()
                j += 1
            flat = torch.cat([t.reshape(-1) for t in tensors[i:j]])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(world)
            out += [f.view_as(t) for f, t in zip(flat.split([t.numel() for t in tensors[i:j]]), tensors[i:j])]
            i = j
        return out

    @torch.no_grad()
    def sync(self) -> None:
        """Outer step on the mean pseudo-gradient, then refresh every low-rank basis from it (module doc)."""
        cfg = self.cfg
        params = self._params()
        deltas = self._all_reduce_mean([self.state[p]["anchor"] - p for p in params])
        for p, delta in zip(params, deltas):
            st = self.state[p]
            if cfg.outer_momentum > 0:
                buf = st.get("outer_buf")
                buf = delta.clone() if buf is None else buf.mul_(cfg.outer_momentum).add_(delta)
                st["outer_buf"] = buf
                step_dir = delta + cfg.outer_momentum * buf  # Nesterov
            else:
                step_dir = delta
            p.copy_(st["anchor"] - cfg.outer_lr * step_dir)
            st["anchor"].copy_(p)
            if st["lowrank"] and "Q" in st:
                self._refresh_basis(st, _orient(delta, "right" if st["transposed"] else "left"))
        self.syncs += 1

    def _refresh_basis(self, st: dict[str, Any], delta: torch.Tensor) -> None:
        if not torch.isfinite(delta).all() or float(delta.abs().max()) == 0.0:
            return  # nothing moved (e.g. lr 0): keep the old basis rather than an arbitrary one
        q_old = st["Q"]
        q_new = top_left_singular(delta, q_old.shape[1])
        P = q_new.T @ q_old  # r × r change of basis
        st["m"] = P @ st["m"]
        st["v"] = (P * P) @ st["v"]
        st["Q"] = q_new

    # ---- checkpoints --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Every rank's local state (collective when world > 1: each rank must call it); CPU tensors."""
        rank, world = self._world()
        local = super().state_dict()
        local["syncs"] = self.syncs
        if world > 1:  # local parameters differ between syncs: keep them to resume the exact trajectory
            local["local_params"] = [p.detach().cpu().clone() for p in self._params()]
        local = _to_cpu(local)
        if world == 1:
            ranks: list[Any] | None = [local]
        else:  # only rank 0 writes the checkpoint, so only it receives the list
            ranks = [None] * world if rank == 0 else None
            dist.gather_object(local, ranks, dst=0)
        return {"lordo": True, "world_size": world, "ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rank, world = self._world()
        if not state_dict.get("lordo"):
            raise ValueError("not a LoRDO optimizer state")
        if state_dict["world_size"] != world:
            raise ValueError(f"LoRDO state was saved with {state_dict['world_size']} workers, not {world}")
        local = dict(state_dict["ranks"][rank])
        self.syncs = int(local.pop("syncs"))
        local_params = local.pop("local_params", None)
        super().load_state_dict(local)
        if local_params is not None:
            with torch.no_grad():
                for p, v in zip(self._params(), local_params):
                    p.copy_(v)

    @torch.no_grad()
    def average_model_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The workers' mean parameters as a CPU state dict of ``model`` (a collective); for the checkpoint file.

        It does not change the local parameters or the optimizer state (so it is not an outer step).
        """
        out = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        means = self._all_reduce_mean([p.detach().clone() for _, p in named])
        for (k, _), m in zip(named, means):
            out[k] = m.cpu()
        return out


def _to_cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cpu(v) for v in x)
    return x


# ----------------------------------------------------------------------------------------------------------------
# communication accounting


def communication_bytes(
    model: torch.nn.Module, cfg: LordoConfig, bytes_per_elem: int = 4
) -> dict[str, float]:
    """All-reduce payload per optimizer step, in bytes (the tensor each worker contributes; ring all-reduce moves
    2(M−1)/M of that per worker on the wire, the same factor for every scheme).

    * ``ddp``: every gradient every step, N elements.
    * ``lowrank_ddp``: GaLore-style data parallel, all-reducing the projected gradient every step: r·b per low-rank
      matrix, the full gradient for the others (the baseline the paper compares with).
    * ``lordo``: the full pseudo-gradient of every parameter once every K_x steps: N / K_x per step (what
      :class:`LordoOptimizer` sends; Q is derived locally, nothing else is sent).
    Also ``params`` (N) and the ratios ``ddp_over_lordo`` and ``lowrank_ddp_over_lordo``.
    """
    lowrank = lowrank_ids(model, cfg)
    n, n_low = 0, 0
    for p in model.parameters():
        if not p.requires_grad:
            continue
        n += p.numel()
        if id(p) in lowrank:
            a, b = _orient(torch.empty(p.shape, device="meta"), projected_side(p.shape, cfg.side)).shape
            n_low += min(cfg.rank, a, b) * b
        else:
            n_low += p.numel()
    ddp, low, lordo = n * bytes_per_elem, n_low * bytes_per_elem, n * bytes_per_elem / cfg.sync_every
    return {"params": n, "ddp": float(ddp), "lowrank_ddp": float(low), "lordo": lordo,
            "ddp_over_lordo": ddp / lordo, "lowrank_ddp_over_lordo": low / lordo}


__all__ = [
    "LordoConfig", "LordoOptimizer", "communication_bytes", "validate_lordo", "projected_side", "top_left_singular",
    "lowrank_ids",
]
