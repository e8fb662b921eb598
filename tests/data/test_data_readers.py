"""Readers: every input format, default ids / sources, malformed-record policy and input errors."""

from __future__ import annotations

import pytest
from corpus_helpers import write_jsonl

from lmselect.artifacts import LmselectError
from lmselect.data.readers import ReadStats, input_fingerprint, iter_documents, resolve_inputs

RECS = [{"text": "first doc", "id": "a"}, {"text": "second doc", "source": "news"}, {"text": "third doc"}]


def read(inputs, **kw):
    stats = ReadStats()
    docs = list(iter_documents(resolve_inputs(inputs), stats=stats, **kw))
    return docs, stats


@pytest.mark.parametrize("compress,suffix", [("", ".jsonl"), ("gz", ".jsonl.gz"), ("zst", ".jsonl.zst")])
def test_jsonl_formats(tmp_path, compress, suffix):
    p = write_jsonl(tmp_path / f"wiki{suffix}", RECS, compress)
    docs, stats = read([str(p)])
    assert [d.text for d in docs] == ["first doc", "second doc", "third doc"]
    # id kept when present, else "<file name>/<0-based line>" (readers.ID_RULE); source kept, else the file stem
    assert [d.doc_id for d in docs] == ["a", f"wiki{suffix}/1", f"wiki{suffix}/2"]
    assert [d.source for d in docs] == ["wiki", "news", "wiki"]
    assert stats.documents == 3 and stats.n_skipped == 0


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "web.parquet"
    pq.write_table(pa.table({"content": ["x one", None, "x three"], "id": ["i1", "i2", "i3"], "other": [1, 2, 3]}), p)
    docs, stats = read([str(p)], text_field="content")
    assert [(d.text, d.doc_id, d.source) for d in docs] == [("x one", "i1", "web"), ("x three", "i3", "web")]
    assert stats.skipped["no_text_field"] == 1
    with pytest.raises(LmselectError, match=r"web\.parquet: no 'text' column \(columns: content, id, other\)"):
        read([str(p)])


def test_text_folder(tmp_path):
    d = tmp_path / "essays"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("essay b")
    (d / "sub" / "a.txt").write_text("essay a")
    (d / "ignored.md").write_text("not a txt")
    (d / "bad.txt").write_bytes(b"\xff\xfe not utf8")
    docs, stats = read([str(d)])
    assert [(d_.text, d_.doc_id, d_.source) for d_ in docs] == [("essay b", "b.txt", "essays"), ("essay a", "sub/a.txt", "essays")]
    assert stats.skipped["bad_utf8"] == 1
    with pytest.raises(LmselectError, match=r"bad\.txt: not valid UTF-8"):
        read([str(d)], strict=True)
    # a single .txt file is one document whose source is its stem
    docs, _ = read([str(d / "b.txt")])
    assert [(x.text, x.source) for x in docs] == [("essay b", "b")]


def test_load_from_disk_dataset_and_dict(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["alpha", "beta"], "id": ["x", "y"], "label": [0, 1]})
    ds.save_to_disk(str(tmp_path / "hfds"))
    docs, _ = read([str(tmp_path / "hfds")])
    assert [(d.text, d.doc_id, d.source) for d in docs] == [("alpha", "x", "hfds"), ("beta", "y", "hfds")]

    dd = datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_dict({"text": ["gamma"]})})
    dd.save_to_disk(str(tmp_path / "hfdict"))
    assert [d.text for d in read([str(tmp_path / "hfdict")])[0]] == ["alpha", "beta"]  # default split: train
    assert [d.text for d in read([str(tmp_path / "hfdict") + "#test"])[0]] == ["gamma"]
    with pytest.raises(LmselectError, match=r"hfdict: choose a split .*splits: train, test"):
        read([str(tmp_path / "hfdict") + "#dev"])


def test_hub_dataset_offline_error(monkeypatch):
    import datasets

    def offline(*a, **k):  # never touch the network in tests
        raise ConnectionError("Couldn't reach 'owner/corpus' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    specs = resolve_inputs(["hf:owner/corpus#validation"])
    assert (specs[0].kind, specs[0].path, specs[0].split) == ("hub", "owner/corpus", "validation")
    with pytest.raises(LmselectError) as e:
        list(iter_documents(specs))
    msg = str(e.value)
    assert msg.startswith("hf:owner/corpus: cannot load Hugging Face dataset (offline mode is on") and "\n" not in msg


def test_malformed_records_skipped_and_counted(tmp_path):
    p = write_jsonl(
        tmp_path / "mix.jsonl",
        [{"text": "ok one"}, "{not json", {"body": "no text"}, '["a list"]', {"text": 7}, {"text": "   "}, "", {"text": "ok two"}],
    )
    p.write_bytes(p.read_bytes() + b'{"text": "\xff bad byte"}\n{"text": "ok three"}\n')
    docs, stats = read([str(p)])
    assert [d.text for d in docs] == ["ok one", "ok two", "ok three"]
    assert dict(stats.skipped) == {"bad_json": 1, "no_text_field": 1, "not_an_object": 1, "text_not_string": 1, "bad_utf8": 1}
    assert stats.empty == 1 and stats.skipped_by_file[str(p)] == 5
    assert stats.examples[-1] == f"{p}:9: not valid UTF-8 (byte 10)"
    assert stats.examples[0].startswith(f"{p}:2: invalid JSON")
    assert stats.examples[1] == f"{p}:3: record has no 'text' field"


@pytest.mark.parametrize(
    "line,expected",
    [
        ("{not json", r"mix\.jsonl:2: invalid JSON"),
        ('{"body": 1}', r"mix\.jsonl:2: record has no 'text' field"),
        ('{"text": 3}', r"mix\.jsonl:2: record field 'text' is a int, not a string"),
    ],
)
def test_strict_makes_malformed_fatal(tmp_path, line, expected):
    p = write_jsonl(tmp_path / "mix.jsonl", [{"text": "fine"}, line])
    with pytest.raises(LmselectError, match=expected) as e:
        read([str(p)], strict=True)
    assert "\n" not in str(e.value)


def test_input_errors(tmp_path):
    with pytest.raises(LmselectError, match=r"nope\.jsonl: input not found"):
        resolve_inputs([str(tmp_path / "nope.jsonl")])
    with pytest.raises(LmselectError, match=r"\*\.jsonl: no file matches this pattern"):
        resolve_inputs([str(tmp_path / "*.jsonl")])
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(LmselectError, match=r"data\.csv: unsupported input format"):
        resolve_inputs([str(tmp_path / "data.csv")])
    (tmp_path / "trunc.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(LmselectError, match=r"trunc\.jsonl\.gz:1: cannot read compressed data"):
        read([str(tmp_path / "trunc.jsonl.gz")])


def test_glob_order_max_docs_and_fingerprint(tmp_path):
    import hashlib

    write_jsonl(tmp_path / "b.jsonl", [{"text": "b1"}, {"text": "b2"}])
    write_jsonl(tmp_path / "a.jsonl", [{"text": "a1"}])
    docs, _ = read([str(tmp_path / "*.jsonl")])
    assert [d.text for d in docs] == ["a1", "b1", "b2"]  # globs expand sorted
    assert [d.text for d in read([str(tmp_path / "*.jsonl")], max_docs=2)[0]] == ["a1", "b1"]
    fp = input_fingerprint(resolve_inputs([str(tmp_path / "a.jsonl")])[0])
    raw = (tmp_path / "a.jsonl").read_bytes()
    assert fp["sha256"] == hashlib.sha256(raw).hexdigest() and fp["bytes"] == len(raw)
