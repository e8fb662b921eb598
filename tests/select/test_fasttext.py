"""fastText target classifier: the binding trains and predicts under NumPy 2, is deterministic for a seed, and the
method's inputs (positives, negatives, texts) and bad input give one-line errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from lmselect.errors import ConfigError, LmselectError
from lmselect.select.fasttext import FastTextConfig, classify, import_fasttext

TARGET_LIKE = ["the old man walked slowly along the river bank at dawn", "she read the letter twice and smiled",
               "the children played in the garden until the sun went down", "he opened the window and heard the sea"]
JUNK = ["buy cheap pills now click here free offer", "win a prize of one million dollars subscribe now",
        "limited time only offer click the link", "cheap watches free shipping buy now"]
SMALL = FastTextConfig(dim=16, bucket=10_000, epoch=50, lr=0.2)


def test_binding_is_numpy2_and_the_maintained_wheel():
    from importlib.metadata import version

    assert int(np.__version__.split(".")[0]) >= 2, "the pinned binding must be exercised under NumPy 2"
    assert version("fasttext-numpy2-wheel") == "0.9.2"
    assert hasattr(import_fasttext(), "train_supervised")


def test_classifier_separates_target_like_text_from_junk():
    p, info = classify(TARGET_LIKE * 5, JUNK * 5, ["the man read the letter by the river", "click here to buy cheap pills",
                                                  ""], SMALL, seed=0)
    assert info["vocabulary"] > 20
    assert p[0] > 0.9 and p[1] < 0.1, p
    assert p[2] == 0.0  # no words: no evidence
    assert np.all((p >= 0) & (p <= 1))


def test_training_and_prediction_are_deterministic_for_a_seed(monkeypatch):
    """fastText 0.9.2 leaves 90 % of its input matrix uninitialised at thread = 1 (src/densematrix.cc); the child
    process maps it fresh. MALLOC_PERTURB_ (garbage in every reused heap chunk) broke every training before."""
    texts = ["the sea was calm", "free pills now", "he smiled at the garden", "click the offer"]
    a = classify(TARGET_LIKE * 3, JUNK * 3, texts, SMALL, seed=7)[0]
    b = classify(TARGET_LIKE * 3, JUNK * 3, texts, SMALL, seed=7)[0]
    monkeypatch.setenv("MALLOC_PERTURB_", "42")
    b2 = classify(TARGET_LIKE * 3, JUNK * 3, texts, SMALL, seed=7)[0]
    c = classify(TARGET_LIKE * 3, JUNK * 3, texts, SMALL, seed=8)[0]
    assert np.array_equal(a, b) and np.array_equal(a, b2)
    assert not np.array_equal(a, c)  # the seed reaches the binding (init and example order)


def test_newlines_are_joined_not_an_error():
    p, _ = classify(["line one\nline two"] * 4 + TARGET_LIKE, JUNK * 2, ["a\nb\n", "\n\n"], SMALL, seed=0)
    assert p[1] == 0.0 and 0 < p[0] < 1


def test_a_side_without_words_is_one_line():
    with pytest.raises(LmselectError, match="no negative example has any word"):
        classify(TARGET_LIKE, ["", " \n "], ["x"], SMALL, seed=0)


def test_a_binding_that_fails_to_import_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "fasttext", None)  # import fasttext -> ImportError
    with pytest.raises(LmselectError, match="pip install fasttext-numpy2-wheel==0.9.2") as e:
        import_fasttext()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("key,value", [("negatives", "warmup"), ("dim", 0), ("word_ngrams", 0), ("lr", 0.0),
                                       ("min_target_items", 0), ("negatives_per_positive", -1.0), ("bucket", 100)])
def test_bad_settings_name_their_key(key, value):
    from lmselect.select.base import get_method

    m = get_method("fasttext", FastTextConfig(**{key: value}))
    with pytest.raises(ConfigError, match=f"fasttext.{key}"):
        m.check_config()


class _Ctx:
    """The part of a RoundContext the fastText inputs read."""

    def __init__(self, pool, selection_set, warmup):
        self.pool, self.selection_set, self.candidates = pool, selection_set, pool.ids(1)
        self.run = type("R", (), {"warmup_ids": staticmethod(lambda: warmup), "selection_set": selection_set})()


def test_texts_negatives_and_too_small_selection_sets(tmp_path, tiny_pool, tiny_tokenizer):
    from lmselect.select.fasttext import holdout_ids, negative_ids
    from lmselect.select.texts import pool_texts, selection_texts, valset_texts
    from lmselect.testing import SAMPLE_LAMBADA, make_valset

    vs = make_valset(tmp_path / "sel.jsonl", tiny_tokenizer)
    got = valset_texts(vs, tiny_tokenizer)  # whole passages (LAMBADA rows keep their last seq_len tokens), no padding
    assert len(got) == len(SAMPLE_LAMBADA) and all(t.endswith(g) for g, t in zip(got, SAMPLE_LAMBADA))
    assert got[0] == SAMPLE_LAMBADA[0]
    txt = pool_texts(tiny_pool, tiny_pool.ids(1)[:2])
    assert txt[0] == tiny_tokenizer.decode(tiny_pool.tokens[tiny_pool.ids(1)[0]], skip_special_tokens=True)
    assert "<|endoftext|>" not in "".join(txt)

    half = tiny_pool.ids(0)[::2]
    ctx = _Ctx(tiny_pool, vs, half)
    hold = holdout_ids(ctx)
    assert len(hold) and not set(hold) & set(half) and not set(hold) & set(tiny_pool.ids(1))
    neg = negative_ids(ctx, FastTextConfig(), 3, seed=1)
    assert len(neg) == 3 and set(neg) <= set(hold)
    assert np.array_equal(neg, negative_ids(ctx, FastTextConfig(), 3, seed=1))
    assert set(negative_ids(ctx, FastTextConfig(negatives="candidates"), 3, seed=1)) <= set(tiny_pool.ids(1))

    with pytest.raises(ConfigError, match="fasttext.negatives"):  # the warm-up trained on all of shard 0
        negative_ids(_Ctx(tiny_pool, vs, tiny_pool.ids(0)), FastTextConfig(), 3, seed=1)
    with pytest.raises(LmselectError, match=r"sel\.jsonl: the selection set has 6 item\(s\).*fasttext.min_target_items"):
        selection_texts(ctx, "fasttext", 7)


def test_the_saved_text_scorer_reproduces_the_round_and_refuses_a_different_classifier(tmp_path, tiny_pool,
                                                                                        tiny_tokenizer):
    """A round's ``scores/text_scorer`` retrains the round's classifier (same data, settings, seed) and scores
    text exactly as the round scored its candidates; a classifier that does not reproduce the round's probe scores
    is refused."""
    import json

    from lmselect.score import read_scores
    from lmselect.select.base import get_method, load_text_scorer
    from lmselect.select.texts import pool_texts
    from lmselect.testing import make_valset

    vs = make_valset(tmp_path / "sel.jsonl", tiny_tokenizer)
    ctx = _Ctx(tiny_pool, vs, tiny_pool.ids(0)[::2])
    ctx.fraction = 0.25
    ctx.derived_seed = lambda stream: 99 + stream
    ctx.stage_dir = lambda stage: tmp_path / "round" / stage
    ctx.run.main_only = staticmethod(lambda fn: fn())
    ctx.run.sync = staticmethod(lambda: None)
    get_method("fasttext", FastTextConfig(bucket=40_000, dim=10, min_target_items=1)).select(ctx)
    sdir = ctx.stage_dir("scores")
    ids, stored = read_scores(sdir)
    texts = pool_texts(tiny_pool, ids)
    scorer = load_text_scorer(sdir)
    got = scorer.score_texts(texts[::-1])[::-1]  # order-independent: one prediction per line
    assert np.array_equal(got.astype(np.float32), stored) and scorer.description == "fastText P(target)"
    meta_file = sdir / "text_scorer" / "text_scorer.json"
    meta = json.loads(meta_file.read_text())
    assert len(meta["probe_texts"]) == 4 and meta["positives"] >= 1
    meta["probe_p"][0] = 1.0 - meta["probe_p"][0]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(LmselectError, match="does not reproduce the round's scores"):
        load_text_scorer(sdir).score_texts(texts[:2])
