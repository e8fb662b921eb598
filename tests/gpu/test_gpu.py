"""Every CUDA path of lmselect, on a GPU (issue 23). Marker ``gpu``; skipped with a reason where CUDA is absent, so
CI (CPU) collects and skips them. On a GPU machine: ``python3 -m pytest -q -m gpu tests/gpu``.

Tolerances: fp32 comparisons run with TF32 off (fixture ``no_tf32``) and hold to ~1e-5 relative; bf16 autocast
comparisons (BLISS batched vs per-sample) are stated where they are made: both sides compute in bf16 by different
routes (JVP vs per-sequence backward), so they agree to bf16 rounding (~1e-2 relative), not to fp32's.
"""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch

# LMSELECT_GPU_DRYRUN=1 runs these tests on the CPU to check their code before a GPU session (not their claims)
DRY = os.environ.get("LMSELECT_GPU_DRYRUN") == "1"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (torch.cuda.is_available() or DRY),
                                 reason="needs a CUDA GPU (run on the device machine)")]

CUDA = torch.device("cpu") if DRY else torch.device("cuda", 0)
DEV = CUDA.type  # the device string the code under test is given ("cuda"; "cpu" in a dry run)


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double().cpu() for t in ts])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ---------------------------------------------------------------------------------------------------------------
# training: bf16 step, exact resume, CPU agreement


def test_bf16_training_on_cuda_resumes_exactly(tiny_pool, tmp_path):
    from _train_helpers import make_cfg, step_losses, weights

    from lmselect.log import read_jsonl
    from lmselect.train.loop import train

    kw = dict(device=DEV, dtype="auto", optim={"warmup_steps": 2})  # auto = bf16 autocast on CUDA
    ids = tiny_pool.ids(0)
    full = train(make_cfg(steps=6, **kw), tiny_pool, ids, tmp_path / "full")
    train(make_cfg(steps=3, **kw), tiny_pool, ids, tmp_path / "split")
    resumed = train(make_cfg(steps=6, **kw), tiny_pool, ids, tmp_path / "split")
    assert resumed["step"] == full["step"] == 6
    start = next(r for r in read_jsonl(tmp_path / "full" / "train_log.jsonl") if r.get("event") == "start")
    assert start["device"].startswith(DEV)
    losses = step_losses(tmp_path / "full")
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert step_losses(tmp_path / "split") == losses, "resume on CUDA is not bit-exact"
    wa, wb = weights(tmp_path / "split"), weights(tmp_path / "full")
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "weights after resume differ on CUDA"


def test_fp32_training_on_cuda_matches_cpu(tiny_pool, tmp_path, no_tf32):
    """dtype float32: no autocast, but train() lets CUDA matmuls use TF32 (10-bit mantissa inputs), so the losses of
    3 steps agree to ~1e-3 relative, not to fp32 rounding."""
    from _train_helpers import make_cfg, step_losses

    from lmselect.train.loop import train

    ids = tiny_pool.ids(0)
    train(make_cfg(steps=3, device=DEV, dtype="float32"), tiny_pool, ids, tmp_path / "gpu")
    train(make_cfg(steps=3, device="cpu", dtype="float32"), tiny_pool, ids, tmp_path / "cpu")
    np.testing.assert_allclose(step_losses(tmp_path / "gpu"), step_losses(tmp_path / "cpu"), rtol=5e-3)


