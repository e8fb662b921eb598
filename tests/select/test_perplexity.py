"""Perplexity filter: band selection against a brute-force sort, and the proxy-loss scores against a hand forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmselect.select.perplexity import PerplexityConfig, band_scores
from lmselect.select.topk import top_fraction


@pytest.mark.parametrize("band", ["low", "middle", "high"])
def test_band_selection_equals_brute_force(band):
    rng = np.random.default_rng(0)
    loss = rng.normal(5.0, 1.0, size=101)
    ids = np.arange(1000, 1101)
    sel = top_fraction(ids, band_scores(loss, band), 0.2)  # k = 20
    order = np.argsort(loss)  # ascending loss (no ties in continuous draws)
    if band == "low":
        want = ids[order[:20]]
    elif band == "high":
        want = ids[order[-20:]]
    else:  # the 20 closest to the median
        want = ids[np.argsort(np.abs(loss - np.median(loss)))[:20]]
    assert np.array_equal(np.sort(want), sel)


def test_unknown_band_is_a_config_error():
    from lmselect.errors import ConfigError

    with pytest.raises(ConfigError, match="perplexity.band"):
        band_scores(np.zeros(3), "mid")


def test_scores_are_the_proxy_mean_token_ce(tmp_path, tiny_tokenizer):
    """The sidecar the method reads holds −mean CE under the warm-up proxy: check against a hand forward."""
    from lmselect.data.pool import TokenPool
    from lmselect.models import build_model
    from lmselect.models.losses import token_ce
    from lmselect.score import read_scores, score_pool
    from lmselect.testing import make_pool

    pool = TokenPool(make_pool(tmp_path / "pool", tiny_tokenizer))
    model = build_model("debug", pool.vocab_size)
    model.save_pretrained(tmp_path / "proxy")
    tiny_tokenizer.save_pretrained(tmp_path / "proxy")
    ids = pool.ids(1)
    score_pool(tmp_path / "proxy", pool, ids, tmp_path / "scores", batch_size=4, lm_loss=True, progress=False)
    got_ids, neg_loss = read_scores(tmp_path / "scores")
    with torch.no_grad():
        x = pool.batch(ids)
        want = token_ce(model(input_ids=x).logits, x).mean(1).numpy()
    assert np.array_equal(got_ids, ids)
    np.testing.assert_allclose(-neg_loss, want, rtol=1e-5)
    assert PerplexityConfig().band == "low"
