"""bench/gpu_suite.py in its CPU mode (--device cpu --tiny): every section runs and its JSON record holds the
figures the GPU run will report; the time budget skips items and says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "bench" / "gpu_suite.py"


def _run(tmp_path: Path, *args: str, timeout: int = 300) -> tuple[dict, str]:
    out = tmp_path / "suite.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(SUITE), "--device", "cpu", "--tiny", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_tiny_mode_runs_every_section(tmp_path):
    res, stdout = _run(tmp_path, "--budget", "400", "--traceback")
    problems = {f"{sec}/{k}": v.get("error") or v.get("skipped") for sec in ("env", "train", "score", "bliss", "mates",
                                                                              "projection")
                for k, v in res[sec].items() if isinstance(v, dict) and ("error" in v or "skipped" in v)}
    assert not problems, problems
    tr = res["train"]
    assert {"debug", "debug+compile", "debug+foreach_adamw", "debug+fp32", "debug+sdpa_math", "pythia-14m"} <= set(tr)
    assert all(r["tokens_per_s"] > 0 and r["mfu"] is None for r in tr.values())  # no peak on a CPU: no MFU
    assert all(r["finite"] for r in res["score"].values())
    b = res["bliss"]
    assert b["paper_batched"]["s_per_outer_step"] > 0 and b["speedup_batched"] > 0
    assert abs(sum(b["paper_batched"]["phase_share"].values()) - 1) < 0.1  # the phases are the whole step
    # fp32 on CPU: the two implementations agree to rounding
    assert b["agreement"]["dtype"] == "float32" and b["agreement"]["hypergrad_rel_diff"] < 1e-4
    assert b["agreement"]["c_spearman"] > 0.99 and b["default_profile"]["s_per_outer_step"] > 0
    assert res["mates"]["batched"]["finite"] and res["mates"]["loop"]["probes_per_s"] > 0
    pj = res["projection"]["paper_1b_selection"]
    # each figure is rounded to 1e-3 h on its own, so the parts' sum may differ from the total in the last digit
    assert pj["total_hours"] > 0 and abs(pj["total_hours"] - (pj["bilevel_hours"] + pj["scoring_hours"])) <= 1.5e-3
    assert pj["authors_hours"] == 11.82
    assert "projection" in stdout and "s/step" in stdout and "tok/s" in stdout  # the printed table


def test_budget_skips_and_says_so(tmp_path):
    res, stdout = _run(tmp_path, "--budget", "1", "--sections", "env,train,projection", timeout=120)
    skipped = [k for k, v in res["train"].items() if "skipped" in v]
    assert skipped and all("time budget" in res["train"][k]["skipped"] for k in skipped)
    assert "SKIPPED" in stdout
    # the projection needs measurements it does not have: recorded as skipped or as an error, never a crash
    pj = res["projection"]["paper_1b_selection"]
    assert "skipped" in pj or "error" in pj
