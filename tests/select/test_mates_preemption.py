"""Regression (issue 29, item 6): MATES's oracle probe and influence-model training are preemption-safe.

Before, a SIGTERM'd (or killed) MATES round restarted its probe collection (paper scale: 80,000 probes, hours) and
its influence-model training from zero. Now both follow the training loop's rule (``train.loop.PreemptionGuard``):
their state is saved on SIGTERM (which then stops the stage in one line, exit 143 under the CLI) and at least every
``$LMSELECT_CHECKPOINT_EVERY_S`` seconds, and the rerun resumes there and ends bit-identical to an uninterrupted
round. Partial state never makes the stage, or one of its sub-steps, look finished."""

from __future__ import annotations

import copy
import os
import signal

import numpy as np
import pytest
import torch
from test_mates import trained_target

from lmselect.artifacts import is_complete, read_manifest
from lmselect.cli import Terminated, _raise_terminated
from lmselect.select import mates as mates_mod
from lmselect.select.mates import (
    INFLUENCE_PARTIAL,
    PROBE_PARTIAL,
    MatesConfig,
    _as_optimizer,
    probe_oracle,
    run_mates_round,
)
from lmselect.testing import SAMPLE_LAMBADA
from lmselect.testing import make_valset as _make_valset

REAL_TRACK = mates_mod.track


@pytest.fixture
def cli_sigterm():
    """SIGTERM handled as under the CLI (raises Terminated, exit 143); restored afterwards."""
    prev = signal.signal(signal.SIGTERM, _raise_terminated)
    yield lambda: signal.signal(signal.SIGTERM, _raise_terminated)  # re-arm (the handler ignores a second one)
    signal.signal(signal.SIGTERM, prev)


def _hook_track(monkeypatch, desc: str | None = None, at: int | None = None, exc: type | None = None):
    """Wrap mates.track: record where each loop starts; send SIGTERM (or raise ``exc``) before unit ``at`` of the
    loop whose description starts with ``desc``. The unit then runs to its end (SIGTERM only asks for a stop)."""
    starts: dict[str, int] = {}
    real = REAL_TRACK  # not mates.track: an earlier hook may still be in place

    def track(it, **kw):
        d = kw.get("desc", "")
        starts[d.split(" (")[0]] = it.start  # the probe and influence loops are ranges
        for i, x in enumerate(real(it, **kw)):
            if desc is not None and d.startswith(desc) and i == at:
                if exc is not None:
                    raise exc("killed")
                os.kill(os.getpid(), signal.SIGTERM)
            yield x

    monkeypatch.setattr(mates_mod, "track", track)
    return starts


def _round(tmp_path, tiny_pool, tiny_tokenizer):
    vset = _make_valset(tmp_path / "val.jsonl", tiny_tokenizer, SAMPLE_LAMBADA[:5], seq_len=32)
    model, opt = trained_target(tiny_pool, weight_decay=0.1)
    cfg = MatesConfig(n_probe=12, probe_chunk=4, influence_steps=6, influence_eval_every=2, influence_batch_size=4,
                      influence_lr=1e-3, fraction=0.25, val_items=4)
    sd = copy.deepcopy(opt.state_dict())
    return lambda out: run_mates_round(cfg, model, copy.deepcopy(sd), tiny_pool, tiny_pool.ids(0), tiny_pool.ids(1),
                                       vset, out, "cpu")


