"""DSIR: importance weights against a brute-force oracle (dense counts, the paper's formula), the hashing against
the released code's definition, sampling and bad input."""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter

import numpy as np
import pytest

from lmselect.errors import ConfigError, LmselectError
from lmselect.select.dsir import DsirConfig, NgramHasher, bucket_of, dsir_log_weights

TARGET = ["The cat sat on the mat.", "A cat and a dog sat by the door", "the dog sat, the cat slept"]
RAW = ["the cat sat on the mat today", "BUY cheap pills!!! buy now", "", "the stock market fell; the dog barked",
       "win win win a prize prize"]


def oracle(target: list[str], raw: list[str], buckets: int, orders: list[int], normalize: bool) -> np.ndarray:
    """Dense brute force: word split by the wordpunct regex, every n-gram string hashed with SHA-256 mod B."""
    def grams(t: str) -> list[str]:
        w = re.findall(r"\w+|[^\w\s]+", t.lower())
        return [" ".join(w[i : i + n]) for n in orders for i in range(len(w) - n + 1)]

    def dense(texts: list[str]) -> np.ndarray:
        z = np.zeros((len(texts), buckets))
        for i, t in enumerate(texts):
            for g, c in Counter(grams(t)).items():
                z[i, int(hashlib.sha256(g.encode()).hexdigest(), 16) % buckets] += c
        return z

    zt, zr = dense(target), dense(raw)
    pt, pr = zt.sum(0) / zt.sum(), zr.sum(0) / zr.sum()
    out = []
    for i in range(len(raw)):
        s = sum(zr[i, b] * (math.log(pt[b] + 1e-8) - math.log(pr[b] + 1e-8)) for b in range(buckets))
        n = zr[i].sum()
        out.append(s / n if normalize and n else (0.0 if normalize else s))
    return np.array(out)


@pytest.mark.parametrize("buckets,orders,normalize", [(50, [1, 2], False), (50, [1, 2], True), (7, [1], False),
                                                      (10_000, [1, 2, 3], True)])
def test_log_weights_equal_the_brute_force_oracle(buckets, orders, normalize):
    got = dsir_log_weights(TARGET, RAW, DsirConfig(buckets=buckets, orders=orders, normalize=normalize))
    np.testing.assert_allclose(got, oracle(TARGET, RAW, buckets, orders, normalize), rtol=1e-10, atol=1e-9)
    assert got[2] == 0.0  # no words: no evidence
    assert buckets < 50 or got[0] > got[1]  # target-like text outweighs spam (7 buckets: collisions blur it)


def test_hashing_is_the_released_codes():
    # dsir/hashed_ngram_dsir.py hash_buckets: int(sha256(text).hexdigest(), 16) % num_buckets
    assert bucket_of("the cat", 10_000) == int(hashlib.sha256(b"the cat").hexdigest(), 16) % 10_000
    h = NgramHasher(10_000, [1, 2])
    assert list(h("The cat, sat")) == [bucket_of(g, 10_000) for g in ("the", "cat", ",", "sat", "the cat", "cat ,",
                                                                        ", sat")]


def _ctx(tmp_path, tiny_pool, tiny_tokenizer, texts=None):
    from lmselect.testing import make_valset

    vs = make_valset(tmp_path / "sel.jsonl", tiny_tokenizer, texts=texts)

    class Run:
        selection_set = vs

        def main_only(self, fn):
            fn()

        def sync(self):
            pass

    class Ctx:
        pool, selection_set, candidates, fraction, run = tiny_pool, vs, tiny_pool.ids(1), 0.25, Run()

        def derived_seed(self, stream):
            return 1234 + stream

        def stage_dir(self, stage):
            return tmp_path / "round" / stage

    return Ctx()


