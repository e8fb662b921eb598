"""bench/bliss_released_diff.py measures what it says: the paper row is the released loop (to round-off), each
lmselect option moves the solve, and the table has a row per option."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bliss_released_diff.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bliss_released_diff", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_paper_row_is_the_released_loop_and_options_move_it(tmp_path, capsys):
    n = torch.get_num_threads()
    try:
        rc = _bench().main(["--cases", "fast_k1", "--steps", "1", "--json", str(tmp_path / "d.json")])
    finally:
        torch.set_num_threads(n)
    assert rc == 0
    res = json.loads((tmp_path / "d.json").read_text())["results"]["fast_k1"]
    paper = res["paper"][0]
    assert max(paper["z"], paper["c"], paper["hypergrad"]) <= 1e-10 and paper["hypergrad_signs"] == 1.0
    # options that change the first step's solve on a random tiny model (measured 0.2-3.3 relative in c)
    for opt in ("z_clip_mode", "z_init", "outer_batch"):
        assert res[opt][0]["c"] > 1e-2, (opt, res[opt])
    assert res["score_head_init"][0]["hypergrad"] > 1e-2 and res["all"][0]["c"] > 1e-2
    table = capsys.readouterr().out
    assert table.count("\n| ") == 10  # header row + 9 variants (paper, seven options, all seven)
    assert "`z_init: 0.0`" in table and "all seven" in table
