"""BLISS bilevel solver: batched vs per-sample oracle, HVP, implicit hypergradient vs finite differences, score-model
initialisation, a resumable solve_round, tokenizer checks (METHODS §1.1–1.2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmselect.artifacts import LmselectError, read_manifest
from lmselect.data.valset import ValidationSet
from lmselect.log import read_jsonl
from lmselect.models.losses import token_kl
from lmselect.models.presets import build_model
from lmselect.models.scorer import SequenceScorer
from lmselect.select.bliss import BilevelSolver, BlissConfig, init_score_model, solve_round
from lmselect.select.bliss import bilevel_math as bm

VOCAB = 96
L = 16


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _rel(a, b) -> float:
    a, b = _flat(a) if isinstance(a, (tuple, list)) else a, _flat(b) if isinstance(b, (tuple, list)) else b
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _valset(n: int = 6, seed: int = 3) -> ValidationSet:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, L), generator=g)
    mask = torch.zeros(n, L - 1, dtype=torch.bool)
    mask[:, -3:] = True  # LAMBADA-like: only the final-word tokens count
    return ValidationSet(ids, mask, "lambada", "test")


def _solver(dtype=torch.float64, **cfg_kw) -> BilevelSolver:
    proxy = build_model("debug", VOCAB, seed=0).to(dtype)
    target = build_model("debug", VOCAB, seed=1).to(dtype)
    scorer = init_score_model(proxy, seed=2)
    kw = dict(batch_size=4, micro_batch=2, val_batch_size=4, outer_steps=10, dtype="float64" if dtype == torch.float64 else "float32")
    kw.update(cfg_kw)
    return BilevelSolver(BlissConfig(**kw), proxy, target, scorer, _valset())


def _batch(b: int = 4, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, L), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# 1. batched == per-sample oracle


def test_batched_c_and_hypergradient_match_per_sample_oracle():
    solver = _solver()
    ids = _batch()
    g = torch.Generator().manual_seed(7)
    z = tuple(torch.randn(p.shape, generator=g, dtype=p.dtype) * 1e-2 for p in solver.p_params)

    c_ref = solver.compute_c(ids, z, "per_sample")
    c_jvp = solver.compute_c(ids, z, "batched")
    solver.cfg.batched_dots = "double_backward"
    c_db = solver.compute_c(ids, z, "batched")
    assert c_ref.abs().min() > 0
    assert _rel(c_jvp, c_ref) < 1e-10, _rel(c_jvp, c_ref)
    assert _rel(c_db, c_ref) < 1e-10, _rel(c_db, c_ref)

    s_all, _, _ = solver.global_weights(solver.scores(ids))
    g_ref = solver.score_grads(ids, s_all, c_ref, "per_sample")
    g_bat = solver.score_grads(ids, s_all, c_ref, "batched")
    assert _flat(g_ref).norm() > 0
    assert _rel(g_bat, g_ref) < 1e-10, _rel(g_bat, g_ref)

    # the whole steps 2-5 with both implementations, same state, same batches (no warm start: same z0 twice)
    solver.cfg.z_warm_start = False
    vids, vmask, vtok = solver.next_val_batch()
    h_ps = solver.hypergradient(ids, vids, vmask, "per_sample", val_token_mask=vtok)
    h_b = solver.hypergradient(ids, vids, vmask, "batched", val_token_mask=vtok)
    assert _rel(h_b.c, h_ps.c) < 1e-6 and _rel(h_b.grads, h_ps.grads) < 1e-6


def test_softmax_weight_grad_formula_matches_autograd():
    s, c = torch.randn(9, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
    leaf = s.clone().requires_grad_(True)
    (-(torch.softmax(leaf, 0) * c).sum()).backward()
    assert torch.allclose(bm.softmax_weight_grad(s, c), leaf.grad, rtol=1e-12, atol=1e-15)
    assert torch.allclose(bm.softmax_weight_grad_autograd(s, c), leaf.grad, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------------------------------------------
# 2. Hessian-vector products


def test_hvp_of_lower_loss_matches_finite_differences_of_gradient():
    solver = _solver()
    ids = _batch(seed=11)
    _, _, p_loc = solver.global_weights(solver.scores(ids))
    g = torch.Generator().manual_seed(3)
    z = tuple(torch.randn(p.shape, generator=g, dtype=p.dtype) for p in solver.p_params)
    z = tuple(t / bm.tree_norm(z) for t in z)  # unit direction: FD truncation error ~ (eps·‖z‖)²
    hz = solver.lower_hvp(ids, p_loc, z)

    def grad_G(shift: float):
        params = tuple((p.detach() + shift * zi).requires_grad_(True) for p, zi in zip(solver.p_params, z))
        total = None
        for i, sl in enumerate(bm.chunks(4, 2)):
            fn = solver.lower_fn(ids, p_loc, sl, None, ce_scale=1.0, reg_scale=1.0, with_l2=(i == 0))
            gi = bm.grad_of(fn, params)
            total = gi if total is None else tuple(a + b for a, b in zip(total, gi))
        return total

    eps = 1e-4
    fd = tuple((a - b) / (2 * eps) for a, b in zip(grad_G(eps), grad_G(-eps)))
    err = _rel(hz, fd)
    assert err < 1e-7, err


def test_hvp_matches_dense_hessian_on_tiny_problem():
    torch.manual_seed(0)
    A = torch.randn(5, 5, dtype=torch.float64)
    w0 = torch.randn(5, dtype=torch.float64)

    def f(params):
        (w,) = params
        return torch.log1p((A @ w).exp()).sum() + 0.3 * (w**4).sum()

    H = torch.autograd.functional.hessian(lambda w: f((w,)), w0)
    v = torch.randn(5, dtype=torch.float64)
    (hv,) = bm.hvp(f, (w0.clone().requires_grad_(True),), (v,))
    assert torch.allclose(hv, H @ v, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# 3. implicit hypergradient == d/dθs F(θp*(θs)) on a problem solved to convergence


class _ToyBilevel:
    """Softmax-regression "LM" (θp = W, C×d) on n sequences of T tokens, KL to a fixed teacher, L2; the score model
    is sigmoid(φ_i·w + b). G and F have exactly the BLISS form, so the solver's math functions apply unchanged."""

    def __init__(self, n=6, T=5, d=4, C=3, k=3, gamma=0.1, lam=2e-2, seed=0):
        g = torch.Generator().manual_seed(seed)
        r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
        self.X, self.Y = r(n, T, d), torch.randint(0, C, (n, T), generator=g)
        self.Xv, self.Yv = r(4, T, d), torch.randint(0, C, (4, T), generator=g)
        self.teacher = self.X @ r(C, d).T
        self.phi = r(n, k) * 2.0
        self.n, self.C, self.d, self.gamma, self.lam = n, C, d, gamma, lam

    def ce_fn(self, params, sl):
        (W,) = params
        lg = self.X[sl] @ W.T
        return F.cross_entropy(lg.reshape(-1, self.C), self.Y[sl].reshape(-1), reduction="none").view(lg.shape[:2]).mean(1)

    def score_fn(self, sp, sl):
        w, b = sp
        return torch.sigmoid(self.phi[sl] @ w + b)

    def G(self, params, P):
        (W,) = params
        return (P * self.ce_fn(params, slice(None))).sum() + self.gamma * token_kl(self.teacher, self.X @ W.T) + self.lam * (W**2).sum()

    def F(self, params):
        (W,) = params
        lg = self.Xv @ W.T
        return F.cross_entropy(lg.reshape(-1, self.C), self.Yv.reshape(-1))

    def weights(self, sp):
        return torch.softmax(self.score_fn(sp, slice(None)), 0)

    def solve_inner(self, sp) -> torch.Tensor:
        P = self.weights(sp).detach()
        W = torch.zeros(self.C * self.d, dtype=torch.float64)
        f = lambda w: self.G((w.view(self.C, self.d),), P)  # noqa: E731
        for _ in range(12):  # Newton: strongly convex (KL + L2), converges to machine precision
            g = torch.autograd.functional.jacobian(f, W)
            H = torch.autograd.functional.hessian(f, W)
            W = W - torch.linalg.solve(H, g)
        return W.view(self.C, self.d)