# ---------------------------------------------------------------------------------------------------------------
# DDP and FSDP2 wrapping on one GPU (a one-process NCCL group)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_ddp_and_fsdp2_wrap_on_one_gpu(fsdp, no_tf32):
    import torch.distributed as dist

    from lmselect.models.losses import token_ce
    from lmselect.models.presets import build_model
    from lmselect.train import distributed as D
    from lmselect.train.schedules import OptimConfig, build_optimizer

    class OneRank(D.DistInfo):  # world size 1 never wraps in the loop; force the wrapping path itself
        @property
        def enabled(self) -> bool:
            return True

    ref = build_model("debug", 96, seed=0, device=CUDA)
    x = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0)).to(CUDA)
    token_ce(ref(input_ids=x).logits, x).mean().backward()
    want = {n: p.grad.detach().clone() for n, p in ref.named_parameters()}
    dist.init_process_group("gloo" if DRY else "nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        model = build_model("debug", 96, seed=0, device=CUDA)
        wrapped = D.wrap_model(model, OneRank(0, 1, 0, CUDA), fsdp=fsdp)
        assert D.is_fsdp(wrapped) == fsdp and (fsdp or hasattr(wrapped, "no_sync"))
        opt = build_optimizer(model, OptimConfig())
        with D.grad_sync(wrapped, enabled=True):
            token_ce(wrapped(input_ids=x).logits, x).mean().backward()
        for n, p in model.named_parameters():
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            torch.testing.assert_close(g, want[n.removeprefix("module.")], rtol=1e-5, atol=1e-6, msg=n)
        opt.step()
        if fsdp:  # the gathered checkpoint collectives run on CUDA
            sd = D.full_model_state(model)
            osd = D.full_optimizer_state(model, opt)
            assert set(sd) == set(ref.state_dict()) and all(v.device.type == "cpu" for v in sd.values())
            assert osd["state"]
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# BLISS: batched == per-sample on CUDA; HVPs through the math attention path


def _bliss_solver(dtype: torch.dtype, amp: str, vocab: int = 96, seq: int = 16, **kw):
    from lmselect.data.valset import ValidationSet
    from lmselect.models.presets import build_model
    from lmselect.select.bliss import BilevelSolver, BlissConfig, init_score_model

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (6, seq), generator=g)
    mask = torch.zeros(6, seq - 1, dtype=torch.bool)
    mask[:, -3:] = True
    vs = ValidationSet(ids, mask, "lambada", "test")
    proxy = build_model("debug", vocab, seed=0).to(dtype)
    target = build_model("debug", vocab, seed=1).to(dtype)
    cfg = BlissConfig(batch_size=4, micro_batch=2, val_batch_size=4, outer_steps=10, dtype=amp, profile="paper", **kw)
    return BilevelSolver(cfg, proxy, target, init_score_model(proxy, seed=2), vs, CUDA)


def _both_impls(solver, seed: int = 5):
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(seed)).to(CUDA)
    vids, vmask, vtok = solver.next_val_batch()
    ps = solver.hypergradient(ids, vids, vmask, "per_sample", val_token_mask=vtok)
    b = solver.hypergradient(ids, vids, vmask, "batched", val_token_mask=vtok)
    return ps, b


def test_bliss_batched_equals_per_sample_on_cuda_fp32(no_tf32):
    ps, b = _both_impls(_bliss_solver(torch.float32, "float32"))
    assert ps.c.abs().min() > 0 and _flat(ps.grads).norm() > 0
    assert _rel(b.c.double().cpu(), ps.c.double().cpu()) < 1e-4
    assert _rel(_flat(b.grads), _flat(ps.grads)) < 1e-4


def test_bliss_batched_vs_per_sample_on_cuda_bf16():
    """Stated tolerance under bf16 autocast: c and the hypergradient within 10 % relative, cosine > 0.99."""
    ps, b = _both_impls(_bliss_solver(torch.float32, "bfloat16"))
    gp, gb = _flat(ps.grads), _flat(b.grads)
    assert _rel(b.c.double().cpu(), ps.c.double().cpu()) < 0.1
    assert _rel(gb, gp) < 0.1 and float(torch.nn.functional.cosine_similarity(gb, gp, dim=0)) > 0.99


