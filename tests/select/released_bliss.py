"""Test oracle: the authors' released BLISS loop, transcribed per sample, on Hugging Face models.

Source: MingruiLiu-ML-Lab/BLISS-Bilevel-Data-Selection at commit 420da66 (MIT), ``train()`` in
``src/select_data/bilevel_selection.py``; ``BS:n`` below is a line of that file, ``MODEL:n`` a line of
``src/lit_gpt/model.py``, ``UTILS:n`` a line of ``src/lit_gpt/utils.py`` in the same commit. Nothing here is copied
from it: this is our own restatement of what that code computes on **one process**, written as plainly as possible
(one backward pass per sequence, like the original) so that lmselect's solver can be checked against it.

What one outer step t (0-based) does, in order:

1. K inner AdamW steps on the proxy (BS:402-430). The training stream is read by two independent iterators over the
   same data loader (BS:392-393): the outer ``for`` loop takes batch t of the stream, the inner loop takes the next K
   batches of its own iterator, so inner step k of outer step t trains on stream batch t·K + k and the outer batch is
   stream batch t. With K = 1 the outer batch *is* the batch the proxy has just trained on. Each inner loss is
   G = Σ_i w_i CE_i + reg·Σ‖θ‖² + γ·KL(target ‖ proxy) (BS:416-425), backward, global grad-norm clip (Fabric's
   ``clip_gradients`` = ``torch.nn.utils.clip_grad_norm_``, BS:427), AdamW step (BS:428).
2. v = ∇_θp of the proxy's validation loss: token-weighted mean CE over the counted (final-word) tokens of one
   validation batch (BS:433-440; LAMBADA labels are -1 except the final word's tokens, ``prepare_lambada.py:47``).
3. z: re-initialised to 1/numel(θ) in every entry of each tensor (BS:375 in float16 before the first step, BS:513 in
   float32 after every step), then ``z_loops`` updates on the outer batch (BS:443-478): g = H z − v + λ_z z per tensor;
   if ‖g‖ > grad_clip, g ← g/‖g‖ (unit norm); z ← z − η_z g. H is the Hessian of the same G on the outer batch with
   the weights w of BS:447-450.
4. c_i = ⟨∇_θp CE_i, z⟩, one backward pass per sequence (BS:495-508, ``get_distributed_hypergrad`` BS:52).
5. Hypergradient −∇_θs Σ_i P_i c_i with P = softmax of the per-sequence scores (BS:57-88):
   −Σ_i P_i ∇s_i c_i + (Σ_j P_j ∇s_j)(Σ_i P_i c_i).
6. Each score tensor's gradient normalised to unit norm when its norm exceeds grad_clip (BS:516-526), AdamW step on the
   score model (BS:528), then both schedulers step once (BS:553-554): the K inner steps of one outer step share one
   learning rate, and the proxy's schedule spans max_steps outer steps, not max_steps·K inner ones.

The weights w of steps 1 and 3 (BS:408-410, 448-450): at t = 0, exp(s_i)/Σ_j exp(s_j) (a softmax of the batch).
From t = 1 on, exp(s_i − m)/S with m and S *kept from the previous outer step's hypergradient*: m = the max score and
S = Σ exp(s − m) of the previous outer batch under the previous score model (BS:58-63, 510). This "stale normaliser"
makes Σ_i w_i = Σ_i exp(s_i − m)/S ≠ 1. On one process with sigmoid scores every exp factor lies in (e⁻¹, e), and
Σ_i w_i drifts from 1 only as far as the batch's mean score moves between steps (|log Σ w| ≤ max |Δs|); on W GPUs
S sums over the *global* batch while w is applied to the local batch, so Σ w ≈ 1/W (a bug, see below).

Choices of this transcription (and why):

* Causal attention. The released proxy and score model attend bidirectionally: ``MODEL:398-408`` replaced the SDPA
  call (``is_causal=mask is None``, kept commented out at ``MODEL:386-396``) by a hand-written softmax that masks only
  when a mask is passed, and training passes none (``MODEL:91``). That is a bug (the model sees the token it
  predicts); we use the models' own causal attention and do not reproduce it. The KL teacher (``model_eval.py``) is
  causal in the released code too.
* The step-2 crash is not reproduced: on one device Fabric's ``all_gather`` is the identity, so S and m (BS:55-63)
  still hang on the graph of the per-sequence scores, which BS:499 has already freed, and the next inner
  ``backward()`` (BS:426) raises. Under DDP the gather returns detached tensors. We keep m and S as detached numbers,
  i.e. what every run that does not crash computes.
* float64 throughout (the released code runs bf16-mixed, ``UTILS:324``). The z initialisation is the *value* the
  released code stores, widened exactly: 1/numel rounded to float16 (first step) or float32 (later steps), then cast
  to float64. For numel ≥ 2^25 the float16 value is 0 (pythia-160m's 38.6M-entry embedding and LM head start at z = 0
  in the first step); on the tiny test models the rounding is ≤ 2^-11 relative.
* The score model is an lmselect :class:`~lmselect.models.scorer.SequenceScorer`: ``GPTRegression`` (MODEL:139-170) is
  a backbone, final layer norm, mean pool over all positions, then ``Linear(d, 1)`` and a sigmoid (BS:254-257). Its
  parameters are everything that reaches the score (the causal LM's unused output embedding is left out; in the
  released model it does not exist). :func:`released_head_init_` draws the head the way the released code gets it:
  PyTorch's default ``nn.Linear`` initialisation, because the head is replaced *after* ``_init_weights`` ran
  (BS:246 then BS:254).
* Single process: the z all-reduce (BS:489-491) and the gradient all-reduces are identities and are left out.
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# argparse defaults of bilevel_selection.py (BS:629-660); scripts/run.sh overrides gamma=1e-2, reg=1e-7,
# max_steps=6000, inner_steps=5 and passes --warmup
RELEASED_ARGS: dict[str, Any] = {
    "learning_rate": 1e-5,  # proxy AdamW (BS:637)
    "learning_rate_influence": 1e-5,  # score AdamW (BS:638)
    "weight_decay": 0.1,  # both optimizers, every parameter (BS:641)
    "beta1": 0.9,
    "beta2": 0.95,
    "gamma": 1e-4,  # KL weight (BS:644)
    "reg": 1e-6,  # L2 weight (BS:646)
    "lamb": 1e-2,  # λ_z (BS:645)
    "lr_z": 1e-2,  # η_z (BS:634)
    "z_loops": 3,  # (BS:633)
    "grad_clip": 1.0,  # proxy global clip, z residual and score per-tensor threshold (BS:651)
    "inner_steps": 1,  # K (BS:632)
    "max_steps": 3000,  # scheduler length, with epochs (BS:630, 359-368)
    "epochs": 1,
    "warmup": False,  # --warmup: warm-up over 10 % of max_steps·epochs (BS:657-660)
}
RUN_SH_ARGS: dict[str, Any] = {**RELEASED_ARGS, "gamma": 1e-2, "reg": 1e-7, "max_steps": 6000, "inner_steps": 5,
                               "warmup": True}


# ---------------------------------------------------------------------------------------------------------------
# pieces


def score_parameters(scorer: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The score model's parameters that reach the score: all but the causal LM's output embedding."""
    unused = {id(p) for p in scorer.lm.get_output_embeddings().parameters()}
    return [(n, p) for n, p in scorer.named_parameters() if id(p) not in unused]


