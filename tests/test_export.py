"""``lmselect export``: documents read back match the pool's decode of the same spans (and the original records),
tokens.bin read with np.memmap equals the pool rows, run directories export each method/seed's final round."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from lmselect.artifacts import is_complete, parent_ref, read_manifest
from lmselect.cli import main
from lmselect.data.pool import TokenPool
from lmselect.data.prepare import PrepareConfig, prepare
from lmselect.score import read_scores, write_scores
from lmselect.select.selection import read_selection, write_selection
from lmselect.testing import SAMPLE_TEXT

SEQ_LEN = 16


@pytest.fixture(scope="module")
def corpus_pool(tmp_path_factory, tiny_tokenizer) -> tuple[TokenPool, dict[str, str]]:
    """A prepared pool whose documents are 1 to 4 sentences long, so many continue across sequences."""
    d = tmp_path_factory.mktemp("export")
    tiny_tokenizer.save_pretrained(str(d / "tok"))
    rng = np.random.default_rng(0)
    texts = {f"doc-{i}": " ".join(rng.choice(SAMPLE_TEXT[:8], size=1 + i % 4)) for i in range(40)}
    src = d / "corpus.jsonl"
    src.write_text("".join(json.dumps({"id": k, "text": v, "source": ["web", "news"][i % 2]}) + "\n"
                           for i, (k, v) in enumerate(texts.items())))
    cfg = PrepareConfig(inputs=[str(src)], tokenizer=str(d / "tok"), seq_len=SEQ_LEN, n_shards=2, workers=1)
    return TokenPool(prepare(cfg, d / "pool", progress=False)), texts


def _selection(tmp_path: Path, pool: TokenPool, name: str = "sel", fraction: float = 0.5) -> Path:
    """`lmselect select` on made-up scores: a real selection artifact with scores and pool parents."""
    ids = pool.ids(None)
    scores = np.random.default_rng(1).normal(size=len(ids)).astype(np.float32)
    sc = write_scores(tmp_path / f"{name}-scores", ids, scores, parents=[parent_ref(pool.path)])
    assert main(["select", "--scores", str(sc), "--fraction", str(fraction), "--out", str(tmp_path / name)]) == 0
    return tmp_path / name


def _span_text(pool: TokenPool, row: dict) -> str:
    """Oracle: decode the row's spans straight from docs.parquet and tokens.bin."""
    spans = pool.doc_spans().to_pylist()
    toks: list[int] = []
    mine = [s for s in spans if s["doc_id"] == row["doc_id"] and s["seq_id"] in row["seq_ids"]]
    assert [s["seq_id"] for s in mine] == row["seq_ids"] and mine[0]["start"] == row["token_start"]
    for s in mine:
        toks += pool.tokens[s["seq_id"], s["start"] : s["start"] + s["length"]].tolist()
    if toks and toks[-1] == pool.eos_id:
        toks = toks[:-1]
    assert len(toks) == row["n_tokens"]
    return pool.load_tokenizer().decode(toks, clean_up_tokenization_spaces=False)