@pytest.mark.parametrize("sampling", ["gumbel", "topk"])
def test_selection_is_deterministic_and_topk_keeps_the_largest(sampling, tmp_path, tiny_pool, tiny_tokenizer):
    from lmselect.select.base import get_method

    ctx = _ctx(tmp_path, tiny_pool, tiny_tokenizer)
    m = get_method("dsir", DsirConfig(sampling=sampling))
    a = m.select(ctx)  # computes and writes the scores stage
    b = m.select(ctx)  # reads it back (a rerun after an interruption)
    assert np.array_equal(a.ids, b.ids) and len(a.ids) == round(0.25 * len(ctx.candidates))
    if sampling == "topk":
        want = ctx.candidates[np.lexsort((ctx.candidates, -a.scores))[: len(a.ids)]]
        assert np.array_equal(np.sort(want), a.ids)


def test_gumbel_sampling_follows_the_importance_weights():
    """P(x chosen first) ∝ w(x): with k = 1 the empirical frequencies match the weights."""
    from lmselect.select.topk import gumbel_topk

    logw = np.log(np.array([0.1, 0.2, 0.3, 0.4]))
    ids = np.arange(4)
    hits = np.bincount([gumbel_topk(ids, logw, 0.25, 1.0, seed=s)[0] for s in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(hits, [0.1, 0.2, 0.3, 0.4], atol=0.03)


def test_bad_input_is_one_line(tmp_path, tiny_pool, tiny_tokenizer):
    from lmselect.select.base import get_method

    for key, cfg in [("dsir.buckets", DsirConfig(buckets=0)), ("dsir.orders", DsirConfig(orders=[])),
                     ("dsir.orders", DsirConfig(orders=[0, 2])), ("dsir.sampling", DsirConfig(sampling="top"))]:
        with pytest.raises(ConfigError, match=key):
            get_method("dsir", cfg).check_config()
    ctx = _ctx(tmp_path, tiny_pool, tiny_tokenizer, texts=["a b", "!!! ???"])
    with pytest.raises(LmselectError, match=r"sel\.jsonl: the selection set has 2 item\(s\).*dsir.min_target_items"):
        get_method("dsir").select(ctx)
    with pytest.raises(LmselectError, match="candidates hold no words"):
        dsir_log_weights(TARGET, ["", "  "], DsirConfig())


def test_the_saved_text_scorer_scores_text_as_the_round_did(tmp_path, tiny_pool, tiny_tokenizer):
    """``scores/text_scorer`` (what ``score --jsonl`` loads through the registry) gives the round's log w for the
    round's own candidate texts, and the sidecar holds those values."""
    import json

    from lmselect.score import read_scores
    from lmselect.select.base import get_method, is_text_scorer, load_text_scorer
    from lmselect.select.texts import pool_texts, selection_texts

    ctx = _ctx(tmp_path, tiny_pool, tiny_tokenizer)
    cfg = DsirConfig(buckets=64)
    sel = get_method("dsir", cfg).select(ctx)
    sdir = ctx.stage_dir("scores")
    assert is_text_scorer(sdir) and json.loads((sdir / "text_scorer" / "text_scorer.json").read_text())["method"] == "dsir"
    texts = pool_texts(tiny_pool, ctx.candidates)
    got = load_text_scorer(sdir).score_texts(texts)
    want = dsir_log_weights(selection_texts(ctx, "dsir", 1), texts, cfg)
    assert np.array_equal(got, want)
    ids, stored = read_scores(sdir)
    assert np.array_equal(ids, ctx.candidates) and np.array_equal(stored, want.astype(np.float32))
    assert np.array_equal(sel.scores, stored.astype(np.float64))
    assert load_text_scorer(sdir / "text_scorer").score_texts(["", "!!"])[0] == 0.0  # no n-gram: no evidence
    (sdir / "text_scorer" / "log_ratio.npy").unlink()
    with pytest.raises(LmselectError, match="incomplete DSIR text scorer"):
        load_text_scorer(sdir)
    with pytest.raises(ConfigError, match="no text_scorer.json"):
        load_text_scorer(tmp_path)