@torch.no_grad()
def released_head_init_(scorer: nn.Module, generator: torch.Generator) -> None:
    """The head as BS:254-257 leaves it: a fresh ``nn.Linear(d, 1)`` with PyTorch's default initialisation, which
    for fan-in d draws weight and bias from U(−1/√d, 1/√d) (kaiming_uniform with a = √5 has exactly that bound)."""
    w, b = scorer.head.weight, scorer.head.bias
    bound = 1.0 / math.sqrt(w.shape[1])
    w.copy_(torch.empty(w.shape, dtype=torch.float64).uniform_(-bound, bound, generator=generator))
    b.copy_(torch.empty(b.shape, dtype=torch.float64).uniform_(-bound, bound, generator=generator))


def z_init_value(numel: int, first_step: bool) -> float:
    """1/numel as the released code stores it: ``1/numel * torch.ones(...)`` multiplies in float32 and keeps float32
    (BS:513) or, before the first outer step, float16 (BS:375; values below 2^-25 round to 0)."""
    stored = torch.tensor(1.0 / numel, dtype=torch.float32)
    return float(stored.to(torch.float16) if first_step else stored)


def z_init(params: Sequence[Tensor], first_step: bool) -> list[Tensor]:
    """z₀: :func:`z_init_value` of each tensor's numel in every entry, widened exactly to the parameters' dtype."""
    return [torch.full_like(p, z_init_value(p.numel(), first_step)) for p in params]


