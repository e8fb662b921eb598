"""Document scores join in dolma and datatrove (issue 21, item 1): ``score --jsonl`` on a folder or glob of files named
as dolma names them (``x.json.gz``, ``.jsonl.zst``, sub-folders), with ids that are strings, numbers, null or missing.

dolma (checked against its source, allenai/dolma at 669f534823b08d266a8fff01f8a1c916a5a56576; the wheel's
dependency resolution did not finish here, so the rule is stated rather than run):

* ``src/shard.rs`` lines 52-53 (and 143-144): the attribute file of a document file is found by substituting the
  path, ``input.replace("/documents/", "/attributes/<name>/")``: same relative path, same file name.
* ``src/io.rs`` lines 147-163 (``infer_compression``): the decompressor is chosen by the file name's extension.
* ``src/shard.rs`` lines 298-306: line i of the attribute file belongs to line i of the document file, and
  ``attr_data["id"] != data["id"]`` (serde_json values; a missing key reads as null) stops the mix with
  "Mismatched ids for line ...".

datatrove 0.10.1 (installed, run for real): ``JsonlReader`` gives a record without an ``id`` key the id
``f"{path}/{line index}"`` (``pipeline/readers/base.py``, ``_default_adapter``), which is what documents.parquet
derives for records without an id.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zstandard

from lmselect.cli import main
from lmselect.score import read_documents

CC = [  # a CC-like shard: string ids, null ids (as in 30 of 70 real CC samples), one numeric id, one missing id
    {"id": "<urn:uuid:5c1f>", "text": "Buy cheap tickets for concerts and games near you today.", "url": "a.example"},
    {"id": None, "text": "The council approved the new cycling lanes after a long public debate."},
    {"id": 1234, "text": "Recipe: mix the flour and butter, then add two eggs and bake for twenty minutes."},
    {"text": "Click here to subscribe to our newsletter and win a prize."},
    {"id": None, "text": "Researchers measured river temperatures over ten summers."},
]
WIKI = [
    {"id": "wiki-1", "text": "The Danube flows through ten countries before reaching the Black Sea."},
    {"text": "Basalt is a fine-grained volcanic rock formed from rapidly cooled lava."},
]


def _lines(recs: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in recs).encode()


def _dataset(root: Path) -> Path:
    """``root/documents/`` with a dolma-named gzip shard and a zstd file in a sub-folder."""
    docs = root / "documents"
    (docs / "sub").mkdir(parents=True)
    (docs / "cc-0000.json.gz").write_bytes(gzip.compress(_lines(CC)))
    (docs / "sub" / "wiki.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_lines(WIKI)))
    return docs


def _read(path: Path) -> list[dict]:
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        raw = gzip.decompress(raw)
    elif path.name.endswith(".zst"):
        raw = zstandard.ZstdDecompressor().stream_reader(path.open("rb")).read()
    return [json.loads(x) for x in raw.splitlines() if x.strip()]


def _score(scorer_dir: Path, jsonl: str, pool: Path, out: Path) -> int:
    return main(["score", "--model", str(scorer_dir), "--jsonl", jsonl, "--tokenizer-from", str(pool), "--seq-len",
                 "8", "--attribute-name", "quality", "--out", str(out), "--no-progress"])


def test_attributes_satisfy_dolmas_mixer_rule(tmp_path, tiny_pool, scorer_dir):
    docs = _dataset(tmp_path / "data")
    out = tmp_path / "scores"
    assert _score(scorer_dir, str(docs), tiny_pool.path, out) == 0
    # the sidecar mirrors the input names (extension and compression included) under attributes/<name>/
    assert sorted(p.relative_to(out / "attributes" / "quality").as_posix()
                  for p in (out / "attributes" / "quality").rglob("*") if p.is_file()) == [
        "cc-0000.json.gz", "sub/wiki.jsonl.zst"]
    # placed beside documents/ as dolma expects, every document file finds its attribute file by dolma's
    # substitution, and every line's id equals the document line's id as a JSON value (missing reads as null)
    shutil.copytree(out / "attributes", tmp_path / "data" / "attributes")
    for doc_file in sorted(p for p in docs.rglob("*") if p.is_file()):
        attr_file = Path(str(doc_file).replace("/documents/", "/attributes/quality/"))
        doc_lines, attr_lines = _read(doc_file), _read(attr_file)
        assert len(doc_lines) == len(attr_lines)
        for d, a in zip(doc_lines, attr_lines):
            assert a["id"] == d.get("id") and isinstance(a["attributes"], dict)
            assert a["attributes"]["quality__score"][0][1] == len(d["text"])  # a span over the whole text


def test_glob_input_and_datatrove_join_by_id(tmp_path, tiny_pool, scorer_dir, caplog):
    from datatrove.pipeline.readers import JsonlReader

    docs = _dataset(tmp_path / "data")
    out = tmp_path / "scores"
    assert _score(scorer_dir, str(docs / "**" / "*.*"), tiny_pool.path, out) == 0  # a glob, relative to documents/
    table = read_documents(out)
    scores = {d["doc_id"]: d["score"] for d in table.to_pylist()}
    assert len(scores) == len(CC) + len(WIKI)  # every row has a distinct key, null ids included
    assert sum(table.column("id_derived").to_pylist()) == 4
    assert any("have no id" in r.getMessage() for r in caplog.records)

    def or_derived(self, data: dict, path: str, id_in_file: int | str) -> dict:
        """datatrove's default adapter, except that a null id is treated like a missing one."""
        return {"text": data.pop(self.text_key, ""), "id": data.pop(self.id_key, None) or f"{path}/{id_in_file}",
                "metadata": data}

    read = list(JsonlReader(str(docs), adapter=or_derived).run())
    assert len(read) == len(CC) + len(WIKI)
    for doc in read:  # every document read by datatrove joins its score by id
        assert str(doc.id) in scores, doc.id  # doc_id is a string: a numeric id 1234 is "1234"
    # datatrove's own default adapter agrees for records without an id key
    plain = {d.text: d.id for d in JsonlReader(str(docs)).run()}
    assert scores[plain[CC[3]["text"]]] == pytest.approx(table.to_pylist()[3]["score"])
    assert plain[WIKI[1]["text"]] == "sub/wiki.jsonl.zst/1"


def test_select_on_scores_of_a_folder_writes_the_original_lines(tmp_path, tiny_pool, scorer_dir):
    docs = _dataset(tmp_path / "data")
    out = tmp_path / "scores"
    assert _score(scorer_dir, str(docs), tiny_pool.path, out) == 0
    assert main(["select", "--scores", str(out), "--fraction", "0.5", "--out", str(tmp_path / "sel")]) == 0
    table = read_documents(out).to_pylist()
    chosen = sorted(int(i) for i in np.load(tmp_path / "sel" / "selected.npy"))
    raw = {"cc-0000.json.gz": _lines(CC).splitlines(), "sub/wiki.jsonl.zst": _lines(WIKI).splitlines()}
    want = [raw[table[i]["file"]][table[i]["line"] - 1] for i in chosen]  # file order, then line order
    assert gzip.decompress((tmp_path / "sel" / "selected.jsonl.gz").read_bytes()).splitlines() == want
    assert {table[i]["file"] for i in chosen} == set(raw)  # both files contribute at fraction 0.5