def _read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_export_selection_documents_and_tokens(tmp_path, corpus_pool):
    pool, texts = corpus_pool
    sel_dir = _selection(tmp_path, pool)
    sel = read_selection(sel_dir)
    out = tmp_path / "exp"
    assert main(["export", str(sel_dir), "--out", str(out)]) == 0
    m = read_manifest(out, kind="export")
    assert {p["kind"] for p in m["parents"]} == {"selection", "pool"}

    # tokens: the nanoGPT reader sees exactly the pool rows of the selected sequences
    meta = json.loads((out / "tokens.json").read_text())
    assert meta["dtype"] == "uint16" and meta["seq_len"] == SEQ_LEN and meta["n_sequences"] == len(sel)
    assert meta["n_tokens"] == len(sel) * SEQ_LEN and meta["selection_uuid"] == read_manifest(sel_dir)["uuid"]
    assert meta["tokenizer_fingerprint"] == pool.tokenizer_fingerprint and meta["eos_id"] == pool.eos_id
    flat = np.memmap(out / "tokens.bin", dtype=np.uint16, mode="r")
    assert flat.shape == (meta["n_tokens"],)
    np.testing.assert_array_equal(flat.reshape(-1, SEQ_LEN), np.asarray(pool.tokens[sel]))
    np.testing.assert_array_equal(np.load(out / "seq_ids.npy"), sel)
    assert (out / "tokenizer" / "tokenizer.json").is_file()

    # documents: every piece decodes to the pool's tokens of the same spans, and is a piece of the original text
    rows = _read_jsonl_gz(out / "documents.jsonl.gz")
    ids, scores = read_scores(read_manifest(sel_dir)["extra"]["scores"])
    score_of = dict(zip(ids.tolist(), scores.tolist()))
    assert rows and {r["source"] for r in rows} == {"web", "news"}
    assert any(len(r["seq_ids"]) > 1 for r in rows) and any(not r["complete"] for r in rows)
    covered = set()
    for r in rows:
        assert r["text"] == _span_text(pool, r)
        assert r["text"] in texts[r["doc_id"]]
        if r["complete"]:
            assert r["text"] == texts[r["doc_id"]]  # a whole document comes back as its original text
        assert set(r["seq_ids"]) <= set(sel.tolist())
        assert r["scores"] == pytest.approx([score_of[s] for s in r["seq_ids"]])
        assert r["score"] == pytest.approx(float(np.mean(r["scores"])))
        covered |= set(r["seq_ids"])
    assert covered == set(sel.tolist())  # every selected sequence is accounted for
    # a document whose sequences were all selected comes back whole
    spans = pool.doc_spans().to_pylist()
    by_doc: dict[str, set[int]] = {}
    for s in spans:
        by_doc.setdefault(s["doc_id"], set()).add(s["seq_id"])
    whole = {d for d, seqs in by_doc.items() if seqs <= set(sel.tolist())}
    assert whole and whole == {r["doc_id"] for r in rows if r["complete"]}
    assert m["counts"]["complete_documents"] == len(whole) and m["counts"]["documents"] == len(rows)

    # parquet holds the same rows
    out_pq = tmp_path / "exp_pq"
    assert main(["export", str(sel_dir), "--out", str(out_pq), "--format", "parquet"]) == 0
    t = pq.read_table(out_pq / "documents.parquet").to_pylist()
    assert [(r["doc_id"], r["seq_ids"], r["text"]) for r in t] == [(r["doc_id"], r["seq_ids"], r["text"]) for r in rows]
    assert (out_pq / "tokens.bin").read_bytes() == (out / "tokens.bin").read_bytes()