def test_bliss_hvp_math_attention_on_cuda_equals_cpu_float64():
    """H·v on CUDA (double backward through SDPA restricted to the math kernel) equals the CPU's in float64, and
    one whole outer step runs with the fused attention kernels outside the HVPs."""
    from lmselect.select.bliss import BilevelSolver  # noqa: F401  (the public name)

    gpu = _bliss_solver(torch.float64, "float64")
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(5))
    w = torch.full((4,), 0.25, dtype=torch.float64)
    vec = tuple(torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64) * 1e-2
                for i, p in enumerate(gpu.p_params))
    h_gpu = gpu.lower_hvp(ids.to(CUDA), w.to(CUDA), [v.to(CUDA) for v in vec])
    cpu = _bliss_solver(torch.float64, "float64")
    cpu.device = torch.device("cpu")
    for m in (cpu.proxy, cpu.target, cpu.scorer):
        m.to("cpu")
    h_cpu = cpu.lower_hvp(ids, w, list(vec))
    assert _flat(h_cpu).norm() > 0 and _rel(_flat(h_gpu), _flat(h_cpu)) < 1e-9
    # a full outer step (bf16 autocast, fused kernels for the first-order passes) is finite
    solver = _bliss_solver(torch.float32, "auto")
    batches = iter([torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(k)) for k in range(4)])
    m = solver.outer_step(batches)
    assert np.isfinite(m["upper_loss"]) and np.isfinite(m["hypergrad_norm"]) and m["hypergrad_norm"] > 0


# ---------------------------------------------------------------------------------------------------------------
# scoring: CUDA vs CPU


