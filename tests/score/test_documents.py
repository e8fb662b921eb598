"""Document scores of ``lmselect score --jsonl``: the roll-up equals a brute-force mean over windows, the dolma
attribute file lines up with the input records, and NaN/empty documents are handled."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from lmselect.artifacts import LmselectError, read_manifest
from lmselect.cli import main
from lmselect.score import DOCUMENTS_FILE, read_documents, read_scores_table
from lmselect.testing import SAMPLE_TEXT


def write_docs(path: Path) -> tuple[Path, list[dict]]:
    """Nine records of different lengths (1 to 5 windows of 8 tokens), one without id, one empty, one with source."""
    recs: list[dict] = []
    for i in range(7):
        recs.append({"id": f"d{i}", "text": " ".join(SAMPLE_TEXT[i : i + 1 + i % 3])})
    recs.append({"text": "A language model predicts the next token."})  # no id: its line number
    recs.append({"id": "empty", "text": "", "source": "forum"})
    recs[2]["source"] = "news"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path, recs


def _score(scorer_dir: Path, src: Path, pool: Path, out: Path, *extra: object) -> int:
    return main(["score", "--model", str(scorer_dir), "--jsonl", str(src), "--tokenizer-from", str(pool),
                 "--seq-len", "8", "--batch-size", "3", "--out", str(out), "--no-progress", *map(str, extra)])


def test_document_scores_equal_bruteforce_mean(tmp_path, tiny_pool, scorer_dir):
    src, recs = write_docs(tmp_path / "docs.jsonl")
    out = tmp_path / "scores"
    assert _score(scorer_dir, src, tiny_pool.path, out, "--num-parts", 2) == 0
    windows = read_scores_table(out).to_pylist()
    docs = read_documents(out).to_pylist()
    # a record without an id: the id datatrove gives it (file/0-based line), flagged as derived
    assert [d["doc_id"] for d in docs] == [r.get("id", f"docs.jsonl/{i}") for i, r in enumerate(recs)]
    assert [d["id_derived"] for d in docs] == ["id" not in r for r in recs]
    assert [d["source"] for d in docs] == [r.get("source", "docs") for r in recs]
    assert [d["n_chars"] for d in docs] == [len(r["text"]) for r in recs]
    # brute force: group windows by document id and average in float64
    by_doc: dict[str, list[float]] = {}
    for w in windows:
        by_doc.setdefault(w["doc_id"], []).append(w["score"])
    assert max(len(v) for v in by_doc.values()) >= 3  # some documents really have several windows
    for d in docs:
        ws = by_doc.get(d["doc_id"], [])
        assert d["n_windows"] == len(ws)
        if ws:
            assert d["score"] == pytest.approx(float(np.mean(np.asarray(ws, np.float64))), rel=1e-6, abs=1e-6)
            assert d["score_min"] == pytest.approx(min(ws)) and d["score_max"] == pytest.approx(max(ws))
        else:  # the empty record: no windows, no score
            assert d["doc_id"] == "empty" and np.isnan(d["score"])
    m = read_manifest(out, kind="scores")
    assert m["counts"]["documents_scored"] == len(recs) - 1
    assert m["extra"]["attributes"] == "attributes/lmselect/docs.jsonl"  # the input's own name (not .gz)
    assert m["counts"]["documents_without_id"] == 1

    # the dolma attribute file: one line per record, same order, spans are character offsets into the text
    with open(out / m["extra"]["attributes"]) as f:
        attrs = [json.loads(line) for line in f]
    assert [a["id"] for a in attrs] == [r.get("id") for r in recs]  # ids as in the file: null stays null
    assert [a["source"] for a in attrs] == [d["source"] for d in docs]
    for a, d, r in zip(attrs, docs, recs):
        spans = a["attributes"]["lmselect__score"]
        if d["n_windows"]:
            assert spans == [[0, len(r["text"]), pytest.approx(d["score"], rel=1e-6)]]
            win = a["attributes"]["lmselect__window_scores"]
            assert len(win) == d["n_windows"] and win[0][0] == 0 and win[-1][1] == len(r["text"])
            assert np.mean([s for _, _, s in win]) == pytest.approx(d["score"], rel=1e-5)
        else:
            assert spans == [] and a["attributes"]["lmselect__window_scores"] == []


def test_attribute_name_and_rerun_is_byte_identical(tmp_path, tiny_pool, scorer_dir, capsys):
    src, recs = write_docs(tmp_path / "docs.jsonl")
    src = tmp_path / "docs.jsonl.gz"
    src.write_bytes(gzip.compress((tmp_path / "docs.jsonl").read_bytes()))
    a, b = tmp_path / "a", tmp_path / "b"
    assert _score(scorer_dir, src, tiny_pool.path, a, "--attribute-name", "bliss_v1") == 0
    assert _score(scorer_dir, src, tiny_pool.path, b, "--attribute-name", "bliss_v1") == 0
    fa = a / "attributes" / "bliss_v1" / "docs.jsonl.gz"
    assert fa.read_bytes() == (b / "attributes" / "bliss_v1" / "docs.jsonl.gz").read_bytes()
    assert "bliss_v1__score" in json.loads(gzip.decompress(fa.read_bytes()).splitlines()[0])["attributes"]
    ta, tb = pq.read_table(a / DOCUMENTS_FILE), pq.read_table(b / DOCUMENTS_FILE)
    assert ta.schema == tb.schema
    for name in ta.column_names:  # assert_array_equal treats the empty record's NaN as equal
        np.testing.assert_array_equal(ta.column(name).to_numpy(zero_copy_only=False), tb.column(name).to_numpy(zero_copy_only=False))
    capsys.readouterr()
    assert _score(scorer_dir, src, tiny_pool.path, tmp_path / "c", "--attribute-name", "x__y") == 2
    err = capsys.readouterr().err.strip()
    assert "--attribute-name" in err and len(err.splitlines()) == 1


def test_pool_scores_have_no_documents(tmp_path, tiny_pool, scorer_dir):
    out = tmp_path / "pool_scores"
    assert main(["score", "--model", str(scorer_dir), "--pool", str(tiny_pool.path), "--out", str(out),
                 "--no-progress"]) == 0
    with pytest.raises(LmselectError, match="not of a .jsonl file"):
        read_documents(out)
