"""LoRDO (train/lordo.py, METHODS §5): update equations against hand references, error feedback, basis refresh,
2-process gloo syncs with counted collectives, communication accounting, training through train(), exact resume."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from _train_helpers import make_cfg, step_losses, weights

from lmselect.artifacts import LmselectError
from lmselect.train.checkpoint import load_checkpoint_model, load_training_state
from lmselect.train.loop import train
from lmselect.train.lordo import LordoConfig, LordoOptimizer, communication_bytes, top_left_singular
from lmselect.train.schedules import OptimConfig

B1, B2, EPS = 0.9, 0.95, 1e-8


class Mat(torch.nn.Module):
    """One 2-D weight (low-rank under LoRDO) and one bias (AdamW)."""

    def __init__(self, shape: tuple[int, int], seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(*shape, generator=g, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.zeros(shape[1], dtype=torch.float64))


def run_steps(grads: list[torch.Tensor], lcfg: LordoConfig, lr: float = 0.1, wd: float = 0.0) -> list[torch.Tensor]:
    """Apply LoRDO to a matrix with the given gradient sequence; returns the parameter after each step."""
    model = Mat(tuple(grads[0].shape))
    opt = LordoOptimizer(model, OptimConfig(lr=lr, betas=(B1, B2), eps=EPS, weight_decay=wd), lcfg)
    out = [model.w.detach().clone()]
    for G in grads:
        model.w.grad = G.clone()
        opt.step()
        out.append(model.w.detach().clone())
    return out


def _grads(shape: tuple[int, int], n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(n)]


# ---- (1) update equations ----------------------------------------------------------------------------------------


def test_full_rank_term_is_column_normalised_sgd():
    """ω = 0, broadcast v̄, r = min dim: the step is G divided by μ·(EMA of its per-column RMS over the projected
    rows), with Adam bias correction; computed here without any projection (Q square orthonormal drops out)."""
    shape, lr, mu = (4, 7), 0.1, 2.0  # 4 < 7: the rows are projected (side "left")
    grads = _grads(shape, 3)
    traj = run_steps(grads, LordoConfig(rank=64, omega=0.0, mu=mu, second_moment="broadcast"), lr=lr)
    col_ms = torch.zeros(shape[1], dtype=torch.float64)
    for t, G in enumerate(grads, start=1):
        col_ms = B2 * col_ms + (1 - B2) * (G * G).mean(dim=0)
        expected = -lr * G / (mu * ((col_ms / (1 - B2**t)).sqrt() + EPS))
        torch.testing.assert_close(traj[t] - traj[t - 1], expected, rtol=1e-10, atol=1e-12)


def test_factored_full_rank_term_is_sign_sgd_on_rank1_gradients():
    """Adafactor's row × column factorisation is exact for a rank-1 G², so with ω = 0 the step is lr·G/(|G|+ε)."""
    u, v = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), torch.tensor([3.0, 1.0, -1.0, 2.0], dtype=torch.float64)
    G = torch.outer(u, v)
    for shape_t in (False, True):  # also the transposed layout (projected side "right")
        g = G.T.contiguous() if shape_t else G
        traj = run_steps([g], LordoConfig(rank=2, omega=0.0))
        torch.testing.assert_close(traj[1] - traj[0], -0.1 * g / (g.abs() + EPS), rtol=1e-10, atol=1e-12)


def test_low_rank_term_is_adam_in_the_gradient_basis_and_the_mix_is_linear():
    shape, lr = (5, 3), 0.05  # 5 > 3: the columns are projected (side "right"), a = 3
    grads = _grads(shape, 3, seed=2)
    low = run_steps(grads, LordoConfig(rank=3, omega=1.0), lr=lr)
    # hand reference: Q = top left singular vectors of the first (oriented) gradient, Adam on g = Qᵀ Gᵀ
    Q = torch.linalg.svd(grads[0].T, full_matrices=False)[0]
    m = v = torch.zeros(3, 5, dtype=torch.float64)
    for t, G in enumerate(grads, start=1):
        g = Q.T @ G.T
        m, v = B1 * m + (1 - B1) * g, B2 * v + (1 - B2) * g * g
        step = Q @ ((m / (1 - B1**t)) / ((v / (1 - B2**t)).sqrt() + EPS))
        torch.testing.assert_close(low[t] - low[t - 1], -lr * step.T, rtol=1e-9, atol=1e-12)
    # quasi-hyperbolic mix: ω·(low-rank step) + (1 − ω)·(full-rank step), for any ω, with weight decay on top
    full = run_steps(grads, LordoConfig(rank=3, omega=0.0), lr=lr)
    mix = run_steps(grads, LordoConfig(rank=3, omega=0.3), lr=lr, wd=0.5)
    for t in range(1, 4):
        expected = mix[t - 1] * (1 - lr * 0.5) + 0.3 * (low[t] - low[t - 1]) + 0.7 * (full[t] - full[t - 1])
        torch.testing.assert_close(mix[t], expected, rtol=1e-10, atol=1e-12)


