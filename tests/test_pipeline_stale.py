"""A stage is reused only when it is the same stage: a rerun with a changed key stops before any compute, naming the
stage and the key, or (``--recompute``) redoes that stage and everything downstream of it, and nothing else."""

from __future__ import annotations

import numpy as np
import pytest

from lmselect.errors import StaleStageError


def _run(tiny_recipe, out, *overrides, recompute=False):
    from lmselect import pipeline
    from lmselect.recipe import load_recipe

    return pipeline.run_recipe(load_recipe(tiny_recipe, ["--methods=random", *overrides]), out, report=False,
                               recompute=recompute)


def test_changed_key_is_refused_then_recomputed(tiny_recipe, tmp_path, monkeypatch, capsys):
    from lmselect import pipeline

    out = tmp_path / "run"
    _run(tiny_recipe, out)
    sel1 = np.load(out / "random/seed0/round1/selection/selected.npy")
    warm = (out / "warmup/target/manifest.json").stat().st_mtime_ns
    assert len(sel1) == 3

    # refused before any compute: no stage runs at all
    def no_compute(*a, **kw):
        raise AssertionError("a stage ran although the run should have stopped first")

    monkeypatch.setattr(pipeline.Runner, "stage_warmup", no_compute)
    with pytest.raises(StaleStageError) as e:
        _run(tiny_recipe, out, "--select_fraction=0.5")
    msg = str(e.value)
    assert "random/seed0/round1/selection" in msg and "select_fraction: 0.25 -> 0.5" in msg and "--recompute" in msg
    assert "\n" not in msg
    monkeypatch.undo()
    # the CLI says it in one line and exits 2
    from lmselect.cli import main

    assert main(["run", str(tiny_recipe), "--methods=random", "--select_fraction=0.5", "--out", str(out),
                 "--no-report"]) == 2

    # inspect marks the stages stale against what the recipe would now make
    from lmselect.recipe import load_recipe
    from lmselect.stages import find_stale

    stale = dict(find_stale(out, load_recipe(tiny_recipe, ["--methods=random", "--select_fraction=0.5"])))
    assert "random/seed0/round1/selection" in stale and "warmup/target" not in stale
    capsys.readouterr()
    assert main(["inspect", str(out), "--recipe", str(tiny_recipe), "--methods=random", "--select_fraction=0.5"]) == 0
    text = capsys.readouterr().out
    assert "STALE against the given recipe" in text and "random/seed0/round1/selection: select_fraction" in text
    assert main(["inspect", str(out)]) == 0  # against its own config.yaml: consistent
    assert "every stage matches the run's config.yaml" in capsys.readouterr().out

    # --recompute redoes the selection (and what depends on it), not the warm-up
    _run(tiny_recipe, out, "--select_fraction=0.5", recompute=True)
    sel2 = np.load(out / "random/seed0/round1/selection/selected.npy")
    assert len(sel2) == 6
    assert (out / "warmup/target/manifest.json").stat().st_mtime_ns == warm
    # and now the run is consistent: rerunning reuses everything
    assert not find_stale(out, load_recipe(tiny_recipe, ["--methods=random", "--select_fraction=0.5"]))


def test_changed_eval_key_redoes_only_the_evaluations(tiny_recipe, tmp_path):
    out = tmp_path / "run"
    _run(tiny_recipe, out)
    t_target = (out / "random/seed0/round2/target/manifest.json").stat().st_mtime_ns
    with pytest.raises(StaleStageError, match="eval"):
        _run(tiny_recipe, out, "--validation.max_items=4")
    _run(tiny_recipe, out, "--validation.max_items=4", recompute=True)
    assert (out / "random/seed0/round2/target/manifest.json").stat().st_mtime_ns == t_target
    from lmselect.artifacts import is_complete

    assert is_complete(out / "random/seed0/round2", kind="round") and is_complete(out, kind="run")


def test_second_run_on_one_directory_is_refused(tiny_recipe, tmp_path):
    from lmselect.errors import LmselectError
    from lmselect.runlock import run_lock

    out = tmp_path / "run"
    with run_lock(out):
        with pytest.raises(LmselectError, match="in use"):
            _run(tiny_recipe, out)


def test_stage_identity_does_not_depend_on_the_install_location():
    """Bundled data resolve to absolute paths for reading, but a stage's identity records them as bundled:REL, so a
    run made with the package in one place is reused after a reinstall elsewhere."""
    from lmselect.recipe import load_recipe
    from lmselect.stages import stage_specs

    specs = stage_specs(load_recipe("demo"))
    assert specs["pool"]["pool"]["prepare"]["inputs"] == ["bundled:demo/corpus/*.jsonl.gz"]
    assert specs["bliss/seed0/round1/selection"]["validation"]["selection"] == "bundled:demo/lambada_select.jsonl"


def test_a_changed_profile_value_changes_the_stage_identity(tiny_recipe, monkeypatch):
    """BLISS's ``None`` options take their profile's values; identity hashes the resolved values, so a release that
    changes a profile makes old BLISS stages stale although the recipe text is the same."""
    from lmselect.recipe import load_recipe
    from lmselect.select import bliss
    from lmselect.stages import stage_specs

    r = load_recipe(tiny_recipe, ["--methods=random,bliss"])
    before = stage_specs(r)
    assert before["bliss/seed0/round1/bilevel"]["settings"]["hyper_batches"] == bliss.PROFILES["default"]["hyper_batches"]
    monkeypatch.setitem(bliss.PROFILES, "default", {**bliss.PROFILES["default"], "hyper_batches": 2})
    after = stage_specs(r)
    assert after["bliss/seed0/round1/bilevel"] != before["bliss/seed0/round1/bilevel"]
    assert after["random/seed0/round1/selection"] == before["random/seed0/round1/selection"]
