"""The ``reference`` method: its scores against a hand forward of both models, its selection against a brute-force
sort, and its reference model against RHO-1's (same training code, same seed stream, same settings)."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def _mean_ce(model, pool, ids) -> np.ndarray:
    """Mean next-token CE of each row, one row at a time (the plain definition)."""
    out = []
    with torch.no_grad():
        for i in ids:
            x = pool.batch(np.array([i]))
            logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].double(), dim=-1)
            out.append(float(-logp.gather(1, x[0, 1:, None]).mean()))
    return np.array(out)


def test_scores_are_the_excess_loss_and_the_selection_their_top_fraction(all_methods_run):
    from lmselect.artifacts import read_manifest
    from lmselect.data.pool import TokenPool
    from lmselect.provenance import pool_dir
    from lmselect.score import read_scores
    from lmselect.select.rho1 import load_reference
    from lmselect.select.topk import n_select
    from lmselect.train.checkpoint import load_checkpoint_model

    run = all_methods_run
    pool = TokenPool(pool_dir(run))
    general = load_checkpoint_model(run / "warmup" / "target")
    ref = load_reference(run / "reference" / "seed0" / "reference")
    assert read_manifest(run / "reference" / "seed0" / "reference")["extra"]["method"] == "reference"
    for r in (1, 2):
        rdir = run / "reference" / "seed0" / f"round{r}"
        ids, scores = read_scores(rdir / "scores")
        assert np.array_equal(ids, pool.ids(r))
        want = _mean_ce(general, pool, ids) - _mean_ce(ref, pool, ids)  # CE(warm-up target) − CE(reference)
        np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-5)
        k = n_select(len(ids), 0.25)  # the tiny recipe's select_fraction
        assert len(np.load(rdir / "selection" / "selected.npy")) == k
        top = ids[np.lexsort((ids, -scores.astype(np.float64)))[:k]]  # highest first, ties by sequence id
        assert np.array_equal(np.sort(top), np.load(rdir / "selection" / "selected.npy"))


def test_the_reference_is_rho1s_reference(all_methods_run, tiny_recipe):
    """The tiny recipe gives rho1 and reference the same training settings, so both train the same weights."""
    from lmselect.recipe import load_recipe
    from lmselect.select.rho1 import load_reference

    r = load_recipe(tiny_recipe)
    assert (r.reference.steps, r.reference.batch_size, r.reference.lr) == (r.rho1.steps, r.rho1.batch_size, r.rho1.lr)
    a = load_reference(all_methods_run / "reference" / "seed0" / "reference").state_dict()
    b = load_reference(all_methods_run / "rho1" / "seed0" / "reference").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_score_setting_names_its_key():
    from lmselect.errors import ConfigError
    from lmselect.select.base import get_method
    from lmselect.select.reference import ReferenceConfig

    with pytest.raises(ConfigError, match="reference.score"):
        get_method("reference", ReferenceConfig(score="excesss")).check_config()
