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


@pytest.fixture(scope="session")
def tiny_recipe(tmp_path_factory):
    """A tiny 2-round recipe (debug presets) on a tiny pool, with disjoint selection and report sets."""
    from lmselect.testing import make_tiny_recipe

    return make_tiny_recipe(tmp_path_factory.mktemp("recipe"))


@pytest.fixture(scope="session")
def all_methods_run(tiny_recipe, tmp_path_factory):
    """One `lmselect compare` run of every registered method (1 seed) on the tiny recipe: the reference that the
    pipeline, contract and distributed tests compare against."""
    from lmselect.cli import main
    from lmselect.select.base import method_names

    out = tmp_path_factory.mktemp("all") / "cmp"
    rc = main(["compare", str(tiny_recipe), "--methods", ",".join(method_names()), "--seeds", "1", "--out", str(out),
               "--no-report"])
    assert rc == 0
    return out
