"""prepare: packing, spans, shards, manifest counts, atomicity, reuse, bad input and the CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from corpus_helpers import SENTENCES, clean_records, write_jsonl

from lmselect.artifacts import ArtifactError, LmselectError
from lmselect.cli import main
from lmselect.config import ConfigError
from lmselect.data.pool import TokenPool
from lmselect.data.prepare import PrepareConfig, assign_shards, document_spans, prepare, prepare_pool


def cfg_for(inputs, tok_dir=None, **kw) -> PrepareConfig:
    base = dict(inputs=list(inputs), tokenizer=tok_dir, vocab_size=300, seq_len=16, n_shards=2, workers=1)
    base.update(kw)
    return PrepareConfig(**base)


def _docs(inputs):
    """(text, doc_id, source) of every document, in corpus order, read independently of prepare."""
    import gzip

    out = []
    for p in inputs:
        opener = gzip.open if p.endswith(".gz") else open
        stem = Path(p).name.split(".")[0]
        with opener(p, "rt") as f:
            for i, line in enumerate(f, 1):
                r = json.loads(line)
                out.append((r["text"], r.get("id", f"{Path(p).name}:{i}"), r.get("source", stem)))
    return out


def test_packing_matches_tokenized_docs_and_spans(tmp_path, corpus, tok_dir, tiny_tokenizer):
    pool = TokenPool(prepare(cfg_for(corpus, tok_dir, val_sequences=2), tmp_path / "pool", progress=False))
    eos = tiny_tokenizer.eos_token_id
    docs = _docs(corpus)
    stream = [t for text, _, _ in docs for t in tiny_tokenizer.encode(text, add_special_tokens=False) + [eos]]
    n, L = pool.n_sequences, pool.seq_len
    assert n == len(stream) // L
    # rows, concatenated, are exactly the tokenized documents + EOS (the partial tail is dropped)
    assert np.array_equal(np.asarray(pool.tokens).reshape(-1), np.array(stream[: n * L]))
    assert pool.manifest["counts"]["dropped_tail_tokens"] == len(stream) - n * L

    spans = pool.doc_spans().to_pydict()
    # every span points at its document's tokens; spans tile each row with no gap or overlap
    by_doc = {}
    for sid, did, _src, start, length in zip(spans["seq_id"], spans["doc_id"], spans["source"], spans["start"], spans["length"]):
        by_doc.setdefault(did, []).extend(pool.tokens[sid, start : start + length].tolist())
    partial = 0
    for text, did, _src in docs:
        want = tiny_tokenizer.encode(text, add_special_tokens=False) + [eos]
        got = by_doc.get(did, [])
        assert want[: len(got)] == got
        partial += 0 < len(got) < len(want)
    assert partial <= 1  # only the document cut by the dropped tail is incomplete
    cover = np.zeros((n, L), dtype=int)
    for sid, start, length in zip(spans["seq_id"], spans["start"], spans["length"]):
        cover[sid, start : start + length] += 1
    assert (cover == 1).all()
    # n_docs and the majority source come from the spans
    seq_src = {}
    for sid, src, length in zip(spans["seq_id"], spans["source"], spans["length"]):
        seq_src.setdefault(sid, {}).setdefault(src, 0)
        seq_src[sid][src] += length
    for sid in range(n):
        counts = seq_src[sid]
        best = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        assert pool.sources([sid])[0] == best
        assert pool.n_docs[sid] == sum(1 for s in spans["seq_id"] if s == sid)
    assert set(pool.source_names) == {"wiki", "spam"}


def test_document_spans_handmade():
    # docs of 3, 10, 2, 4 tokens over rows of 4 -> 4 full rows (16 tokens), last doc partly in the dropped tail
    sp = document_spans(np.array([3, 10, 2, 4]), 4, 4)
    got = list(zip(sp["doc"].tolist(), sp["seq_id"].tolist(), sp["start"].tolist(), sp["length"].tolist()))
    assert got == [(0, 0, 0, 3), (1, 0, 3, 1), (1, 1, 0, 4), (1, 2, 0, 4), (1, 3, 0, 1), (2, 3, 1, 2), (3, 3, 3, 1)]
    sp = document_spans(np.array([5, 5]), 4, 2)  # 8 tokens kept: the second doc keeps only its first 3
    assert sp["doc"].tolist() == [0, 0, 1] and sp["length"].tolist() == [4, 1, 3]


def test_shards_deterministic_from_seed():
    a, b, c = assign_shards(103, 4, 7, seed=1), assign_shards(103, 4, 7, seed=1), assign_shards(103, 4, 7, seed=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert (a == -1).sum() == 7
    sizes = [(a == k).sum() for k in range(4)]
    assert sum(sizes) == 96 and max(sizes) - min(sizes) <= 1
    with pytest.raises(LmselectError, match="not enough for 4 shards"):
        assign_shards(5, 4, 2, seed=0)


@pytest.mark.parametrize("n_rows", [9, 103, 100_003])
def test_shards_are_the_seeded_permutation(n_rows):
    """The oracle: ``rng.permutation(n)`` (int64), as pools were assigned before the merge shuffled an int32 range
    in place; the first n_val rows of the permutation are the hold-out, the rest cut into contiguous parts."""
    for seed in (0, 3):
        perm = np.random.default_rng(seed).permutation(n_rows)
        want = np.empty(n_rows, dtype=np.int32)
        want[perm[:2]] = -1
        for k, part in enumerate(np.array_split(perm[2:], 3)):
            want[part] = k
        assert np.array_equal(assign_shards(n_rows, 3, 2, seed=seed), want)


def test_pool_shards_reproducible_and_seeded(tmp_path, corpus, tok_dir):
    p1 = TokenPool(prepare(cfg_for(corpus, tok_dir, seed=3, val_fraction=0.1), tmp_path / "a", progress=False))
    p2 = TokenPool(prepare(cfg_for(corpus, tok_dir, seed=3, val_fraction=0.1), tmp_path / "b", progress=False))
    p3 = TokenPool(prepare(cfg_for(corpus, tok_dir, seed=4, val_fraction=0.1), tmp_path / "c", progress=False))
    assert np.array_equal(p1.shard, p2.shard) and np.array_equal(np.asarray(p1.tokens), np.asarray(p2.tokens))
    assert not np.array_equal(p1.shard, p3.shard)
    assert len(p1.ids("val")) == round(0.1 * p1.n_sequences)


def test_manifest_counts(tmp_path, corpus, tok_dir):
    bad = write_jsonl(tmp_path / "corpus" / "bad.jsonl", [{"text": "fine text here"}, "{oops", {"txt": "x"}, {"text": ""}])
    inputs = corpus + [str(bad)]
    pool = TokenPool(prepare(cfg_for(inputs, tok_dir, val_sequences=3), tmp_path / "pool", progress=False))
    m = pool.manifest
    c, x = m["counts"], m["extra"]
    assert m["kind"] == "pool" and m["seed"] == 0 and "git_commit" in m and len(m["config_hash"]) == 12
    assert c["documents"] == 24 + 12 + 1
    assert c["skipped"] == 2 and c["skipped_by_reason"] == {"bad_json": 1, "no_text_field": 1} and c["empty_records"] == 1
    assert c["skipped_examples"][0].startswith(f"{bad}:2: invalid JSON")
    assert c["per_source"]["wiki"]["documents"] == 24 and c["per_source"]["spam"]["documents"] == 12
    assert sum(s["sequences"] for s in c["per_source"].values()) == c["sequences"] == pool.n_sequences
    assert sum(s["tokens"] for s in c["per_source"].values()) == c["corpus_tokens"]
    assert c["validation_sequences"] == 3 == c["per_shard"]["-1"]["sequences"]
    assert sum(c["sequences_per_shard"].values()) + 3 == c["sequences"]
    assert c["per_shard"]["0"]["tokens"] == c["sequences_per_shard"]["0"] * 16
    assert {i["path"] for i in x["inputs"]} == set(inputs)
    for info in x["inputs"]:
        assert info["sha256"] == hashlib.sha256(Path(info["path"]).read_bytes()).hexdigest()
    assert x["seq_len"] == 16 and x["vocab_size"] == 320 and x["tokenizer"] == {"path": tok_dir, "trained": False}
    assert m["config"]["inputs"] == inputs and (pool.path / "config.yaml").is_file()
    assert set(m["timings"]) >= {"tokenize_pack_s", "total_s"} and m["created"] and m["versions"]


def test_trained_bpe_tokenizer_loads_with_autotokenizer(tmp_path, corpus):
    from transformers import AutoTokenizer

    pool = TokenPool(prepare(cfg_for(corpus, None, vocab_size=300), tmp_path / "pool", progress=False))
    tok = AutoTokenizer.from_pretrained(str(pool.tokenizer_dir))
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == pool.eos_id and len(tok) == 300
    assert pool.manifest["extra"]["tokenizer"]["trained"] is True
    assert SENTENCES[0] in tok.decode(np.asarray(pool.tokens).reshape(-1).tolist())


def test_atomic_crash_leaves_no_pool_and_rerun_completes(tmp_path, corpus, tok_dir, monkeypatch):
    import lmselect.data.prepare as prep

    out = tmp_path / "pool"
    real = prep._write_index

    def crash(*a, **k):
        real(*a, **k)  # index files written into the temp dir, then the process "dies" before the manifest
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(prep, "_write_index", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare(cfg_for(corpus, tok_dir), out, progress=False)
    assert not out.exists() and list(tmp_path.glob(".pool.tmp-*")) == []
    with pytest.raises(ArtifactError, match="no such artifact"):
        TokenPool(out)

    # a hard kill leaves a temp dir of a dead process: the rerun removes it and completes
    stale = tmp_path / ".pool.tmp-999999999-deadbeef"
    (stale).mkdir()
    (stale / "tokens.bin").write_bytes(b"\0" * 10)
    monkeypatch.setattr(prep, "_write_index", real)
    path, reused = prepare_pool(cfg_for(corpus, tok_dir), out, progress=False)
    assert not reused and not stale.exists() and TokenPool(path).n_sequences > 0


def test_incomplete_pool_dir_is_rebuilt(tmp_path, corpus, tok_dir):
    out = tmp_path / "pool"
    out.mkdir()
    (out / "tokens.bin").write_bytes(b"\0" * 64)  # partial pool without a manifest
    with pytest.raises(ArtifactError, match="incomplete artifact"):
        TokenPool(out)
    assert TokenPool(prepare(cfg_for(corpus, tok_dir), out, progress=False)).n_sequences > 0


def test_reuse_conflict_and_overwrite(tmp_path, corpus, tok_dir):
    out = tmp_path / "pool"
    _, reused = prepare_pool(cfg_for(corpus, tok_dir), out, progress=False)
    uuid = TokenPool(out).manifest["uuid"]
    # same config (worker count does not matter) -> reused untouched
    _, reused = prepare_pool(cfg_for(corpus, tok_dir, workers=2), out, progress=False)
    assert reused and TokenPool(out).manifest["uuid"] == uuid
    with pytest.raises(LmselectError, match="a pool with a different config already exists"):
        prepare(cfg_for(corpus, tok_dir, seq_len=8), out, progress=False)
    prepare(cfg_for(corpus, tok_dir, seq_len=8), out, overwrite=True, progress=False)
    assert TokenPool(out).seq_len == 8
    other = tmp_path / "notes"
    other.mkdir()
    (other / "readme.txt").write_text("mine")
    with pytest.raises(LmselectError, match="not empty and is not a pool"):
        prepare(cfg_for(corpus, tok_dir), other, progress=False)


def test_max_docs_and_mixed_formats(tmp_path, tok_dir):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [r["text"] for r in clean_records(10)]}), tmp_path / "pq.parquet")
    datasets.Dataset.from_dict({"text": [r["text"] for r in clean_records(10)]}).save_to_disk(str(tmp_path / "hf"))
    (tmp_path / "txt").mkdir()
    for i in range(5):
        (tmp_path / "txt" / f"{i}.txt").write_text(SENTENCES[i])
    write_jsonl(tmp_path / "z.jsonl.zst", clean_records(10), "zst")
    inputs = [str(tmp_path / "pq.parquet"), str(tmp_path / "hf"), str(tmp_path / "txt"), str(tmp_path / "z.jsonl.zst")]
    pool = TokenPool(prepare(cfg_for(inputs, tok_dir, seq_len=8), tmp_path / "pool", progress=False))
    c = pool.manifest["counts"]
    assert c["documents"] == 35
    assert {k: v["documents"] for k, v in c["per_source"].items()} == {"pq": 10, "hf": 10, "txt": 5, "z": 10}
    small = TokenPool(prepare(cfg_for(inputs, tok_dir, seq_len=8, max_docs=12), tmp_path / "small", progress=False))
    assert small.manifest["counts"]["documents"] == 12


# ---- bad input: one-line errors naming the file and line, exit code 2 from the CLI -------------------------------


def _cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lmselect prepare: error: ")
    return err


def test_cli_bad_inputs(tmp_path, tok_dir, capsys):
    out = str(tmp_path / "pool")
    good = write_jsonl(tmp_path / "good.jsonl", clean_records(8))
    err = _cli_error(capsys, ["prepare", str(tmp_path / "missing.jsonl"), "-o", out])
    assert f"{tmp_path / 'missing.jsonl'}: input not found" in err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, "{broken"])
    err = _cli_error(capsys, ["prepare", str(bad), "-o", out, "--strict", "--tokenizer", tok_dir])
    assert f"{bad}:2: invalid JSON" in err
    notext = write_jsonl(tmp_path / "notext.jsonl", [{"text": "ok"}, {"body": "b"}])
    err = _cli_error(capsys, ["prepare", str(notext), "-o", out, "--strict", "--tokenizer", tok_dir])
    assert f"{notext}:2: record has no 'text' field" in err
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": "  "}, {"body": "x"}])
    err = _cli_error(capsys, ["prepare", str(empty), "-o", out, "--vocab-size", "300"])
    assert f"{empty}: empty corpus: no document with usable text (3 records read, 1 malformed skipped, 2 empty)" in err
    err = _cli_error(capsys, ["prepare", str(empty), "-o", out, "--tokenizer", tok_dir])
    assert f"{empty}: empty corpus" in err
    err = _cli_error(capsys, ["prepare", str(good), "-o", out, "--seq-len", "1"])
    assert "config key 'seq_len' must be >= 2 (got 1)" in err
    err = _cli_error(capsys, ["prepare", str(good), "-o", out, "--seq-len", "100000", "--tokenizer", tok_dir])
    assert f"{good}: corpus has only" in err and "fewer than seq_len=100000" in err
    broken_tok = tmp_path / "broken_tok"
    broken_tok.mkdir()
    (broken_tok / "tokenizer.json").write_text("{not a tokenizer")
    (broken_tok / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    err = _cli_error(capsys, ["prepare", str(good), "-o", out, "--tokenizer", str(broken_tok)])
    assert f"{broken_tok}: not a loadable Hugging Face tokenizer directory" in err
    err = _cli_error(capsys, ["prepare", str(good), "-o", out, "--tokenizer", str(tmp_path / "no_tok")])
    assert "no_tok: tokenizer directory not found" in err
    err = _cli_error(capsys, ["prepare", str(good), "-o", out, "--vocab-size", "100"])
    assert "'vocab_size' must be >= 257" in err
    err = _cli_error(capsys, ["prepare", str(good), "-o", out, "--no_such_key=3"])
    assert "unknown config key 'no_such_key'" in err
    assert not Path(out).exists()


def test_cli_prepare_reuse_config_and_overrides(tmp_path, corpus, tok_dir, capsys):
    out = str(tmp_path / "pool")
    cfg = tmp_path / "prep.yaml"
    cfg.write_text(f"tokenizer: {tok_dir}\nseq_len: 64\nn_shards: 3\nworkers: 1\n")
    # YAML < flags < --key=value overrides
    argv = ["prepare", *corpus, "-o", out, "--config", str(cfg), "--seq-len", "16", "--val_sequences=2", "--no-progress"]
    assert main(argv) == 0
    assert "sequences x 16 tokens" in capsys.readouterr().out
    pool = TokenPool(out)
    assert pool.seq_len == 16 and pool.n_shards == 3 and len(pool.ids("val")) == 2
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == f"{out}: pool already complete"
    assert main(["prepare", *corpus, "-o", out, "--tokenizer", tok_dir, "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["prepare", *corpus, "-o", out, "--tokenizer", tok_dir, "--seq-len", "8", "--overwrite", "--no-progress"]) == 0
    assert TokenPool(out).seq_len == 8


def test_prepare_help_documents_bad_input_policy(capsys):
    with pytest.raises(SystemExit):
        main(["prepare", "--help"])
    out = capsys.readouterr().out
    assert "--strict" in out and "skipped and" in out and "empty corpus" in out.lower()


def test_config_validation():
    with pytest.raises(ConfigError, match="seq_len"):
        PrepareConfig(inputs=["x"], seq_len=1).validate()
    with pytest.raises(ConfigError, match="inputs"):
        PrepareConfig().validate()
    with pytest.raises(ConfigError, match="val_fraction"):
        PrepareConfig(inputs=["x"], val_fraction=1.0).validate()


def test_long_document_is_tokenized_in_pieces_with_the_same_tokens(tmp_path, tok_dir, tiny_tokenizer, monkeypatch,
                                                                   caplog):
    """Regression (issue 21, item 5): a 50 MB single-line document took 9.5 GB. Long texts are now encoded piece by
    piece (cut at whitespace runs; bench/prepare_long_doc.py measures the memory), and the tokens equal the
    whole-text encoding for a byte-level BPE; a trained BPE sees the same text. The threshold is lowered here so a
    few-KB document takes that path. Also: without a terminal, prepare logs progress while it runs, and BPE
    training says so (issue 21, item 8)."""
    import logging

    import lmselect.data.prepare as prep
    import lmselect.data.prepare_tasks as pt

    for mod in (prep, pt):  # BPE training reads prepare's, the tasks (tokenizing) prepare_tasks'
        monkeypatch.setattr(mod, "LONG_TEXT_CHARS", 500)
    monkeypatch.setattr(pt, "PROGRESS_LOG_S", 0.0)
    rng = np.random.default_rng(0)
    long_text = "  ".join(" ".join(rng.choice(SENTENCES, size=40)) for _ in range(5)) + "\n\nEnd of the report."
    recs = [{"id": "short-1", "text": SENTENCES[0]}, {"id": "long", "text": long_text},
            {"id": "short-2", "text": SENTENCES[1]}]
    src = write_jsonl(tmp_path / "c.jsonl", recs)
    with caplog.at_level(logging.INFO, logger="lmselect"):
        pool = TokenPool(prepare(cfg_for([str(src)], tok_dir, seq_len=32, n_shards=1), tmp_path / "pool",
                                 progress=True))
    eos = tiny_tokenizer.eos_token_id
    stream = [t for r in recs for t in tiny_tokenizer.encode(r["text"], add_special_tokens=False) + [eos]]
    assert len(long_text) > 10 * 500
    n = pool.n_sequences
    assert np.array_equal(np.asarray(pool.tokens).reshape(-1), np.array(stream[: n * 32]))
    assert any(r.getMessage().startswith("tokenize: ") for r in caplog.records)  # progress lines in the log
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lmselect"):
        prepare(cfg_for([str(src)], None, seq_len=32, n_shards=1), tmp_path / "pool_bpe", progress=False)
    msgs = [r.getMessage() for r in caplog.records]
    assert any("training a byte-level BPE" in m for m in msgs) and any("BPE tokenizer trained" in m for m in msgs)


def test_a_third_of_a_file_malformed_is_warned_about(tmp_path, tok_dir, caplog):
    """Regression (issue 21, item 6): a third of an input malformed got a count in the manifest but no warning."""
    import logging

    good = write_jsonl(tmp_path / "good.jsonl", clean_records(12))
    bad = tmp_path / "bad.jsonl"
    lines = [json.dumps(r) for r in clean_records(8, prefix="b")]
    lines[1] = lines[1][:-5]  # truncated JSON
    lines[4] = json.dumps({"id": "b4", "body": "text under another key"})
    lines[6] = json.dumps({"id": "b6", "text": 42})
    bad.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="lmselect"):
        pool = TokenPool(prepare(cfg_for([str(good), str(bad)], tok_dir), tmp_path / "pool", progress=False))
    assert pool.manifest["counts"]["skipped"] == 3
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and warned[0].startswith(f"{bad}: 3 of 8 records (38 %) are malformed")
