"""Regression (issue 29, item 2): every scorer writes one attribute line per input line, whatever the line is.

A blank line used to get no attribute line, so every later line of the file paired with the wrong document under
dolma's rule (line i of the attribute file belongs to line i of the document file). The rule is checked here on raw
lines, blank and malformed ones included, for the windowed scorer and for a text scorer (DSIR; fastText goes through
the same writer)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from lmselect.cli import main
from lmselect.data.tokenizer import tokenizer_fingerprint
from lmselect.models.presets import build_model
from lmselect.models.scorer import SequenceScorer
from lmselect.score import read_documents
from lmselect.testing import SAMPLE_TEXT

LINES = [
    json.dumps({"id": "a", "text": SAMPLE_TEXT[0]}),
    "",  # blank
    json.dumps({"text": SAMPLE_TEXT[1]}),  # no id
    "   ",  # whitespace only
    '{"id": "broken", "text": ',  # bad JSON
    json.dumps({"id": "no-text"}),  # no text field
    json.dumps({"id": None, "text": SAMPLE_TEXT[2]}),
    json.dumps({"id": "z", "text": SAMPLE_TEXT[3]}),
]


def _raw_lines(path: Path) -> list[str]:
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        raw = gzip.decompress(raw)
    return raw.decode().split("\n")[:-1]  # every line, blank ones included (the file ends with a newline)


def dolma_pairs(doc_file: Path, attr_file: Path) -> list[tuple[str, dict]]:
    """dolma's mixer rule: line i of the attribute file is the attributes of line i of the document file."""
    docs, attrs = _raw_lines(doc_file), _raw_lines(attr_file)
    assert len(attrs) == len(docs), f"{len(attrs)} attribute lines for {len(docs)} document lines"
    return [(d, json.loads(a)) for d, a in zip(docs, attrs)]


def _check(doc_file: Path, attr_file: Path, name: str) -> None:
    pairs = dolma_pairs(doc_file, attr_file)
    scored = 0
    for d, a in pairs:
        try:
            rec = json.loads(d)
        except json.JSONDecodeError:
            rec = None
        if rec is None or not isinstance(rec.get("text"), str):  # blank, malformed, no text: a placeholder
            assert a["attributes"][f"{name}__score"] == []
            continue
        assert a["id"] == rec.get("id")  # dolma compares the ids as JSON values
        assert a["attributes"][f"{name}__score"][0][:2] == [0, len(rec["text"])]
        scored += 1
    assert scored == 4


@pytest.fixture()
def corpus(tmp_path) -> Path:
    p = tmp_path / "documents" / "part-0000.jsonl.gz"
    p.parent.mkdir()
    p.write_bytes(gzip.compress(("\n".join(LINES) + "\n").encode()))
    return p


def test_windowed_scorer_keeps_a_line_for_every_line(tmp_path, corpus, tiny_pool, tiny_tokenizer):
    sdir = tmp_path / "scorer"
    SequenceScorer.from_causal_lm(build_model("debug", len(tiny_tokenizer), seed=0), activation="identity",
                                  seed=0).save_pretrained(sdir, extra={"tokenizer_fingerprint":
                                                                       tokenizer_fingerprint(tiny_tokenizer)})
    out = tmp_path / "scores"
    assert main(["score", "--model", str(sdir), "--jsonl", str(corpus.parent), "--tokenizer-from",
                 str(tiny_pool.path), "--seq-len", "8", "--out", str(out), "--no-progress"]) == 0
    _check(corpus, out / "attributes" / "lmselect" / corpus.name, "lmselect")
    docs = read_documents(out).to_pylist()
    assert [d["line"] for d in docs] == list(range(1, len(LINES) + 1))
    assert [d["blank"] for d in docs] == [False, True, False, True, False, False, False, False]


def test_text_scorer_keeps_a_line_for_every_line(tmp_path, corpus):
    from lmselect.select.dsir import DsirConfig, _save_text_scorer, fit_log_ratio

    cfg = DsirConfig(buckets=97)
    log_ratio, _ = fit_log_ratio(SAMPLE_TEXT[:6], SAMPLE_TEXT[6:], cfg)
    d = tmp_path / "round1" / "scores" / "text_scorer"
    _save_text_scorer(d, log_ratio, cfg, {"target_items": 6})
    out = tmp_path / "scores"
    assert main(["score", "--model", str(d.parent), "--jsonl", str(corpus.parent), "--attribute-name", "dsir",
                 "--out", str(out), "--no-progress"]) == 0
    _check(corpus, out / "attributes" / "dsir" / corpus.name, "dsir")


def test_help_names_the_attribute_files_as_written(capsys):
    with pytest.raises(SystemExit):
        main(["score", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "*.jsonl.gz" not in text and "same name and compression as the input" in text
