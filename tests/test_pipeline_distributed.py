"""``lmselect run`` under torchrun (2 gloo processes): complete rounds, every rank-0 artifact written once by rank 0,
and the same selections as one process.

The run is launched as torchrun launches it (``python -m torch.distributed.run --nproc_per_node 2 ...``) on a tiny
wrapper that records every atomic write (``lmselect.artifacts.atomic_path``, which every manifest, selection and
results file goes through) with the writing rank, and then calls ``lmselect.cli.main`` exactly as
``-m lmselect.cli`` does.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from test_pipeline import _selections

from lmselect.artifacts import is_complete, read_manifest

WORLD = 2
ROUNDS = 2

# Records (rank, path) of every completed atomic write, then runs the CLI like ``python -m lmselect.cli``.
# atomic_path is patched before any other lmselect module is imported, so their ``from ... import`` see the wrapper.
WRAPPER = """
import contextlib, os, sys
import lmselect.artifacts as A

_orig = A.atomic_path
_log = os.path.join(os.environ["WRITE_LOG_DIR"], "writes-rank%s.txt" % os.environ.get("RANK", "0"))


@contextlib.contextmanager
def _logged(path):
    with _orig(path) as tmp:
        yield tmp
    with open(_log, "a") as f:
        f.write(os.path.abspath(str(path)) + "\\n")


A.atomic_path = _logged
from lmselect.cli import main

sys.exit(main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_TMP = re.compile(r"/\.([^/]+)\.tmp-\d+-[0-9a-f]{8}/")  # artifacts.atomic_path's temp dir: .NAME.tmp-PID-HEX


def _writes(log_dir: Path) -> dict[str, list[int]]:
    """final path -> ranks that wrote it, one entry per write. A file written inside a directory built atomically
    (a selection, a checkpoint step) is counted under the directory's final name."""
    out: dict[str, list[int]] = defaultdict(list)
    for r in range(WORLD):
        f = log_dir / f"writes-rank{r}.txt"
        for line in f.read_text().splitlines() if f.is_file() else []:
            out[_TMP.sub(r"/\1/", line)].append(r)
    return out


def _torchrun(recipe: Path, out: Path, log_dir: Path, extra: list[str] | None = None) -> subprocess.CompletedProcess:
    wrapper = log_dir / "run_cli.py"
    wrapper.write_text(WRAPPER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WRITE_LOG_DIR": str(log_dir), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(wrapper), "run", str(recipe), "--out", str(out), "--no-report", *(extra or [])]
    return subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)  # rc asserted


@pytest.mark.slow
def test_torchrun_two_ranks_matches_single_process(tiny_recipe, tmp_path):
    from lmselect import pipeline
    from lmselect.data.pool import TokenPool
    from lmselect.recipe import load_recipe

    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    out = tmp_path / "ddp"
    proc = _torchrun(tiny_recipe, out, log_dir)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-6000:])
    # rank 0 alone prints the results table
    assert proc.stdout.count("run directory:") == 1

    # every stage of every round is complete, and the run with it
    assert is_complete(out, kind="run")
    assert read_manifest(out)["extra"]["world_size"] == WORLD
    for m in ("random", "bliss"):
        for r in range(1, ROUNDS + 1):
            rdir = out / m / "seed0" / f"round{r}"
            for sub, kind in (("", "round"), ("selection", "selection"), ("target", "checkpoint"), ("eval", "eval")):
                assert is_complete(rdir / sub, kind=kind), (m, r, sub)
            ev = json.loads((rdir / "eval" / "results.json").read_text())
            assert np.isfinite(ev["val_loss"]["lambada"]) and np.isfinite(ev["val_loss"]["clean"])
    for r in range(1, ROUNDS + 1):
        bdir = out / "bliss" / "seed0" / f"round{r}"
        assert read_manifest(bdir / "bilevel", kind="bilevel")["extra"]["world_size"] == WORLD
        assert read_manifest(bdir / "scores", kind="scores")["counts"]["parts"] == WORLD  # one part per rank
    # no partial file left behind anywhere (atomic writes rename their temp files)
    assert not [p for p in out.rglob(".*.tmp-*")]

    # rank 0 writes every artifact not written by a distributed-aware stage, each exactly once. The only writes from
    # rank 1 are its own scores part (plus score.py's identical job.json / config.yaml and possibly the parts'
    # manifest: score.py lets the last rank to finish a part write it).
    writes = _writes(log_dir)
    assert writes, "the write log is empty: the wrapper did not run"
    for path, ranks in writes.items():
        if Path(path).parent.name != "scores":
            assert set(ranks) == {0}, (path, ranks)
        if Path(path).name == "manifest.json" and Path(path).parent.name != "scores":
            assert ranks == [0], (path, ranks)  # written once: no rank rewrites a finished artifact
    for m in ("random", "bliss"):
        for r in range(1, ROUNDS + 1):
            rdir = out / m / "seed0" / f"round{r}"
            for f in ("manifest.json", "selection/manifest.json", "selection/selected.npy", "eval/manifest.json",
                      "eval/results.json"):
                assert writes[str(rdir / f)] == [0], (m, r, f, writes[str(rdir / f)])
    assert writes[str(out / "manifest.json")] == [0] and writes[str(out / "results.json")] == [0]
    for r in range(1, ROUNDS + 1):
        for sub in ("warmup/target", "warmup/proxy", f"bliss/seed0/round{r}/target", f"random/seed0/round{r}/target"):
            ck = out / sub / "checkpoints" / f"step-{read_manifest(out / sub)['extra']['step']:07d}"
            assert writes[str(ck / "manifest.json")] == [0], sub
        assert writes[str(out / "bliss" / "seed0" / f"round{r}" / "bilevel" / "manifest.json")] == [0]
        # score.py: the last rank to finish its part writes the parts' manifest (both, if they finish together)
        assert 1 <= len(writes[str(out / "bliss" / "seed0" / f"round{r}" / "scores" / "manifest.json")]) <= WORLD
    rank1 = [p for p, ranks in writes.items() if 1 in ranks]
    assert rank1 and all(Path(p).parent.name == "scores" for p in rank1), rank1
    assert any(p.endswith(f"part-00001-of-0000{WORLD}.parquet") for p in rank1)  # rank 1 scored its own part

    # selections: the right size, from the round's own shard, sorted and unique
    pool = TokenPool(Path(read_manifest(out)["config"]["pool"]["path"]))
    for m in ("random", "bliss"):
        for r, sel in enumerate(_selections(out, m), start=1):
            assert len(sel) == 3 and np.array_equal(sel, np.unique(sel)) and set(pool.shard[sel]) == {r}, (m, r)

    # the same recipe in one process: every batch size in a recipe is global, so nothing needs rescaling
    ref_dir, _ = pipeline.run_recipe(load_recipe(tiny_recipe), tmp_path / "single", report=False)
    # random: seed-determined, identical
    for a, b in zip(_selections(ref_dir, "random"), _selections(out, "random")):
        assert np.array_equal(a, b)
    # BLISS: the distributed solve is the single-process math (tests/select/test_bliss_distributed.py), so the
    # scores agree to float32 rounding (measured: max |diff| ~1e-7)
    from lmselect.score import read_scores

    k = 3
    for r, (a, b) in enumerate(zip(_selections(ref_dir, "bliss"), _selections(out, "bliss")), start=1):
        ids_a, s_a = read_scores(ref_dir / "bliss" / "seed0" / f"round{r}" / "scores")
        ids_b, s_b = read_scores(out / "bliss" / "seed0" / f"round{r}" / "scores")
        assert np.array_equal(ids_a, ids_b)
        np.testing.assert_allclose(s_b, s_a, rtol=1e-4, atol=1e-5)
        # Outside a band of float noise around the top-k boundary score the selections must be identical; inside it
        # (the tiny pool repeats sentences, so exact ties occur) either side of a tie is a correct top-k.
        noise = float(np.abs(s_a - s_b).max())
        boundary = np.sort(s_a)[::-1][k - 1]
        band = set(ids_a[np.abs(s_a - boundary) <= 10 * noise + 1e-12].tolist())
        assert len(a) == len(b) == k
        assert set(a.tolist()) - band == set(b.tolist()) - band, (r, a, b, band)
        assert len(band) < len(ids_a) // 2, "the tie band must not make the comparison vacuous"
    # DDP training on the same selections ends at the same validation loss (float32 tolerance); a BLISS run whose
    # top-k took the other side of an exact score tie trained on different data, so it is only compared when every
    # round's selection matched.
    same_bliss = all(np.array_equal(a, b) for a, b in zip(_selections(ref_dir, "bliss"), _selections(out, "bliss")))
    for m in ("random", "bliss") if same_bliss else ("random",):
        ea = json.loads((ref_dir / m / "seed0" / f"round{ROUNDS}" / "eval" / "results.json").read_text())["val_loss"]
        eb = json.loads((out / m / "seed0" / f"round{ROUNDS}" / "eval" / "results.json").read_text())["val_loss"]
        assert eb == pytest.approx(ea, rel=1e-4), (m, ea, eb)