def test_implicit_hypergradient_matches_finite_difference_of_converged_validation_loss():
    toy = _ToyBilevel()
    g = torch.Generator().manual_seed(1)
    sp = (torch.randn(3, generator=g, dtype=torch.float64), torch.tensor(0.1, dtype=torch.float64))

    W = toy.solve_inner(sp).requires_grad_(True)
    params = (W,)
    P = toy.weights(sp).detach()
    assert float(bm.tree_norm(bm.grad_of(lambda p: toy.G(p, P), params))) < 1e-12  # inner level converged
    v = bm.grad_of(toy.F, params)
    Hd = torch.autograd.functional.hessian(lambda w: toy.G((w.view_as(W),), P), W.detach().reshape(-1))
    lam_max = float(torch.linalg.eigvalsh(Hd).max())
    # the solver's z iteration, damping 0, enough steps to converge; check it against the dense solve
    z = bm.solve_z(lambda vec: bm.hvp(lambda p: toy.G(p, P), params, vec), v, steps=1500, lr=1.0 / lam_max,
                   damping=0.0, init=0.0, clip=1.0)
    z_exact = torch.linalg.solve(Hd, v[0].reshape(-1))
    assert _rel(z[0].reshape(-1), z_exact) < 1e-8

    c = bm.dots_jvp(toy.ce_fn, params, z, toy.n)
    assert _rel(bm.dots_double_backward(toy.ce_fn, params, z, toy.n), c) < 1e-12
    sp_leaf = tuple(t.clone().requires_grad_(True) for t in sp)
    s = toy.score_fn(sp_leaf, slice(None)).detach()
    hyper = _flat(bm.hypergrad_batched(toy.score_fn, sp_leaf, bm.softmax_weight_grad_autograd(s, c)))
    hyper_ps = _flat(bm.hypergrad_per_sample(toy.score_fn, sp_leaf, bm.softmax_weight_grad(s, c)))
    assert _rel(hyper_ps, hyper) < 1e-12

    # central finite differences of F(θp*(θs)) in every score-model coordinate
    eps = 1e-4
    flat0 = _flat(sp)

    def Fval(flat):
        sp_ = (flat[:3], flat[3])
        return float(toy.F((toy.solve_inner(sp_),)))

    fd = torch.zeros(4, dtype=torch.float64)
    for j in range(4):
        e = torch.zeros(4, dtype=torch.float64)
        e[j] = eps
        fd[j] = (Fval(flat0 + e) - Fval(flat0 - e)) / (2 * eps)
    assert fd.abs().max() > 1e-6  # the problem has a non-trivial hypergradient
    assert torch.equal(torch.sign(hyper), torch.sign(fd)), (hyper, fd)
    assert _rel(hyper, fd) < 1e-4, (_rel(hyper, fd), hyper, fd)


