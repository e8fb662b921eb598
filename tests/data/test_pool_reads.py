"""TokenPool.rows / span read tokens.bin with file reads (export and scoring use them so that scattered rows do not
pull the whole mapped file into the resident set); the oracle is the memmap itself."""

from __future__ import annotations

import numpy as np
import pytest

from lmselect.artifacts import ArtifactError


@pytest.mark.parametrize("ids", [[0], [3, 1, 2], [0, 1, 2, 3], [7, 7, 2], [5, 0, 6, 1, 2, 3]])
def test_rows_are_the_memmap_rows(tiny_pool, ids):
    ids = np.asarray(ids) % len(tiny_pool)
    got = tiny_pool.rows(ids)
    assert got.dtype == tiny_pool.dtype and got.shape == (len(ids), tiny_pool.seq_len)
    assert np.array_equal(got, np.asarray(tiny_pool.tokens[ids]))


def test_rows_of_everything_and_of_nothing(tiny_pool):
    every = np.arange(len(tiny_pool))
    assert np.array_equal(tiny_pool.rows(every), np.asarray(tiny_pool.tokens))  # one read: a single run
    assert tiny_pool.rows(np.zeros(0, np.int64)).shape == (0, tiny_pool.seq_len)
    assert np.array_equal(tiny_pool.batch(every[::2]).numpy(), np.asarray(tiny_pool.tokens[::2], dtype=np.int64))


def test_span_is_the_memmap_slice(tiny_pool):
    L = tiny_pool.seq_len
    for seq, start, length in [(0, 0, L), (1, 3, 5), (len(tiny_pool) - 1, L - 2, 2), (2, 4, 0)]:
        assert np.array_equal(tiny_pool.span(seq, start, length), np.asarray(tiny_pool.tokens[seq, start:start + length]))


def test_out_of_range_and_truncated_file_are_one_line(tiny_pool):
    with pytest.raises(ArtifactError, match="sequence ids out of range"):
        tiny_pool.rows([len(tiny_pool)])
    tb = tiny_pool.path / "tokens.bin"
    size = tb.stat().st_size
    with open(tb, "r+b") as f:  # cut after the pool was opened (the size is checked when it opens)
        f.truncate(size - 3)
    with pytest.raises(ArtifactError, match=r"tokens.bin: ends early .* the file is truncated"):
        tiny_pool.rows([len(tiny_pool) - 1])
