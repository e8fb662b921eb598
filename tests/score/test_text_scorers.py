"""``lmselect score --jsonl`` with a text scorer (a fasttext / dsir round's ``scores/text_scorer``): one score per
whole document, the same values the round's scorer and the datatrove step give, in the jsonl sidecar's layout."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from lmselect.cli import main
from lmselect.errors import LmselectError
from lmselect.score import read_documents
from lmselect.testing import SAMPLE_TEXT


@pytest.fixture()
def dsir_scorer(tmp_path):
    from lmselect.select.dsir import DsirConfig, _save_text_scorer, fit_log_ratio

    target = [" ".join(SAMPLE_TEXT[i : i + 3]) for i in range(0, 12, 3)]
    raw = [" ".join(SAMPLE_TEXT[i : i + 2]) for i in range(len(SAMPLE_TEXT) - 2)]
    cfg = DsirConfig(buckets=97)
    log_ratio, _ = fit_log_ratio(target, raw, cfg)
    d = tmp_path / "round1" / "scores" / "text_scorer"
    _save_text_scorer(d, log_ratio, cfg, {"target_items": len(target)})
    return d.parent


def test_score_jsonl_with_a_text_scorer(tmp_path, dsir_scorer):
    from lmselect.score.documents import DocumentScorer
    from lmselect.select.base import load_text_scorer

    folder = tmp_path / "documents"
    (folder / "sub").mkdir(parents=True)
    texts = [" ".join(SAMPLE_TEXT[i : i + 1 + i % 3]) for i in range(7)]
    (folder / "a.jsonl").write_text("".join(json.dumps({"id": f"a{i}", "text": t}) + "\n" for i, t in enumerate(texts[:4]))
                                    + "not json\n")
    with gzip.open(folder / "sub" / "b.json.gz", "wt") as f:
        f.write("".join(json.dumps({"id": None, "text": t}) + "\n" for t in texts[4:]))
    out = tmp_path / "scores"
    assert main(["score", "--model", str(dsir_scorer), "--jsonl", str(folder), "--out", str(out), "--no-progress"]) == 0
    docs = read_documents(out).to_pylist()
    assert len(docs) == 8  # every line keeps its row, the malformed one included
    got = [d["score"] for d in docs]
    assert np.isnan(got[4])  # the malformed line: no score
    want = load_text_scorer(dsir_scorer).score_texts(texts).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(got[:4] + got[5:], dtype=np.float32), want)
    np.testing.assert_array_equal(DocumentScorer(dsir_scorer).score(texts), want)  # the datatrove step's values
    # dolma's layout: one attribute file per input, named as the input, line-aligned, original ids (null stays null)
    with gzip.open(out / "attributes" / "lmselect" / "sub" / "b.json.gz", "rt") as f:
        recs = [json.loads(x) for x in f]
    assert [r["id"] for r in recs] == [None, None, None]
    assert [r["attributes"]["lmselect__score"][0][2] for r in recs] == pytest.approx([float(x) for x in want[4:]])
    # rerun: reused; another model into the same --out: refused
    assert main(["score", "--model", str(dsir_scorer), "--jsonl", str(folder), "--out", str(out), "--no-progress"]) == 0
    with pytest.raises(LmselectError, match="another model or input"):
        from lmselect.score.windows import score_jsonl_texts

        score_jsonl_texts(dsir_scorer, folder / "a.jsonl", out)


def test_text_scorer_refuses_a_pool_and_a_shard(tmp_path, dsir_scorer, tiny_pool):
    with pytest.raises(LmselectError, match="scores documents of --jsonl files"):
        main(["score", "--model", str(dsir_scorer), "--pool", str(tiny_pool.path), "--out", str(tmp_path / "o"),
              "--debug"])
    (tmp_path / "x.jsonl").write_text(json.dumps({"text": "a b c"}) + "\n")
    with pytest.raises(LmselectError, match="drop --shard"):
        main(["score", "--model", str(dsir_scorer), "--jsonl", str(tmp_path / "x.jsonl"), "--shard", "1/2",
              "--out", str(tmp_path / "o"), "--debug"])