# ---------------------------------------------------------------------------------------------------------------
# 4. score-model initialisation


def test_init_score_model_copies_backbone_and_fresh_head():
    proxy = build_model("debug", VOCAB, seed=0)
    sc = init_score_model(proxy, seed=123)
    assert isinstance(sc, SequenceScorer) and sc.activation == "sigmoid"
    src = dict(proxy.named_parameters())
    for n, p in sc.lm.named_parameters():
        assert torch.equal(p, src[n]), n
        assert p.data_ptr() != src[n].data_ptr(), n
    expected = torch.randn(sc.head.weight.shape, generator=torch.Generator().manual_seed(123)) * 0.02
    assert torch.equal(sc.head.weight.detach(), expected)
    assert torch.count_nonzero(sc.head.bias) == 0
    assert 0.01 < float(sc.head.weight.detach().std()) < 0.03
    with torch.no_grad():
        s = sc(_batch())
    assert s.shape == (4,) and bool(((s > 0) & (s < 1)).all())


# ---------------------------------------------------------------------------------------------------------------
# 5. solve_round: log, score model, manifest, resume


def _round_models(pool):
    proxy = build_model("debug", pool.vocab_size, seed=0)
    target = build_model("debug", pool.vocab_size, seed=1)
    return proxy, target, init_score_model(proxy, seed=2)


