"""prepare as tasks (data/prepare_tasks.py): the pool of N tasks + merge is byte-identical to one process, an array
task's part survives a killed sibling, and the merge reads its parts in chunks that do not depend on N."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from corpus_helpers import SENTENCES, clean_records, spam_records, write_jsonl

from lmselect.artifacts import LmselectError, read_json
from lmselect.cli import main
from lmselect.data import prepare_tasks as pt
from lmselect.data.pool import TokenPool
from lmselect.data.prepare import PrepareConfig, prepare_pool

# manifest keys that say how the work ran, not what the pool holds
_RUN_KEYS = {"tasks", "tokenizer_threads", "tokens_per_second"}


def _corpus(d: Path) -> list[str]:
    """Five inputs of four formats: ids and no ids, a malformed and an empty record, a datasets folder that the
    tasks split by rows."""
    import datasets

    d.mkdir()
    bad = clean_records(9, "m") + ["{not json", {"id": "e", "text": "   "}, {"id": "nt"}]
    files = [write_jsonl(d / "wiki.jsonl", clean_records(40, "w")), write_jsonl(d / "spam.jsonl.gz", spam_records(25), "gz"),
             write_jsonl(d / "mixed.jsonl", bad), write_jsonl(d / "news.jsonl.zst", clean_records(30, "n")[::-1], "zst")]
    rows = [{"text": " ".join(SENTENCES[(i * 7 + k) % 6] for k in range(1 + i % 4)), "source": f"hf{i % 3}"}
            for i in range(50)]
    datasets.Dataset.from_list(rows).save_to_disk(str(d / "ds"))
    return [str(f) for f in files] + [str(d / "ds")]


def _cfg(inputs, **kw) -> PrepareConfig:
    prot = Path(inputs[0]).parent / "protected.jsonl"
    write_jsonl(prot, [{"text": SENTENCES[2] + " " + SENTENCES[3]}])
    base = dict(inputs=list(inputs), vocab_size=300, seq_len=16, n_shards=3, val_sequences=4, workers=1, seed=3,
                prefilter=["gopher_repetition"], tokenizer_train_chars=4000)
    base.update(kw)
    cfg = PrepareConfig(**base)
    cfg.decontaminate.protected = [str(prot)]
    cfg.decontaminate.n = 8
    return cfg


def _same_pool(a: Path, b: Path) -> None:
    files_a = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    files_b = sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for f in files_a:
        if f not in ("manifest.json", "config.yaml"):
            assert (a / f).read_bytes() == (b / f).read_bytes(), f
    ma, mb = read_json(a / "manifest.json"), read_json(b / "manifest.json")
    assert ma["counts"] == mb["counts"] and ma["config_hash"] == mb["config_hash"]
    ea, eb = ({k: v for k, v in m["extra"].items() if k not in _RUN_KEYS} for m in (ma, mb))
    for e in (ea, eb):
        e["prefilter"].pop("seconds")
    assert ea == eb


def test_tasks_give_the_pool_of_one_process(tmp_path, monkeypatch):
    """4 tasks under datatrove's LocalPipelineExecutor (two worker processes) + the merge = one process, byte for
    byte: tokens, index, shards, tokenizer, prefilter list, contamination, every manifest count. Small merge chunks
    make rows run across chunk boundaries."""
    monkeypatch.setattr(pt, "MERGE_CHUNK_DOCS", 7)
    inputs = _corpus(tmp_path / "corpus")
    one, _ = prepare_pool(_cfg(inputs, tasks=1), tmp_path / "one", progress=False)
    four, _ = prepare_pool(_cfg(inputs, tasks=4), tmp_path / "four", progress=False)
    m = read_json(four / "manifest.json")
    assert m["extra"]["tasks"] == 4 and read_json(one / "manifest.json")["extra"]["tasks"] == 1
    assert not pt.work_dir(four).exists()  # the parts go once the pool is complete
    _same_pool(one, four)
    c = m["counts"]
    assert c["skipped"] == 2 and c["empty_records"] == 1 and m["extra"]["prefilter"]["dropped"] > 0
    assert m["extra"]["decontamination"]["contaminated"] > 0
    # the index is the one a whole-table computation gives (prepare.document_spans over every document)
    pool = TokenPool(four)
    spans = pool.doc_spans().to_pydict()
    assert sum(spans["length"]) == pool.n_sequences * pool.seq_len
    seq = pool.manifest["counts"]["per_shard"]
    assert sum(v["sequences"] for v in seq.values()) == pool.n_sequences


def test_array_tasks_resume_and_merge(tmp_path, capsys):
    """--task i/N runs one task (the first makes the plan); a task killed mid-way (its temp dir left behind, no
    part) is redone on the next run while complete parts are kept; --tasks N then only merges."""
    inputs = _corpus(tmp_path / "corpus")
    cfg = _cfg(inputs, tasks=1)
    ref, _ = prepare_pool(cfg, tmp_path / "ref", progress=False)
    out = tmp_path / "pool"
    args = ["prepare", *inputs, "--out", str(out), "--vocab-size", "300", "--seq-len", "16", "--n-shards", "3",
            "--val-sequences", "4", "--workers", "1", "--seed", "3", "--prefilter", "gopher_repetition",
            "--tokenizer_train_chars=4000", "--decontaminate", cfg.decontaminate.protected[0], "--decontam-n", "8",
            "--no-progress"]
    assert main([*args, "--task", "0/3"]) == 0
    assert "task 0/3 done; 1 of 3 parts complete" in capsys.readouterr().out
    work = pt.work_dir(out)
    plan = read_json(work / pt.PLAN)
    assert plan["n_tasks"] == 3 and pt.incomplete(work, plan) == [1, 2]
    marker0 = pt.part_dir(work, 0) / pt.PART_MARKER
    before = marker0.stat().st_mtime_ns
    # task 1 "killed": a temp dir of a dead process, nothing else
    stale = work / "parts" / ".00001.tmp-999999999-deadbeef"
    stale.mkdir()
    (stale / "tokens.bin").write_bytes(b"\0" * 8)
    # an array task of other settings never wipes its siblings' parts: one line, exit 2
    assert main([*args, "--seq-len", "32", "--task", "1/3"]) == 2
    assert "holds the parts of another prepare" in capsys.readouterr().err
    assert main([*args, "--task", "1/3"]) == 0
    assert not stale.exists() and pt.incomplete(work, plan) == [2]
    assert marker0.stat().st_mtime_ns == before  # the complete part was not redone
    assert main([*args, "--tasks", "3"]) == 0  # runs the missing task 2, then merges
    _same_pool(ref, out)
    assert "sequences" in capsys.readouterr().out


def test_assign_units_is_contiguous_and_balanced():
    groups = pt.assign_units([10, 10, 10, 10, 1, 1, 100], 3)
    flat = [u for g in groups for u in g]
    assert flat == list(range(7)) and len(groups) == 3
    assert [6] in groups  # the big unit alone
    w = [3, 1, 1, 1, 3, 3]
    assert max(sum(w[u] for u in g) for g in pt.assign_units(w, 3)) == 5  # the best contiguous split (brute force)
    assert pt.assign_units([5], 4) == [[0], [], [], []]  # fewer units than tasks: empty tasks, empty parts
    with pytest.raises(LmselectError, match="I/N"):
        pt.parse_task("3of8")
    with pytest.raises(LmselectError, match="0 <= I < N"):
        pt.parse_task("8/8")


def test_hf_dataset_row_ranges_keep_ids(tmp_path):
    """A datasets folder read as row ranges gives the documents (and ids) of reading it whole."""
    import datasets

    from lmselect.data.readers import InputSpec, iter_documents

    datasets.Dataset.from_list([{"text": f"row {i}"} for i in range(23)]).save_to_disk(str(tmp_path / "ds"))
    whole = [(d.doc_id, d.text) for d in iter_documents([InputSpec(str(tmp_path / "ds"), "hf_disk")])]
    parts = [InputSpec(str(tmp_path / "ds"), "hf_disk", start=a, stop=b) for a, b in ((0, 5), (5, 17), (17, 23))]
    assert [(d.doc_id, d.text) for d in iter_documents(parts)] == whole
    assert whole[5] == ("ds/5", "row 5")  # readers.ID_RULE: <file>/<0-based row> in the whole split
    json.dumps(whole)


def test_a_task_error_is_one_line(tmp_path, capfd, tok_dir):
    """--strict and a malformed line in the second of two tasks (a datatrove worker process): one line naming the
    file and line, exit 2, no pool; the other task's part stays for the rerun."""
    from datatrove.utils.logging import setup_default_logger

    setup_default_logger()  # loguru's sink onto this test's stderr (an earlier test's captured stream is closed)
    d = tmp_path / "c"
    d.mkdir()
    a = write_jsonl(d / "a.jsonl", clean_records(30, "a"))
    b = write_jsonl(d / "b.jsonl", clean_records(5, "b") + ["{broken"])
    out = tmp_path / "pool"
    rc = main(["prepare", str(a), str(b), "--out", str(out), "--tokenizer", tok_dir, "--seq-len", "16", "--n-shards",
               "2", "--tasks", "2", "--strict", "--no-progress"])
    err = capfd.readouterr().err.strip().splitlines()  # every process: datatrove's progress lines, then ours
    assert rc == 2 and f"{b}:6: invalid JSON" in err[-1] and err[-1].startswith("lmselect prepare: error: "), err
    assert not any("Traceback" in x for x in err), "\n".join(err)
    assert not out.exists()
    assert (pt.work_dir(out) / "parts" / "00000" / pt.PART_MARKER).is_file()