# ---- (2) error feedback, (3) basis refresh -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 9), (9, 6)])
def test_error_feedback_conserves_the_gradient(shape):
    model = Mat(shape)
    opt = LordoOptimizer(model, OptimConfig(lr=0.01, weight_decay=0.0), LordoConfig(rank=2))
    side = "left" if shape[0] <= shape[1] else "right"
    orient = (lambda x: x) if side == "left" else (lambda x: x.T)
    e_old = torch.zeros(min(shape), max(shape), dtype=torch.float64)
    for G in _grads(shape, 4, seed=3):
        model.w.grad = G.clone()
        opt.step()
        st = opt.state[model.w]
        Q, e_new = st["Q"], st["E"]
        g = Q.T @ (orient(G) + e_old)  # what was projected this step
        torch.testing.assert_close(Q @ g + e_new, orient(G) + e_old, rtol=0, atol=1e-13)
        torch.testing.assert_close(Q.T @ e_new, torch.zeros_like(g), rtol=0, atol=1e-12)  # E ⟂ span(Q)
        assert e_new.norm() > 0.1 * orient(G).norm()  # rank 2 of 6 really drops something
        e_old = e_new.clone()


def test_sync_refreshes_an_orthonormal_basis_from_the_pseudo_gradient():
    model = Mat((6, 10))
    opt = LordoOptimizer(model, OptimConfig(lr=0.05, weight_decay=0.0), LordoConfig(rank=3, sync_every=3))
    for i, G in enumerate(_grads((6, 10), 3, seed=4), start=1):
        model.w.grad = G
        opt.step()
        if i < 3:
            assert not opt.maybe_sync(i)
    st = opt.state[model.w]
    delta = st["anchor"] - model.w.detach()
    q_old, m_old, v_old = st["Q"].clone(), st["m"].clone(), st["v"].clone()
    w_before = model.w.detach().clone()
    assert opt.maybe_sync(3) and opt.syncs == 1
    Q = st["Q"]
    torch.testing.assert_close(Q.T @ Q, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-12)
    U = torch.linalg.svd(delta, full_matrices=False)[0][:, :3]
    torch.testing.assert_close(Q @ Q.T, U @ U.T, rtol=0, atol=1e-10)  # span = top-3 of Δ
    assert (Q @ Q.T - q_old @ q_old.T).abs().max() > 1e-3  # the basis did change
    P = Q.T @ q_old
    torch.testing.assert_close(st["m"], P @ m_old)
    torch.testing.assert_close(st["v"], (P * P) @ v_old)
    assert (st["v"] >= 0).all()
    torch.testing.assert_close(model.w.detach(), w_before, rtol=0, atol=1e-14)  # one worker: averaging is a no-op
    assert torch.equal(st["anchor"], model.w.detach())  # the next period starts here


def test_top_left_singular_is_orthonormal_for_low_precision_inputs():
    x = torch.randn(8, 20).bfloat16()
    q = top_left_singular(x, 4).float()
    torch.testing.assert_close(q.T @ q, torch.eye(4), rtol=0, atol=2e-2)


# ---- (4) + (5) two gloo workers: syncs, counted collectives, measured bytes ---------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


