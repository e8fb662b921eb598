"""Fixtures shared by the scoring tests."""

from __future__ import annotations

import pytest

from lmselect.data.tokenizer import tokenizer_fingerprint
from lmselect.models.presets import build_model
from lmselect.models.scorer import SequenceScorer


@pytest.fixture()
def scorer_dir(tmp_path, tiny_tokenizer):
    """An untrained ``debug``-preset scorer (identity activation: the score is the head's raw output), saved with the
    tiny tokenizer's fingerprint. A test file may override it (test_score.py saves its own ``scorer``)."""
    lm = build_model("debug", len(tiny_tokenizer), seed=0)
    d = tmp_path / "scorer"
    SequenceScorer.from_causal_lm(lm, activation="identity", seed=0).save_pretrained(
        d, extra={"tokenizer_fingerprint": tokenizer_fingerprint(tiny_tokenizer)})
    return d