def test_export_run_directory_final_rounds(tmp_path, corpus_pool, capsys):
    pool, _ = corpus_pool
    run = tmp_path / "run"
    sels = {}
    for method, rounds in (("random", 2), ("bliss", 3)):
        for r in range(1, rounds + 1):
            cand = pool.ids(r % 2)
            chosen = cand[np.random.default_rng(r).permutation(len(cand))[: len(cand) // 4]]
            d = write_selection(run / method / "seed0" / f"round{r}" / "selection", pool, cand, None, chosen,
                                method=method, fraction=0.25, extra={"round": r, "seed": 0}, plots=False)
            sels[(method, r)] = d
    (run / "bliss" / "seed0" / "round4" / "selection").mkdir(parents=True)  # an unfinished round is skipped
    out = tmp_path / "exp"
    assert main(["export", str(run), "--out", str(out)]) == 0
    m = read_manifest(out, kind="export")
    assert [(e["method"], e["round"]) for e in m["extra"]["exports"]] == [("bliss", 3), ("random", 2)]
    for method, r in (("bliss", 3), ("random", 2)):
        sub = out / method / "seed0" / f"round{r}"
        assert is_complete(sub, "export")
        flat = np.memmap(sub / "tokens.bin", dtype=np.uint16, mode="r").reshape(-1, SEQ_LEN)
        np.testing.assert_array_equal(flat, np.asarray(pool.tokens[read_selection(sels[(method, r)])]))
        rows = _read_jsonl_gz(sub / "documents.jsonl.gz")
        assert rows and "score" not in rows[0]  # these selections were not made from scores
        assert all(r_["text"] == _span_text(pool, r_) for r_ in rows[:10])
    # --round picks one; a round some method lacks is a one-line error; a non-export --out is refused
    assert main(["export", str(run), "--round", "1", "--out", str(tmp_path / "r1")]) == 0
    assert [e["round"] for e in read_manifest(tmp_path / "r1")["extra"]["exports"]] == [1, 1]
    capsys.readouterr()
    assert main(["export", str(run), "--round", "3", "--out", str(tmp_path / "r3")]) == 2
    err = capsys.readouterr().err.strip()
    assert "random/seed0" in err and "--round 3" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r3").exists()
    assert main(["export", str(run), "--out", str(pool.path)]) == 2
    assert "'pool' artifact" in capsys.readouterr().err


def test_export_rows_have_unique_ids_and_parts_say_where_they_are(tmp_path, corpus_pool):
    """Regression (issue 21, item 4): rows were 128-token pieces sharing doc_id, with no offsets, so an id-keyed join
    or dedup collapsed them. Now every row has a unique ``id``, keeps ``doc_id``, and a part says so (``complete``
    false) with its character offsets in the original text. datatrove's readers read both formats."""
    from datatrove.pipeline.readers import JsonlReader, ParquetReader

    pool, texts = corpus_pool
    sel_dir = _selection(tmp_path, pool, fraction=0.4)
    out, out_pq = tmp_path / "exp", tmp_path / "exp_pq"
    assert main(["export", str(sel_dir), "--out", str(out)]) == 0
    assert main(["export", str(sel_dir), "--out", str(out_pq), "--format", "parquet"]) == 0
    rows = _read_jsonl_gz(out / "documents.jsonl.gz")
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({r["doc_id"] for r in rows}) < len(rows)  # several parts of one document: the case that collapsed
    parts = [r for r in rows if not r["complete"]]
    assert parts and any(r["char_start"] > 0 for r in parts)
    for r in rows:
        original = texts[r["doc_id"]]
        assert original[r["char_start"] : r["char_end"]] == r["text"]  # offsets slice the source record
        if r["complete"]:
            assert r["id"] == r["doc_id"] and (r["char_start"], r["char_end"]) == (0, len(original))
        else:
            assert r["id"] == f"{r['doc_id']}:{r['char_start']}-{r['char_end']}"
    # the real clients: datatrove reads each row as one Document with our id and text
    by_id = {r["id"]: r for r in rows}
    for reader in (JsonlReader(str(out), glob_pattern="documents.jsonl.gz"),
                   ParquetReader(str(out_pq), glob_pattern="documents.parquet")):
        got = list(reader.run())
        assert len(got) == len(rows) and {d.id for d in got} == set(by_id)
        for d in got:
            assert d.text == by_id[d.id]["text"] and d.metadata["doc_id"] == by_id[d.id]["doc_id"]


def test_export_cleans_stale_staging_and_needs_overwrite(tmp_path, corpus_pool, capsys):
    """Regression (issue 21, item 6): a kill -9 left ``.OUT.tmp-PID-*`` behind forever, and an export of another
    selection or format silently replaced an earlier one."""
    import os
    import subprocess
    import sys

    pool, _ = corpus_pool
    a, b = _selection(tmp_path, pool, "a", 0.5), _selection(tmp_path, pool, "b", 0.3)
    out = tmp_path / "exp"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".exp.tmp-{dead.pid}-0badc0de"
    (stale / "tokenizer").mkdir(parents=True)
    live = tmp_path / f".exp.tmp-{os.getppid()}-1badc0de"  # a running process's staging dir is left alone
    live.mkdir()
    assert main(["export", str(a), "--out", str(out)]) == 0
    assert not stale.exists() and live.exists()
    first = read_manifest(out, kind="export")["uuid"]
    for args in ([str(b), "--out", str(out)], [str(a), "--out", str(out), "--format", "parquet"]):
        capsys.readouterr()
        assert main(["export", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--overwrite" in err
        assert read_manifest(out, kind="export")["uuid"] == first  # untouched
    assert main(["export", str(a), "--out", str(out)]) == 0  # the same export again: replaced quietly
    assert main(["export", str(b), "--out", str(out), "--overwrite"]) == 0
    assert read_manifest(out, kind="export")["config"]["selection"] == str(b)


def test_segments_give_the_export_of_the_whole_table(tmp_path, corpus_pool, monkeypatch):
    """docs.parquet read a few spans at a time (cut only where a document occurrence starts) gives the documents of
    reading it whole: same rows, ids, offsets and text."""
    import lmselect.export as ex

    pool, _ = corpus_pool
    sel = _selection(tmp_path, pool)
    ex.export(sel, tmp_path / "whole")
    segs = list(ex.occurrence_segments(pool.path / "docs.parquet", pool.seq_len, batch_rows=5))
    assert len(segs) > 5 and sum(t.num_rows for t in segs) == pool.doc_spans().num_rows
    monkeypatch.setattr(ex, "SEGMENT_SPANS", 5)
    ex.export(sel, tmp_path / "seg")
    a = gzip.decompress((tmp_path / "whole" / "documents.jsonl.gz").read_bytes())
    assert a and a == gzip.decompress((tmp_path / "seg" / "documents.jsonl.gz").read_bytes())
    assert read_manifest(tmp_path / "seg")["counts"] == read_manifest(tmp_path / "whole")["counts"]


def test_score_lookup_is_the_dict_it_replaces():
    """export's seq_id -> score lookup (sorted arrays) answers as dict(zip(ids, scores)) did: the last score of a
    repeated id, NaN (the default) for an id without one."""
    from lmselect.export import ScoreLookup

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, 40)
    scores = rng.random(40).astype(np.float32)
    want = dict(zip(ids.tolist(), scores.astype(np.float64).tolist()))
    look = ScoreLookup(ids, scores)
    for s in range(-1, 52):
        got, exp = look.get(s), want.get(s, float("nan"))
        assert (np.isnan(got) and np.isnan(exp)) or got == exp, s
    assert np.isnan(ScoreLookup(np.zeros(0, np.int64), np.zeros(0)).get(3))
