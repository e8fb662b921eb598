"""The known-answer control arms select what they say: the positive control every candidate sequence holding part of
a planted target-like document, then random; the negative control the planted junk, then the most repetitive
sequences; and the registry keeps them out of a comparison's default methods."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from lmselect.data.planted import JUNK, TARGET, sequences_with_sources
from lmselect.select.base import comparable_method_names, get_method, known_answer_controls, method_names
from lmselect.select.control_negative import distinct_token_share
from lmselect.select.topk import n_select


@pytest.fixture()
def planted_pool(tmp_path, tiny_tokenizer):
    """40 sequences of 16 tokens in shard 1: ids 3, 4 hold a planted target-like document packed across both, id 9
    ends with one (a span of 4 tokens in a corpus-majority sequence), 20 and 21 hold shuffled / random-word junk;
    ids 30..33 are repetitive (2, 3, 4 and 5 distinct tokens)."""
    from lmselect.data.pool import TokenPool, write_pool

    rng = np.random.default_rng(0)
    n, L = 40, 16
    tokens = np.stack([rng.permutation(200)[:L] + 10 for _ in range(n)])  # 16 distinct tokens each
    for i, d in zip(range(30, 34), (2, 3, 4, 5)):
        tokens[i] = (np.arange(L) % d) + 10
    source = ["clean"] * n
    spans = {"seq_id": [], "doc_id": [], "source": [], "start": [], "length": []}

    def span(seq, doc, src, start, length):
        for k, v in zip(spans, (seq, doc, src, start, length)):
            spans[k].append(v)

    for i in range(n):
        if i in (3, 4):
            span(i, "t0", TARGET, 0, L)
            source[i] = TARGET
        elif i == 9:
            span(i, "c9", "clean", 0, 12)
            span(i, "t1", TARGET, 12, 4)
        elif i in (20, 21):
            span(i, f"j{i}", JUNK[0] if i == 20 else JUNK[2], 0, L)
            source[i] = JUNK[0] if i == 20 else JUNK[2]
        else:
            span(i, f"c{i}", "clean", 0, L)
    spans = {k: np.asarray(v) if k in ("seq_id", "start", "length") else v for k, v in spans.items()}
    p = write_pool(tmp_path / "pool", tokens, np.ones(n, np.int32), source, tiny_tokenizer, doc_spans=spans, seed=0)
    return TokenPool(p)


def _ctx(pool, seed=0, fraction=0.25):
    cand = pool.ids(1)
    return SimpleNamespace(candidates=cand, fraction=fraction, pool=pool, round=1,
                           derived_seed=lambda stream: 1000 * seed + stream)


def test_sequences_with_sources_reads_every_span(planted_pool):
    assert sequences_with_sources(planted_pool, planted_pool.ids(1), (TARGET,)).tolist() == [3, 4, 9]
    assert sequences_with_sources(planted_pool, np.array([4, 20, 21, 22]), JUNK).tolist() == [20, 21]


def test_positive_control_selects_the_planted_target_like_documents_then_random(planted_pool):
    m = get_method("control_positive")
    k = n_select(40, 0.25)
    sels = []
    for seed in (0, 1):
        ctx = _ctx(planted_pool, seed)
        s = m.select(ctx)
        ids = np.asarray(s.ids)
        # the fill is random's own selection at this seed: the arm differs from random only by the planted swaps
        rand = set(get_method("random").select(ctx).ids.tolist())
        assert set(ids.tolist()) - {3, 4, 9} <= rand and len(rand - set(ids.tolist())) == len({3, 4, 9} - rand)
        assert len(ids) == k == 10 and len(set(ids.tolist())) == k
        assert {3, 4, 9} <= set(ids.tolist())  # every planted target-like sequence, the packed tail included
        assert s.extra["planted_selected"] == 3 and s.extra["planted_candidates"] == 3
        assert s.scores[[3, 4, 9]].tolist() == [1.0, 1.0, 1.0] and s.scores.sum() == 3.0
        sels.append(set(ids.tolist()) - {3, 4, 9})
    assert sels[0] != sels[1]  # the fill is random, seeded by the method seed
    assert np.array_equal(m.select(_ctx(planted_pool, 0)).ids, m.select(_ctx(planted_pool, 0)).ids)


def test_positive_control_subsamples_when_the_planted_documents_exceed_the_budget(planted_pool):
    ids = get_method("control_positive").select(_ctx(planted_pool, fraction=0.05)).ids  # k = 2 of the 3 planted
    assert len(ids) == 2 and set(ids.tolist()) <= {3, 4, 9}


def test_negative_control_selects_the_junk_then_the_most_repetitive(planted_pool):
    s = get_method("control_negative").select(_ctx(planted_pool, fraction=0.15))  # k = 6
    assert np.asarray(s.ids).tolist() == [20, 21, 30, 31, 32, 33]
    assert s.extra["planted_selected"] == 2
    assert distinct_token_share(planted_pool.tokens[[30, 33, 0]]).tolist() == [2 / 16, 5 / 16, 1.0]


def test_controls_are_registered_and_left_out_of_default_comparisons():
    assert known_answer_controls() == {"control_negative": "negative", "control_positive": "positive"}
    assert set(method_names()) - set(comparable_method_names()) == {"control_negative", "control_positive"}


def test_positive_control_without_planted_documents_is_random(tiny_pool):
    ctx = _ctx(tiny_pool, seed=3, fraction=0.5)
    assert np.array_equal(get_method("control_positive").select(ctx).ids, get_method("random").select(ctx).ids)
