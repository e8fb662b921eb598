"""The contract every registered selection method keeps (parametrised over the registry, so a new method file is
covered without editing this test): deterministic for a seed, resumes after an interruption to the same selection,
writes exactly the stages it declares. (2 gloo processes: tests/test_pipeline_distributed.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lmselect.artifacts import is_complete
from lmselect.select.base import get_method, method_class, method_names


def _selections(run_dir: Path, method: str) -> list[np.ndarray]:
    return [np.load(run_dir / method / "seed0" / f"round{r}" / "selection" / "selected.npy") for r in (1, 2)]


@pytest.mark.parametrize("name", method_names())
def test_method_is_deterministic_resumable_and_writes_its_declared_stages(name, tiny_recipe, all_methods_run, tmp_path,
                                                                         monkeypatch):
    from lmselect import pipeline
    from lmselect.recipe import load_recipe
    from lmselect.select import selection as selection_format

    # interrupt round 2 just before its selection artifact is written: the method's own sub-stages of round 2
    # (bilevel solve, scores, influence model, ...) are on disk, the selection is not
    real = selection_format.write_selection
    calls = {"n": 0}

    def crashing(out_dir, *a, **kw):
        if Path(out_dir).parent.name == "round2" and calls["n"] == 0:
            calls["n"] += 1
            raise KeyboardInterrupt("simulated kill")
        return real(out_dir, *a, **kw)

    monkeypatch.setattr(selection_format, "write_selection", crashing)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_recipe(load_recipe(tiny_recipe, [f"--methods={name}"]), run, report=False)
    assert calls["n"] == 1 and not is_complete(run / name / "seed0" / "round2" / "selection")
    pipeline.run_recipe(load_recipe(tiny_recipe, [f"--methods={name}"]), run, report=False)  # resume

    # the same selections as the reference run of every method (other methods in the run change nothing: seeds are
    # derived from the run seed, method seed and round only)
    for r, (a, b) in enumerate(zip(_selections(all_methods_run, name), _selections(run, name)), start=1):
        assert np.array_equal(a, b), (name, r)

    cls = method_class(name)
    for r in (1, 2):
        rdir = run / name / "seed0" / f"round{r}"
        assert is_complete(rdir, kind="round")
        subdirs = {p.name for p in rdir.iterdir() if p.is_dir()}
        assert subdirs == set(cls.stages) | {"decay_branch"}, (name, r, subdirs)
        for st in cls.stages:
            assert is_complete(rdir / st), (name, r, st)
    sdirs = {p.name for p in (run / name / "seed0").iterdir() if p.is_dir()}
    assert sdirs == {"round1", "round2"} | set(cls.seed_stages), sdirs


@pytest.mark.parametrize("name", method_names())
def test_method_declarations_are_consistent(name):
    cls = method_class(name)
    m = get_method(name)
    assert cls.name == name and cls.description and cls.color
    assert (cls.config_cls is None) == (m.cfg is None)
    # a sequence-level method selects, a token-level one masks the loss; each overrides exactly its own hook
    from lmselect.select.base import SelectionMethod

    assert (cls.select is not SelectionMethod.select) == (cls.level == "sequence")
    assert (cls.token_selector is not SelectionMethod.token_selector) == (cls.level == "token")
    assert "scores" not in cls.stages or cls.level == "sequence"


def test_unknown_method_name_suggests_a_registered_one():
    from lmselect.errors import ConfigError

    with pytest.raises(ConfigError, match="did you mean 'perplexity'"):
        method_class("perplexty")