def test_tasks_keep_where_documents_come_from(tmp_path, monkeypatch):
    """The merge of issue 29's origins: with C4 editing lines out of documents in every task, 3 tasks give the
    doc_origins.parquet (and docs.parquet's `doc` column) of one process, byte for byte, and every origin row points
    at its own record in the reader's whole stream (the parts' stream positions made global), with `edited` true
    exactly where C4 changed the text."""
    import pyarrow.parquet as pq

    from lmselect.data.prepare import ORIGINS_FILE
    from lmselect.data.readers import reread_documents

    monkeypatch.setattr(pt, "MERGE_CHUNK_DOCS", 5)
    inputs = _corpus(tmp_path / "corpus")
    junk = [{"id": f"j{i}", "text": "\n".join(SENTENCES[(i + k) % 6] for k in range(3)) + "\nHome | About | Contact"}
            for i in range(12)]
    inputs.insert(2, str(write_jsonl(tmp_path / "corpus" / "junk.jsonl", junk)))
    one, _ = prepare_pool(_cfg(inputs, tasks=1, prefilter=["c4"]), tmp_path / "one", progress=False)
    three, _ = prepare_pool(_cfg(inputs, tasks=3, prefilter=["c4"]), tmp_path / "three", progress=False)
    _same_pool(one, three)
    origins = pq.read_table(three / ORIGINS_FILE).to_pylist()
    pool = TokenPool(three)
    assert [r["doc"] for r in origins] == list(range(pool.manifest["counts"]["documents"]))
    docs = pool.doc_spans().column("doc").to_pylist()  # global numbers, in stream order, every packed document
    assert docs == sorted(docs) and sorted(set(docs)) == list(range(len(set(docs))))
    stream = {d.index: d for d in reread_documents(pool.manifest["config"], pool.manifest["extra"]["inputs"], "t")}
    assert all(stream[r["index"]].doc_id == r["doc_id"] for r in origins)
    edited = {r["doc_id"] for r in origins if r["edited"]}
    assert edited == {f"j{i}" for i in range(12)}  # C4 removed the junk line of each, nothing else


def test_bpe_sample_is_not_prefiltered_twice(tmp_path, monkeypatch):
    """Training the BPE reads the prefiltered stream once; task 0 (whose stream the sample begins) reuses those
    decisions, so with the whole corpus in the sample every document meets the filter once."""
    from datatrove.pipeline.filters import GopherRepetitionFilter

    calls = []
    real = GopherRepetitionFilter.filter

    def counted(self, doc):
        calls.append(doc.id)
        return real(self, doc)

    monkeypatch.setattr(GopherRepetitionFilter, "filter", counted)
    d = tmp_path / "c"
    d.mkdir()
    inputs = [str(write_jsonl(d / "a.jsonl", clean_records(30, "a"))), str(write_jsonl(d / "s.jsonl", spam_records(9)))]
    cfg = PrepareConfig(inputs=inputs, vocab_size=300, seq_len=16, n_shards=2, workers=1, tasks=1,
                        prefilter=["gopher_repetition"])
    out, _ = prepare_pool(cfg, tmp_path / "pool", progress=False)
    m = read_json(out / "manifest.json")
    assert len(calls) == m["extra"]["prefilter"]["documents"] == 39
    assert m["extra"]["prefilter"]["dropped"] > 0
