"""Shared fixtures: a tiny real BPE tokenizer and a tiny packed pool built from it (no network, seconds on CPU)."""

from __future__ import annotations

import os

import pytest
import torch

from lmselect.testing import SAMPLE_TEXT, make_pool, make_tokenizer  # noqa: F401  (re-exported for tests)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture()
def tiny_pool(tmp_path, tiny_tokenizer):
    from lmselect.data.pool import TokenPool

    return TokenPool(make_pool(tmp_path / "pool", tiny_tokenizer))
