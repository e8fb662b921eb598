"""Fixtures for corpus-preparation tests: a tiny two-source corpus and a saved tokenizer directory."""

from __future__ import annotations

import pytest
from corpus_helpers import clean_records, spam_records, write_jsonl


@pytest.fixture()
def corpus(tmp_path) -> list[str]:
    """Two sources: 'wiki' (.jsonl, with ids) and 'spam' (.jsonl.gz, no ids)."""
    d = tmp_path / "corpus"
    d.mkdir()
    return [str(write_jsonl(d / "wiki.jsonl", clean_records())), str(write_jsonl(d / "spam.jsonl.gz", spam_records(), "gz"))]


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory, tiny_tokenizer) -> str:
    """The shared tiny BPE saved as an HF tokenizer directory."""
    d = tmp_path_factory.mktemp("tok")
    tiny_tokenizer.save_pretrained(str(d))
    return str(d)