def z_update(z: Sequence[Tensor], hz: Sequence[Tensor], v: Sequence[Tensor], lamb: float, lr_z: float,
             clip: float) -> list[Tensor]:
    """One z loop of BS:474-478, tensor by tensor: g = Hz − v + λ_z z; g ← g/‖g‖ when ‖g‖ > clip (unit norm, not
    ``clip``); z ← z − η_z g. So no tensor of z moves by more than η_z in one loop."""
    out = []
    for zk, hk, vk in zip(z, hz, v):
        g = hk - vk + lamb * zk
        if g.norm() > clip:
            g = g / g.norm()
        out.append(zk - lr_z * g)
    return out


def released_lr_lambda(warmup_steps: float, total: int):
    """transformers' ``get_cosine_schedule_with_warmup`` multiplier (BS:359-368), with the released warm-up length
    0.1·max_steps·epochs (a float, not rounded; 0 without --warmup). Step 0 of a warm-up has multiplier 0: the first
    AdamW steps move nothing but still fill the moments and advance the step counter."""

    def fn(step: int) -> float:
        if step < warmup_steps:
            return float(step) / float(max(1, warmup_steps))
        progress = float(step - warmup_steps) / float(max(1, total - warmup_steps))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 2.0 * 0.5 * progress)))

    return fn


def sequence_ce(logits: Tensor, ids: Tensor) -> Tensor:
    """CE_i: mean next-token cross-entropy of each sequence over its L − 1 predictions (UTILS:274-294)."""
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return ce.view(ids.shape[0], -1).mean(1)