def test_solve_round_writes_artifact_and_resumes_to_identical_weights(tiny_pool, tmp_path):
    ids_val = tiny_pool.ids("val")
    vs = ValidationSet(tiny_pool.batch(ids_val), torch.ones(len(ids_val), tiny_pool.seq_len - 1, dtype=torch.bool), "text", "pool")
    cfg = BlissConfig(batch_size=4, val_batch_size=4, outer_steps=4, save_every=100, log_every=1, seed=0,
                      proxy_lr=1e-3, score_lr=1e-3)
    train_ids = tiny_pool.ids(0)

    a_dir = tmp_path / "a"
    sc_a = solve_round(cfg, *_round_models(tiny_pool), train_ids, tiny_pool, vs, a_dir, progress=False)
    m = read_manifest(a_dir, kind="bilevel")
    assert m["counts"]["outer_steps"] == 4 and m["extra"]["hypergrad_impl"] == "per_sample"  # auto on CPU
    recs = read_jsonl(a_dir / "bilevel_log.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all(np.isfinite(r[k]) for r in recs for k in ("upper_loss", "lower_loss", "kl", "hypergrad_norm"))
    assert not (a_dir / "solver_state.pt").exists()
    loaded = SequenceScorer.load(a_dir / "score_model")
    for (n, p), q in zip(sc_a.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(p, q), n
    init = _round_models(tiny_pool)[2]
    assert not torch.equal(init.head.weight, sc_a.head.weight)  # the score model was trained

    # interrupted after 2 steps, then a fresh process (fresh model objects) resumes
    b_dir = tmp_path / "b"
    solve_round(cfg, *_round_models(tiny_pool), train_ids, tiny_pool, vs, b_dir, stop_after=2, progress=False)
    assert (b_dir / "solver_state.pt").is_file() and not (b_dir / "manifest.json").exists()
    assert [r["step"] for r in read_jsonl(b_dir / "bilevel_log.jsonl")] == [1, 2]
    sc_b = solve_round(cfg, *_round_models(tiny_pool), train_ids, tiny_pool, vs, b_dir, progress=False)
    for (n, p), q in zip(sc_a.state_dict().items(), sc_b.state_dict().values()):
        assert torch.equal(p, q), n
    assert [r["step"] for r in read_jsonl(b_dir / "bilevel_log.jsonl")] == [1, 2, 3, 4]

    # complete: a rerun loads the saved score model and computes nothing
    proxy, target, fresh = _round_models(tiny_pool)
    proxy.register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(AssertionError("computed")))
    sc_c = solve_round(cfg, proxy, target, fresh, train_ids, tiny_pool, vs, b_dir, progress=False)
    assert torch.equal(sc_c.head.weight, sc_a.head.weight)


# ---------------------------------------------------------------------------------------------------------------
# 6. tokenizer checks before compute


def test_mismatched_tokenizers_raise_before_compute(tiny_tokenizer, tiny_pool, tmp_path):
    from lmselect.testing import make_tokenizer

    other = make_tokenizer(vocab_size=300)
    calls = []
    proxy = build_model("debug", VOCAB, seed=0)
    proxy.register_forward_pre_hook(lambda *a: calls.append(1))
    target = build_model("debug", VOCAB, seed=1)
    sc = init_score_model(proxy, seed=2)
    with pytest.raises(LmselectError, match="tokenizer mismatch"):
        BilevelSolver(BlissConfig(), proxy, target, sc, _valset(), proxy_tokenizer=tiny_tokenizer, target_tokenizer=other)
    with pytest.raises(LmselectError, match="tokenizer mismatch"):  # fingerprints work too
        BilevelSolver(BlissConfig(), proxy, target, sc, _valset(), proxy_tokenizer="0" * 16, target_tokenizer="1" * 16)
    with pytest.raises(LmselectError, match="vocabulary"):
        BilevelSolver(BlissConfig(), proxy, build_model("debug", VOCAB + 8, seed=1), sc, _valset())
    with pytest.raises(LmselectError, match="tokenizer mismatch"):
        solve_round(BlissConfig(batch_size=4), proxy, target, sc, tiny_pool.ids(0), tiny_pool, _valset(), tmp_path / "x",
                    target_tokenizer=other, progress=False)
    assert calls == []
    assert not (tmp_path / "x").exists()


def test_sigterm_saves_the_solver_state_and_the_rerun_resumes_there(tiny_pool, tmp_path, monkeypatch):
    """Regression (issue 29, item 6): with save_every larger than the solve, a SIGTERM (Slurm preemption) lost the
    whole bilevel stage. Now the step that was running finishes, its state is saved, the previous handler acts (the
    CLI's raises Terminated), and a rerun resumes at that step."""
    import os
    import signal

    from lmselect.select.bliss.solver import BilevelSolver as S

    class Stopped(KeyboardInterrupt):
        pass

    def handler(signum, frame):  # what the CLI installs (cli._raise_terminated)
        raise Stopped()

    ids_val = tiny_pool.ids("val")
    vs = ValidationSet(tiny_pool.batch(ids_val), torch.ones(len(ids_val), tiny_pool.seq_len - 1, dtype=torch.bool), "text", "pool")
    cfg = BlissConfig(batch_size=4, val_batch_size=4, outer_steps=4, save_every=100, log_every=1, seed=0,
                      proxy_lr=1e-3, score_lr=1e-3)
    train_ids = tiny_pool.ids(0)
    real = S.outer_step

    def outer_step(self, *a, **k):
        out = real(self, *a, **k)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-solve, after outer step 2
        return out

    prev = signal.signal(signal.SIGTERM, handler)
    try:
        monkeypatch.setattr(S, "outer_step", outer_step)
        with pytest.raises(Stopped):
            solve_round(cfg, *_round_models(tiny_pool), train_ids, tiny_pool, vs, tmp_path / "b", progress=False)
        assert signal.getsignal(signal.SIGTERM) is handler  # the previous handler is back
    finally:
        signal.signal(signal.SIGTERM, prev)
        monkeypatch.setattr(S, "outer_step", real)
    state = torch.load(tmp_path / "b" / "solver_state.pt", weights_only=False)
    assert state["step"] == 2 and not (tmp_path / "b" / "manifest.json").exists()
    solve_round(cfg, *_round_models(tiny_pool), train_ids, tiny_pool, vs, tmp_path / "b", progress=False)
    # resumed at step 2 (exactness of a resume from the saved state: the test above)
    assert [r["step"] for r in read_jsonl(tmp_path / "b" / "bilevel_log.jsonl")] == [1, 2, 3, 4]
    assert read_manifest(tmp_path / "b", kind="bilevel")["counts"]["outer_steps"] == 4