def sync_worker(rank: int, world: int, port: int, out_dir: str, k: int) -> None:
    """Drive LordoOptimizer on a small model with rank-specific data; record collectives and parameters per step."""
    import torch.distributed as dist

    _init(rank, world, port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    calls: list[int] = []
    real = dist.all_reduce

    def counting(t, *a, **kw):
        calls.append(t.numel() * t.element_size())
        return real(t, *a, **kw)

    dist.all_reduce = counting
    try:
        torch.manual_seed(0)  # same init on both ranks
        model = torch.nn.Sequential(torch.nn.Embedding(11, 8), torch.nn.Linear(8, 16), torch.nn.LayerNorm(16),
                                    torch.nn.Linear(16, 11))
        lcfg = LordoConfig(rank=4, sync_every=k, bucket_numel=200)  # small buckets: several collectives per sync
        opt = LordoOptimizer(model, OptimConfig(lr=1e-2), lcfg)
        gen = torch.Generator().manual_seed(100 + rank)  # each worker its own data
        records = []
        for step in range(1, 2 * k + 1):
            x = torch.randint(0, 11, (16,), generator=gen)
            n0 = len(calls)
            torch.nn.functional.cross_entropy(model(x), (x + 1) % 11).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            synced = opt.maybe_sync(step)
            records.append({"step": step, "synced": synced, "calls": calls[n0:],
                            "params": [p.detach().clone() for p in model.parameters()],
                            "Q": opt.state[model[1].weight]["Q"].clone()})
        torch.save({"records": records, "bytes": communication_bytes(model, lcfg)}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.all_reduce = real
        dist.destroy_process_group()


def test_two_workers_sync_every_k_with_no_collectives_between(tmp_path):
    k = 3
    mp.spawn(sync_worker, args=(2, _free_port(), str(tmp_path), k), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for a, b in zip(r0["records"], r1["records"]):
        assert a["synced"] == b["synced"] == (a["step"] % k == 0)
        same = all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
        if a["synced"]:
            assert same and a["calls"] and torch.equal(a["Q"], b["Q"]), a["step"]  # one basis for all workers
            assert len(a["calls"]) > 1  # bucketed
        else:
            assert not a["calls"] and not same, a["step"]  # local steps: no collective, the replicas drift apart
    # (5) what went over the wire equals the accounting: lordo bytes/step × K per period, DDP = all gradients
    acct = r0["bytes"]
    sent = sum(sum(r["calls"]) for r in r0["records"])
    n = sum(p.numel() for p in r0["records"][0]["params"])
    assert acct["params"] == n and acct["ddp"] == 4 * n
    assert sent == 2 * k * acct["lordo"] == 2 * acct["ddp"]  # 2 periods of K steps, one full model each
    assert acct["ddp_over_lordo"] == pytest.approx(k)


def test_communication_bytes_accounting():
    lin = torch.nn.Linear(8, 16)  # weight 16 × 8: the 8-side is projected, r·b = 3·16; bias sent in full
    acct = communication_bytes(lin, LordoConfig(rank=3, sync_every=4))
    assert acct["params"] == 16 * 8 + 16 and acct["ddp"] == 4 * 144 and acct["lordo"] == 4 * 144 / 4
    assert acct["lowrank_ddp"] == 4 * (3 * 16 + 16)
    emb = torch.nn.Embedding(100, 8)
    assert communication_bytes(emb, LordoConfig(rank=3))["lowrank_ddp"] == 4 * 800  # embeddings: AdamW, full
    assert communication_bytes(emb, LordoConfig(rank=3, lowrank_embeddings=True))["lowrank_ddp"] == 4 * 3 * 100
    from lmselect.models.presets import build_model

    with torch.device("meta"):
        m = build_model("pythia-160m", 50304, seed=0)
    acct = communication_bytes(m, LordoConfig())
    assert acct["ddp_over_lordo"] == pytest.approx(32) and acct["lowrank_ddp"] < acct["ddp"]


# ---- (6) training through train(), (7) exact resume ---------------------------------------------------------------

LORDO = {"optimizer": "lordo", "lordo": {"rank": 8, "sync_every": 2}}


def test_lordo_training_lowers_the_loss(tiny_pool, tmp_path):
    res = train(make_cfg(steps=12, **LORDO), tiny_pool, tiny_pool.ids(0), tmp_path / "run")
    losses = step_losses(tmp_path / "run")
    assert len(losses) == 12 and res["step"] == 12
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses
    st = load_training_state(tmp_path / "run")["optimizer"]
    assert st["lordo"] and st["ranks"][0]["syncs"] == 6


def test_lordo_resume_is_exact(tiny_pool, tmp_path):
    ids = tiny_pool.ids(0)
    train(make_cfg(steps=5, **LORDO), tiny_pool, ids, tmp_path / "full")
    train(make_cfg(steps=3, **LORDO), tiny_pool, ids, tmp_path / "split")  # stops mid-period (syncs at 2, 4)
    train(make_cfg(steps=5, **LORDO), tiny_pool, ids, tmp_path / "split")
    assert step_losses(tmp_path / "split") == step_losses(tmp_path / "full")
    wa, wb = weights(tmp_path / "split"), weights(tmp_path / "full")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_lordo_config_errors(tiny_pool, tmp_path):
    with pytest.raises(LmselectError, match="fsdp"):
        train(make_cfg(fsdp=True, **LORDO), tiny_pool, tiny_pool.ids(0), tmp_path / "a")
    with pytest.raises(LmselectError, match="omega"):
        train(make_cfg(optimizer="lordo", lordo={"omega": 1.5}), tiny_pool, tiny_pool.ids(0), tmp_path / "b")
    train(make_cfg(steps=1), tiny_pool, tiny_pool.ids(0), tmp_path / "adam")
    with pytest.raises(LmselectError, match="optimizer state"):  # AdamW moments are not LoRDO state
        train(make_cfg(steps=1, continue_optimizer=True, **LORDO), tiny_pool, tiny_pool.ids(0), tmp_path / "c",
              init_from=tmp_path / "adam")


def lordo_train_worker(rank: int, world: int, port: int, pool_dir: str, out_dir: str, overrides: dict[str, Any]) -> None:
    """A rank of a 2-process LoRDO run through train(); DDP construction is forbidden, all_reduce calls counted."""
    import torch.distributed as dist
    import torch.nn.parallel

    from lmselect.data.pool import TokenPool
    from lmselect.train.distributed import cleanup

    _init(rank, world, port)

    def no_ddp(*a, **kw):
        raise AssertionError("LoRDO must not wrap the model in DDP")

    torch.nn.parallel.DistributedDataParallel.__init__ = no_ddp
    real, calls = dist.all_reduce, [0]

    def counting(*a, **kw):
        calls[0] += 1
        return real(*a, **kw)

    dist.all_reduce = counting
    pool = TokenPool(pool_dir)
    try:
        train(make_cfg(**overrides), pool, pool.ids(0), out_dir)
        dist.barrier()
    finally:
        cleanup()
    Path(out_dir, f"calls-{rank}-{overrides['steps']}").write_text(str(calls[0]))


def test_two_worker_lordo_training_resumes_exactly_and_saves_the_mean(tiny_pool, tmp_path):
    def run(out: Path, steps: int) -> None:
        ov = {"steps": steps, "log_every": 100, **LORDO}
        mp.spawn(lordo_train_worker, args=(2, _free_port(), str(tiny_pool.path), str(out), ov), nprocs=2, join=True)

    run(tmp_path / "full", 5)
    run(tmp_path / "split", 3)  # ends mid-period: the two replicas differ, both must be kept
    run(tmp_path / "split", 5)
    # only saving steps are logged (log_every 100): step 5 here, steps 3 and 5 in the split run
    assert step_losses(tmp_path / "split")[-1] == step_losses(tmp_path / "full")[-1]
    wa, wb = weights(tmp_path / "split"), weights(tmp_path / "full")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # collectives of the 5-step run: syncs at 2 and 4 (one bucket each), the final loss log, the saved mean
    assert (tmp_path / "full" / "calls-0-5").read_text() == "4"
    # the model file is the mean of the two local replicas kept in training_state
    st = load_training_state(tmp_path / "full")["optimizer"]
    assert st["world_size"] == 2
    from lmselect.models.presets import build_model

    model = build_model("debug", tiny_pool.vocab_size, seed=0)
    names = [n for n, p in model.named_parameters() if p.ndim >= 2] + [n for n, p in model.named_parameters() if p.ndim < 2]
    loc0, loc1 = st["ranks"][0]["local_params"], st["ranks"][1]["local_params"]
    assert any(not torch.equal(a, b) for a, b in zip(loc0, loc1))  # step 5 is after the last sync
    saved = load_checkpoint_model(tmp_path / "full").state_dict()  # in-memory names (on-disk ones may differ)
    for n, a, b in zip(names, loc0, loc1):
        torch.testing.assert_close(saved[n], (a + b) / 2, rtol=0, atol=1e-7, msg=n)