def test_scoring_on_cuda_matches_cpu(tiny_pool, tmp_path, no_tf32):
    from lmselect.models.presets import build_model
    from lmselect.score import score_pool
    from lmselect.score.sidecar import read_scores
    from lmselect.select.bliss import init_score_model

    scorer = init_score_model(build_model("debug", tiny_pool.vocab_size, seed=0), seed=1)
    d = tmp_path / "scorer"
    scorer.save_pretrained(d)
    runs = {}
    for name, dev, dt in (("cpu", "cpu", "float32"), ("gpu32", DEV, "float32"), ("gpubf16", DEV, "auto")):
        out = score_pool(d, tiny_pool, None, tmp_path / name, batch_size=5, device=dev, dtype=dt, progress=False)
        runs[name] = read_scores(out)
    ids, cpu = runs["cpu"]
    np.testing.assert_array_equal(runs["gpu32"][0], ids)
    np.testing.assert_allclose(runs["gpu32"][1], cpu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(runs["gpubf16"][1], cpu, rtol=0, atol=2e-2)  # bf16 autocast: scores in (0, 1)
    assert np.std(cpu) > 0


# ---------------------------------------------------------------------------------------------------------------
# MATES: batched probes == the loop on CUDA


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_mates_batched_probes_equal_loop_on_cuda(tiny_pool, tiny_tokenizer, tmp_path, dtype, rtol, no_tf32):
    from lmselect.models.losses import token_ce
    from lmselect.models.presets import build_model
    from lmselect.select.mates import probe_oracle
    from lmselect.testing import SAMPLE_LAMBADA, make_valset

    vset = make_valset(tmp_path / "val.jsonl", tiny_tokenizer, SAMPLE_LAMBADA[:5], seq_len=32)
    model = build_model("debug", tiny_pool.vocab_size, seed=0).to(device=CUDA, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    for s in range(2):
        x = tiny_pool.batch(tiny_pool.ids(0)[4 * s : 4 * s + 4]).to(CUDA)
        opt.zero_grad()
        token_ce(model(input_ids=x).logits, x).mean().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    probes = tiny_pool.batch(tiny_pool.ids(1)[:5])
    kw = dict(val_batch_size=3, lr=2e-3, clip_grad_norm=0.5, dtype="float32")
    batched = probe_oracle(model, opt, probes, vset, method="batched", chunk_size=2, **kw)
    loop = probe_oracle(model, opt, probes, vset, method="loop", attn_implementation="eager", **kw)
    np.testing.assert_allclose(batched, loop, rtol=rtol, atol=0)
    assert np.std(loop) > 0


# ---------------------------------------------------------------------------------------------------------------
# RHO-1 / BLADE masks on CUDA


def test_rho1_mask_on_cuda_equals_brute_force(tiny_tokenizer):
    from lmselect.models.presets import build_model
    from lmselect.select.rho1 import Rho1Selector, reference_token_ce

    V = len(tiny_tokenizer)
    sel = Rho1Selector(build_model("debug", V, seed=1).to(CUDA), keep_fraction=0.6)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, V, (3, 17), generator=g).to(CUDA)
    target_ce = (torch.round(torch.rand(3, 16, generator=g) * 4) + 3.0).to(CUDA)  # many exact ties
    mask = sel.keep_mask(x, target_ce)
    assert mask.device.type == DEV
    excess = (target_ce - reference_token_ce(sel.reference, x)).cpu()
    flat = excess.reshape(-1).tolist()
    k = round(0.6 * len(flat))
    order = sorted(range(len(flat)), key=lambda j: (-flat[j], j))[:k]
    want = torch.zeros(len(flat), dtype=torch.bool)
    want[order] = True
    assert torch.equal(mask.cpu(), want.view(excess.shape))


# ---------------------------------------------------------------------------------------------------------------
# `lmselect eval`, then end to end `lmselect run` (every method's CUDA path, masks included; the longest, last)


def test_eval_cli_on_cuda_matches_cpu(tiny_tokenizer, tmp_path):
    try:  # the GPU image lacks lm-eval; bench/gpu_run.sh installs carried wheels, which may not match its pyarrow
        import lm_eval.evaluator  # noqa: F401
    except Exception as e:
        pytest.skip(f"lm-eval does not import here ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lmselect.cli import main
    from lmselect.models.presets import build_model

    d = tmp_path / "model"
    build_model("debug", len(tiny_tokenizer), seed=0, eos_token_id=tiny_tokenizer.eos_token_id).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    res = {}
    for dev in ("cpu", DEV):
        out = tmp_path / f"eval_{dev}"
        assert main(["eval", str(d), "--tasks", "lambada_openai,piqa", "--limit", "4", "--out", str(out),
                     "--batch-size", "4", "--seed", "7", "--device", dev, "--dtype", "float32"]) == 0
        res[dev] = json.loads((out / "results.json").read_text())
    assert res[DEV]["device"].startswith(DEV)
    for t in ("lambada_openai", "piqa"):
        assert res[DEV]["tasks"][t]["acc"] == res["cpu"]["tasks"][t]["acc"], t
    np.testing.assert_allclose(res[DEV]["tasks"]["lambada_openai"]["perplexity"],
                               res["cpu"]["tasks"]["lambada_openai"]["perplexity"], rtol=1e-3)


def test_tiny_run_end_to_end_on_cuda(tiny_recipe, tmp_path):
    from lmselect.artifacts import is_complete
    from lmselect.cli import main
    from lmselect.log import read_jsonl

    out = tmp_path / "run"
    methods = "[random,bliss,mates,rho1,blade]"
    assert main(["run", str(tiny_recipe), "--out", str(out), "--no-report", f"--methods={methods}"]) == 0
    for m in ("random", "bliss", "mates", "rho1", "blade"):
        assert is_complete(out / m / "seed0" / "round2", kind="round"), m
        ev = json.loads((out / m / "seed0" / "round2" / "eval" / "results.json").read_text())
        assert np.isfinite(ev["val_loss"]["lambada"]), m
        log = read_jsonl(out / m / "seed0" / "round2" / "target" / "train_log.jsonl")
        assert next(r for r in log if r.get("event") in ("start", "resume"))["device"].startswith(DEV), m
        if m in ("rho1", "blade"):  # the token masks ran on CUDA and kept about their fraction
            kept = [r["sel_kept_fraction"] for r in log if "sel_kept_fraction" in r]
            assert kept and all(0.5 < k < 0.7 for k in kept), (m, kept)
