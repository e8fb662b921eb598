"""The run directory's layout (``lmselect/layout.py``): one room builds and parses every path of a run."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lmselect
from lmselect.layout import RunLayout, RunPath, parse_round, parse_seed, round_name, seed_name

PLACES = [RunPath(pool=True), RunPath(warmup="target"), RunPath(warmup="proxy"), RunPath("mates"),
          RunPath("mates", 0), RunPath("rho1", 999, stage="reference"), RunPath("bliss", 3, 0),
          RunPath("bliss", 3, 12), RunPath("bliss", 3, 12, "selection"), RunPath("random_tokens", 1, 2, "eval")]


@pytest.mark.parametrize("root", ["RUN", "/abs/RUN", "."])
def test_parse_inverts_build(root):
    lay = RunLayout(root)
    for p in PLACES:
        assert lay.parse(lay.path(p)) == p, p
        assert lay.parse(lay.key(p)) == p, p  # run-relative keys too (RUN/stages.json)
    assert lay.key(RunPath("mates", 0, 1, "target")) == "mates/seed0/round1/target"
    assert lay.key(RunPath(warmup="proxy")) == "warmup/proxy"


def test_the_paths_are_those_runs_have_always_had():
    lay = RunLayout("RUN")
    assert lay.stage("bliss", 2, 1, "scores") == Path("RUN/bliss/seed2/round1/scores")
    assert lay.selected("m", 0, 3) == Path("RUN/m/seed0/round3/selection/selected.npy")
    assert lay.selection_summary("m", 0, 3) == Path("RUN/m/seed0/round3/selection/summary.json")
    assert lay.eval_results("m", 1, 2) == Path("RUN/m/seed1/round2/eval/results.json")
    assert lay.target("m", 1, 0) == Path("RUN/warmup/target") and lay.target("m", 1, 2) == lay.stage("m", 1, 2, "target")
    assert RunLayout("RUN", "/pools/p").pool == Path("/pools/p") and lay.pool == Path("RUN/pool")


def test_one_seed_rule_and_negative_seeds_have_no_directory():
    """Seeds are 0..999 (the recipe refuses the rest): ``seed-1`` is neither built nor read as a seed."""
    assert [parse_seed(seed_name(k)) for k in (0, 7, 999)] == [0, 7, 999]
    assert [parse_round(round_name(r)) for r in (0, 1, 40)] == [0, 1, 40]
    for bad in ("seed-1", "seed", "seedx", "seed1a", " seed1", "round1"):
        assert parse_seed(bad) is None, bad
    for bad in (-1, True, 1.0, "1"):
        with pytest.raises(ValueError):
            seed_name(bad)
    with pytest.raises(ValueError):
        RunLayout("RUN").round("m", -1, 1)
    with pytest.raises(ValueError):
        round_name(-2)
    lay = RunLayout("RUN")
    assert lay.parse("RUN/m/seed-1") is None and lay.parse("RUN/m/seed1/roundx/eval") is None
    assert lay.parse("RUN/m/seed1/round2/eval/results.json") is None  # a file, not a place of the layout
    assert lay.parse("elsewhere/m/seed1") is None and lay.parse("RUN/.lock") is None and lay.parse("RUN") is None


def test_on_disk_listing(tmp_path):
    lay = RunLayout(tmp_path)
    for d in ("m/seed0/round1", "m/seed0/round2", "m/seed10/round1", "m/seed-1/round1", "m/seedx/round1",
              "m/seed0/roundx", "n/seed2/reference", "warmup/target", "pool"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "m" / "seed3").write_text("a file")
    assert sorted(lay.seeds("m")) == [0, 10] and sorted(lay.rounds("m", 0)) == [1, 2] and lay.rounds("n", 2) == {}
    assert list(lay.round_paths()) == [RunPath("m", 0, 1), RunPath("m", 0, 2), RunPath("m", 10, 1)]
    assert lay.has_seeds() and not RunLayout(tmp_path / "warmup").has_seeds()


def test_no_other_room_spells_a_seed_or_round_directory():
    """Only layout.py builds ``seed<k>`` / ``round<r>`` paths or parses them (messages may name them)."""
    src = Path(lmselect.__file__).parent
    bad = []
    for p in sorted(src.rglob("*.py")):
        if p.name == "layout.py":
            continue
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and " " not in n.value and (
                    n.value.startswith(("^seed", "^round", "*/seed")) or "seed*" in n.value):
                bad.append(f"{p.relative_to(src)}:{n.lineno} {n.value!r}")
            if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div) and isinstance(n.right, ast.JoinedStr) and \
                    any(isinstance(v, ast.Constant) and v.value in ("seed", "round") for v in n.right.values):
                bad.append(f"{p.relative_to(src)}:{n.lineno} {ast.unparse(n)}")
    assert not bad, bad