def _files(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", "config.yaml")}


def test_sigterm_in_the_probe_and_in_the_influence_model_resume_bit_identical(tmp_path, tiny_pool, tiny_tokenizer,
                                                                              monkeypatch, cli_sigterm):
    run = _round(tmp_path, tiny_pool, tiny_tokenizer)
    ref = run(tmp_path / "ref")  # uninterrupted
    out = tmp_path / "influence"

    # 1. SIGTERM while chunk 2 of 3 is probed: the chunk finishes, probes 0..7 are saved, the stage stops
    _hook_track(monkeypatch, "mates probes", at=1)
    with pytest.raises(Terminated):
        run(out)
    st = torch.load(out / PROBE_PARTIAL, weights_only=False)
    assert st["done"] == 8 and st["n"] == 12 and np.isnan(st["values"][8:]).all()
    assert not (out / "oracle.parquet").exists() and not is_complete(out)

    # 2. the requeue resumes at probe 8; SIGTERM again at influence step 3 of 6
    cli_sigterm()
    starts = _hook_track(monkeypatch, "influence model", at=2)
    with pytest.raises(Terminated):
        run(out)
    assert starts["mates probes"] == 8 and starts["influence model"] == 1
    assert (out / "oracle.parquet").is_file() and not (out / PROBE_PARTIAL).exists()
    assert torch.load(out / INFLUENCE_PARTIAL, weights_only=False)["step"] == 3
    assert not (out / "influence_model").exists() and not is_complete(out)

    # 3. the next requeue resumes the influence model at step 4 and finishes the round
    cli_sigterm()
    starts = _hook_track(monkeypatch)
    sel = run(out)
    assert starts == {"influence model": 4}  # the probe is not run again
    assert not (out / INFLUENCE_PARTIAL).exists() and is_complete(out, kind="influence")
    # bit-identical to the uninterrupted round: probe values, influence model, its log, predictions, selection
    assert np.array_equal(sel, ref)
    a, b = _files(out), _files(tmp_path / "ref")
    assert a.keys() == b.keys() and "influence_model/head.safetensors" in a
    assert [k for k in a if a[k] != b[k]] == []
    assert read_manifest(out)["extra"]["best_step"] == read_manifest(tmp_path / "ref")["extra"]["best_step"]


@pytest.mark.parametrize("method", ["loop", "batched"])
def test_probe_oracle_resumes_at_the_probe_reached(tmp_path, tiny_pool, tiny_tokenizer, monkeypatch, cli_sigterm,
                                                   method):
    vset = _make_valset(tmp_path / "val.jsonl", tiny_tokenizer, SAMPLE_LAMBADA[:5], seq_len=32)
    model, opt = trained_target(tiny_pool, weight_decay=0.1)
    probes = tiny_pool.batch(tiny_pool.ids(1)[:5])
    kw = dict(method=method, chunk_size=2, lr=1e-3)
    want = probe_oracle(model, opt, probes, vset, **kw)
    before = [p.detach().clone() for p in model.parameters()]
    part = tmp_path / "p.pt"
    _hook_track(monkeypatch, "mates probes", at=1)  # the second probe (loop) or chunk (batched)
    with pytest.raises(Terminated):
        probe_oracle(model, opt, probes, vset, partial=part, **kw)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # the stop leaves the model as it was
    cli_sigterm()
    done = torch.load(part, weights_only=False)["done"]
    assert done == (2 if method == "loop" else 4)
    starts = _hook_track(monkeypatch)
    got = probe_oracle(model, opt, probes, vset, partial=part, **kw)
    assert starts["mates probes"] == done
    np.testing.assert_array_equal(got, want)


def test_a_partial_file_from_other_inputs_or_damaged_is_set_aside(tmp_path, tiny_pool, tiny_tokenizer, monkeypatch,
                                                                  caplog):
    """Partial probes of other sequences, or of another model, are never taken as this probe's values; a damaged
    file is lost work, not an error."""
    vset = _make_valset(tmp_path / "val.jsonl", tiny_tokenizer, SAMPLE_LAMBADA[:5], seq_len=32)
    model, opt = trained_target(tiny_pool, weight_decay=0.1)
    probes = tiny_pool.batch(tiny_pool.ids(1)[:4])
    part = tmp_path / "p.pt"
    monkeypatch.setenv("LMSELECT_CHECKPOINT_EVERY_S", "0")
    want = probe_oracle(model, opt, probes, vset, chunk_size=2, partial=part)
    assert torch.load(part, weights_only=False)["done"] == 4  # a finished partial, as a kill before the caller's write leaves it
    other = tiny_pool.batch(tiny_pool.ids(1)[4:8])
    starts = _hook_track(monkeypatch)
    with caplog.at_level("WARNING", logger="lmselect"):
        probe_oracle(model, opt, other, vset, chunk_size=2, partial=tmp_path / "p.pt")
    assert starts["mates probes"] == 0 and "other inputs or settings" in caplog.text
    # another model (one more training step) with the same probes: also set aside
    model2, opt2 = trained_target(tiny_pool, weight_decay=0.1, steps=3)
    probe_oracle(model, opt, probes, vset, chunk_size=2, partial=part)
    starts.clear()
    probe_oracle(model2, _as_optimizer(model2, opt2.state_dict()), probes, vset, chunk_size=2, partial=part)
    assert starts["mates probes"] == 0
    part.write_bytes(b"not a checkpoint")
    starts.clear()
    with caplog.at_level("WARNING", logger="lmselect"):
        np.testing.assert_array_equal(probe_oracle(model, opt, probes, vset, chunk_size=2, partial=part), want)
    assert starts["mates probes"] == 0 and "unreadable" in caplog.text


def test_the_interval_saves_and_partial_state_never_looks_finished(tmp_path, tiny_pool, tiny_tokenizer, monkeypatch):
    """$LMSELECT_CHECKPOINT_EVERY_S=0: the probes are saved after every chunk, so a hard kill (here an exception in
    chunk 3) loses only that chunk. A round stopped with every probe saved but before oracle.parquet is written is
    incomplete (no oracle file, no selection, no manifest); the rerun finishes it from the saved probes, and the
    round equals an uninterrupted one."""
    run = _round(tmp_path, tiny_pool, tiny_tokenizer)
    out = tmp_path / "influence"
    monkeypatch.setenv("LMSELECT_CHECKPOINT_EVERY_S", "0")
    _hook_track(monkeypatch, "mates probes", at=2, exc=RuntimeError)
    with pytest.raises(RuntimeError):
        run(out)
    assert torch.load(out / PROBE_PARTIAL, weights_only=False)["done"] == 8 and not (out / "oracle.parquet").exists()

    real_write = mates_mod._write_parquet

    def crash_on_oracle(path, cols):
        if path.name == "oracle.parquet":
            raise OSError("disk gone")
        real_write(path, cols)

    monkeypatch.setattr(mates_mod, "_write_parquet", crash_on_oracle)
    starts = _hook_track(monkeypatch)
    with pytest.raises(OSError):
        run(out)
    assert starts["mates probes"] == 8
    assert torch.load(out / PROBE_PARTIAL, weights_only=False)["done"] == 12
    assert not is_complete(out) and not (out / "oracle.parquet").exists() and not (out / "selected.npy").exists()

    monkeypatch.setattr(mates_mod, "_write_parquet", real_write)
    starts = _hook_track(monkeypatch)
    sel = run(out)
    assert starts == {"mates probes": 12, "influence model": 1}  # nothing probed again
    assert is_complete(out, kind="influence") and not (out / PROBE_PARTIAL).exists()
    assert not (out / INFLUENCE_PARTIAL).exists()
    monkeypatch.delenv("LMSELECT_CHECKPOINT_EVERY_S")
    assert np.array_equal(sel, run(tmp_path / "ref"))
    assert (out / "oracle.parquet").read_bytes() == (tmp_path / "ref" / "oracle.parquet").read_bytes()


@pytest.mark.parametrize("method", ["mates", "reference"])
def test_lmselect_run_requeued_after_sigterm_in_the_selection_ends_as_an_uninterrupted_run(
        tiny_recipe, all_methods_run, tmp_path, monkeypatch, capsys, method):
    """The verb as Slurm runs it: SIGTERM mid-probe (mates) or mid-reference-training (reference) stops
    `lmselect run` with its one line and exit 143; the same command (the requeue) resumes there and the run selects
    exactly what an uninterrupted run (the suite's all-methods run, the same seed) selects."""
    from lmselect.cli import main
    from lmselect.select import rho1 as rho1_mod

    cmd = ["run", str(tiny_recipe), f"--methods={method}", "--rounds=1", "--no-report"]
    fired: list[int] = []
    if method == "mates":
        _hook_track(monkeypatch, "mates probes", at=0)  # the first of two chunks
    else:
        real = rho1_mod.token_ce

        def ce(*a, **k):  # the loss of reference step 1 of 2
            if not fired:
                fired.append(1)
                os.kill(os.getpid(), signal.SIGTERM)
            return real(*a, **k)

        monkeypatch.setattr(rho1_mod, "token_ce", ce)
    out = tmp_path / "run"
    capsys.readouterr()
    assert main([*cmd, "--out", str(out)]) == 143
    err = capsys.readouterr().err
    assert "lmselect run: stopped by SIGTERM" in err, err[-2000:]
    sub = "mates/seed0/round1/influence" if method == "mates" else "reference/seed0/reference"
    partial = out / sub / (PROBE_PARTIAL if method == "mates" else "reference_state.pt")
    assert partial.is_file() and not is_complete(out / sub)
    starts = _hook_track(monkeypatch)
    assert main([*cmd, "--out", str(out)]) == 0  # the requeue
    if method == "mates":
        assert starts["mates probes"] == 3  # resumed after the first chunk of probe_chunk=3
    assert not partial.exists() and is_complete(out / sub)
    a, b = (np.load(d / method / "seed0" / "round1" / "selection" / "selected.npy") for d in (out, all_methods_run))
    assert np.array_equal(a, b)
    if method == "mates":  # the probe values and the influence model's predictions, bit for bit
        for f in ("oracle.parquet", "predictions.parquet"):
            rel = f"mates/seed0/round1/influence/{f}"
            assert (out / rel).read_bytes() == (all_methods_run / rel).read_bytes(), rel
    else:  # the resumed reference's scores
        from lmselect.score import read_scores

        x, y = (read_scores(d / "reference" / "seed0" / "round1" / "scores") for d in (out, all_methods_run))
        assert np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1])