def kl_teacher_proxy(proxy_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """BS:94-134: ``F.kl_div(log_softmax(proxy), softmax(teacher))`` = Σ_v q (log q − log p) = KL(teacher ‖ proxy)
    (the docstring there says KL(P‖Q) of the proxy; the arguments make it the teacher's), summed over the vocabulary,
    averaged over all L positions and then over the batch."""
    log_p = F.log_softmax(proxy_logits, dim=-1)
    q = F.softmax(teacher_logits, dim=-1)
    return F.kl_div(log_p, q, reduction="none").sum(-1).mean(-1).mean(0)


def lower_loss(proxy: nn.Module, ids: Tensor, w: Tensor, teacher_logits: Tensor, a: dict[str, Any]) -> Tensor:
    """G = Σ_i w_i CE_i + reg·Σ_k ‖θ_k‖² + γ·KL (BS:416-425 inner, BS:455-465 outer).

    The released code writes the L2 term as ``y.norm(2).pow(2)`` (BS:423, 463). Its Hessian-vector product is NaN for
    a tensor that is exactly zero (the double backward of the norm divides by it), e.g. the zero biases of a freshly
    initialised model when the first inner step moves nothing (warm-up multiplier 0); the released runs start from a
    trained warm-up checkpoint, where no tensor is zero. We write ‖θ‖² as Σθ², the same function with its true
    Hessian 2·reg·I everywhere."""
    logits = proxy(input_ids=ids).logits
    g = (w * sequence_ce(logits, ids)).sum()
    g = g + a["reg"] * sum(p.pow(2).sum() for p in proxy.parameters())
    return g + a["gamma"] * kl_teacher_proxy(logits, teacher_logits)


def sample_weights(s: Tensor, stale: tuple[Tensor, Tensor] | None) -> Tensor:
    """BS:408-410 / 448-450: exp(s)/Σ exp(s) in the first step; exp(s − m)/S with the previous step's (m, S) after."""
    if stale is None:
        e = torch.exp(s)
        return e / e.sum()
    m, S = stale
    return torch.exp(s - m) / S


def validation_loss(proxy: nn.Module, ids: Tensor, loss_mask: Tensor) -> Tensor:
    """BS:433-439: mean CE over the counted tokens of the batch (``loss_mask`` [B, L-1] = their ``labels[:, 1:] != -1``;
    the positions are pooled, so a row with a longer final word weighs more)."""
    logits = proxy(input_ids=ids).logits[:, :-1]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    m = loss_mask.reshape(-1).to(ce.dtype)
    return (ce * m).sum() / m.sum()


# ---------------------------------------------------------------------------------------------------------------
# the loop


def released_outer_steps(
    proxy: nn.Module,
    scorer: nn.Module,
    target: nn.Module,
    train_batches: Sequence[Tensor],
    val_batches: Sequence[tuple[Tensor, Tensor]],
    cfg: dict[str, Any] | None = None,
    n_steps: int = 1,
) -> list[dict[str, Any]]:
    """Run ``n_steps`` outer steps of the released loop on copies of ``proxy`` and ``scorer`` (``target`` is the KL
    teacher, never changed).

    ``train_batches``: the training stream, a sequence of [B, L] id tensors (the loader's batches in order; outer step
    t reads batch t as its outer batch and batches t·K … t·K + K − 1 for its inner steps, BS:392-403).
    ``val_batches``: (ids, loss_mask) pairs, cycled one per outer step (``itertools.cycle``, BS:391, 433).
    ``cfg``: overrides of :data:`RELEASED_ARGS`.

    Returns one dict per outer step: ``z`` (tuple, the z used for c), ``v``, ``val_loss``, ``scores`` and ``P``
    (per-sequence scores of the outer batch and their softmax), ``c`` [B], ``inner_weights`` (the w of each inner
    step) and ``outer_weights`` (the w inside H), ``hypergrad`` (tuple over :func:`score_parameters`, before the clip)
    and ``hypergrad_clipped``, ``lr_proxy`` / ``lr_score`` (the LRs the step used), and ``proxy_state`` /
    ``score_state`` (state dicts after the step, detached copies).
    """
    # twice-differentiable attention everywhere (the fused CPU/GPU kernels have no double backward; same math)
    with sdpa_kernel(SDPBackend.MATH):
        return _released_outer_steps(proxy, scorer, target, train_batches, val_batches, cfg, n_steps)


def _released_outer_steps(proxy, scorer, target, train_batches, val_batches, cfg, n_steps):
    a = {**RELEASED_ARGS, **(cfg or {})}
    unknown = set(a) - set(RELEASED_ARGS)
    if unknown:
        raise KeyError(f"unknown released args: {sorted(unknown)}")
    proxy = copy.deepcopy(proxy).train()
    scorer = copy.deepcopy(scorer).train()
    target = target.eval()
    p_params = list(proxy.parameters())
    s_named = score_parameters(scorer)
    s_params = [p for _, p in s_named]
    K = int(a["inner_steps"])
    if len(train_batches) < max(n_steps, (n_steps - 1) * K + K):
        raise ValueError("train_batches is too short for n_steps outer steps")

    # BS:272-289: one param group each, weight decay on every tensor (biases and layer norms included), foreach off
    opt_p = torch.optim.AdamW(p_params, lr=a["learning_rate"], weight_decay=a["weight_decay"],
                              betas=(a["beta1"], a["beta2"]), foreach=False)
    opt_s = torch.optim.AdamW(s_params, lr=a["learning_rate_influence"], weight_decay=a["weight_decay"],
                              betas=(a["beta1"], a["beta2"]), foreach=False)
    total = int(a["max_steps"]) * int(a["epochs"])
    warm = total * 0.1 if a["warmup"] else 0  # BS:657-660
    sched_p = torch.optim.lr_scheduler.LambdaLR(opt_p, released_lr_lambda(warm, total))
    sched_s = torch.optim.lr_scheduler.LambdaLR(opt_s, released_lr_lambda(warm, total))

    stale: tuple[Tensor, Tensor] | None = None  # (m, S) of BS:372-373, set by BS:510
    inner_iter = iter(train_batches)  # BS:392
    val_iter = itertools.cycle(val_batches)  # BS:391
    out = []
    for t in range(n_steps):
        outer_ids = train_batches[t]  # BS:393
        lr_p, lr_s = opt_p.param_groups[0]["lr"], opt_s.param_groups[0]["lr"]
        rec: dict[str, Any] = {"lr_proxy": lr_p, "lr_score": lr_s, "inner_weights": []}

        # 1. inner steps (BS:402-430)
        for _ in range(K):
            ids = next(inner_iter)
            with torch.no_grad():
                teacher = target(input_ids=ids).logits
                w = sample_weights(scorer(ids), stale)  # the graph to θ_s is irrelevant: only θ_p steps here
            rec["inner_weights"].append(w)
            lower_loss(proxy, ids, w, teacher, a).backward()
            torch.nn.utils.clip_grad_norm_(p_params, max_norm=a["grad_clip"])  # Fabric.clip_gradients (BS:427)
            opt_p.step()
            opt_p.zero_grad(set_to_none=True)

        # 2. v = ∇ validation loss (BS:433-440)
        val_ids, val_mask = next(val_iter)
        f_val = validation_loss(proxy, val_ids, val_mask)
        v = torch.autograd.grad(f_val, p_params)

        # 3. z (BS:443-478), from the value BS:375 / BS:513 stored
        with torch.no_grad():
            teacher = target(input_ids=outer_ids).logits
            w = sample_weights(scorer(outer_ids), stale)
        G = lower_loss(proxy, outer_ids, w, teacher, a)
        G_y = torch.autograd.grad(G, p_params, create_graph=True)
        z = z_init(p_params, first_step=(t == 0))
        for _ in range(int(a["z_loops"])):
            Hz = torch.autograd.grad(G_y, p_params, grad_outputs=z, retain_graph=True)  # H z by double backward
            z = z_update(z, Hz, v, a["lamb"], a["lr_z"], a["grad_clip"])
        del G, G_y

        # 4. per sequence: score gradient ∇s_i and c_i = <∇CE_i, z> (BS:492-508)
        s, grad_s, c = [], [], []
        for i in range(outer_ids.shape[0]):
            x = outer_ids[i : i + 1]
            s_i = scorer(x).squeeze()
            grad_s.append(torch.autograd.grad(s_i, s_params))
            s.append(s_i.detach())
            ce_i = sequence_ce(proxy(input_ids=x).logits, x).squeeze()
            g_i = torch.autograd.grad(ce_i, p_params)
            c.append(sum((zk * gk).sum() for zk, gk in zip(z, g_i)))
        s_t, c_t = torch.stack(s), torch.stack(c).detach()

        # 5. hypergradient (BS:50-90): -Σ P_i ∇s_i c_i + (Σ_j P_j ∇s_j)(Σ_i P_i c_i)
        m = s_t.max()
        e = torch.exp(s_t - m)
        S = e.sum()
        P = e / S
        mean_c = (P * c_t).sum()
        hyper = []
        for k in range(len(s_params)):
            first = -sum(P[i] * grad_s[i][k] * c_t[i] for i in range(len(s)))
            mean_grad = sum(P[j] * grad_s[j][k] for j in range(len(s)))
            hyper.append(first + mean_grad * mean_c)
        stale = (m, S)  # kept for the next step's weights (BS:510, used at BS:409-410 and 449-450)

        # 6. score step: per-tensor clip to unit norm, AdamW, both schedulers (BS:512-554)
        clipped = []
        for p, hg in zip(s_params, hyper):
            gr = hg.detach().clone()
            if gr.norm() > a["grad_clip"]:
                gr = gr / gr.norm()
            p.grad = gr
            clipped.append(gr.clone())
        opt_s.step()
        opt_p.zero_grad(set_to_none=True)
        opt_s.zero_grad(set_to_none=True)
        sched_p.step()
        sched_s.step()

        rec.update(
            z=tuple(zk.detach() for zk in z), v=tuple(v), val_loss=float(f_val.detach()), scores=s_t, P=P.detach(), c=c_t,
            outer_weights=w, hypergrad=tuple(h.detach() for h in hyper), hypergrad_clipped=tuple(clipped),
            score_names=[n for n, _ in s_named],
            proxy_state={k: x.detach().clone() for k, x in proxy.state_dict().items()},
            score_state={k: x.detach().clone() for k, x in scorer.state_dict().items()},
        )
        out.append(rec)
    return out