@pytest.mark.slow
def test_every_method_runs_under_two_gloo_processes(tiny_recipe, all_methods_run, tmp_path):
    """The method contract's distributed part: every registered method completes a round under torchrun (2 gloo
    processes), writes exactly its declared stages once, and the seed-determined selections equal one process's."""
    from lmselect.select.base import method_class, method_names

    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    out = tmp_path / "ddp-all"
    proc = _torchrun(tiny_recipe, out, log_dir, extra=[f"--methods={','.join(method_names())}", "--rounds=1"])
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-6000:])
    assert is_complete(out, kind="run")
    for m in method_names():
        rdir = out / m / "seed0" / "round1"
        assert is_complete(rdir, kind="round"), m
        assert {p.name for p in rdir.iterdir() if p.is_dir()} == set(method_class(m).stages) | {"decay_branch"}, m
        sel = np.load(rdir / "selection" / "selected.npy")
        ref = np.load(all_methods_run / m / "seed0" / "round1" / "selection" / "selected.npy")
        if m == "random" or method_class(m).level == "token":
            assert np.array_equal(sel, ref), m  # seed-determined (token level: the whole shard)
        else:
            assert len(sel) == len(ref), m
    writes = _writes(log_dir)
    for path, ranks in writes.items():
        if Path(path).name == "manifest.json" and Path(path).parent.name != "scores":
            assert ranks == [0], (path, ranks)
