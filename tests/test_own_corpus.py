"""Regression (issue 29, items 1, 3 and 4): the own-corpus walk round-trips every record's original text and score.

A folder of .jsonl / .jsonl.zst parts with records without a usable id (missing, null, ""), bad JSON, a record
without text, a blank line and a stray file is prepared with the recommended prefilter (C4 edits lines out of some
documents), a selection of it is exported, the folder is scored with ``score --jsonl``, and then:

* every exported row's ``text`` is the original record's text at ``char_start:char_end``, byte for byte (the
  whole record when ``complete``), with and without the prefilter; ``edited`` says which documents C4 changed, and
  ``--text both`` adds the text the methods saw as ``pool_text``;
* export rows, ``documents.parquet`` rows, the prefilter's dropped list and datatrove's reader (through
  ``lmselect_adapter``) all join by one id;
* prepare reads the folder as ``score --jsonl`` does (every part; the stray file named in a warning).
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import zstandard

from lmselect.artifacts import parent_ref
from lmselect.cli import main
from lmselect.data.pool import TokenPool
from lmselect.score import read_documents, write_scores

LINES = [
    "The committee met on Tuesday to discuss the budget for the coming year and the plans of the town.",
    "Rain is expected in the north of the country, with sunshine in the south later in the day.",
    "She opened the door to the garden and saw that the whole lawn was covered with fresh snow.",
    "A language model predicts the next token from the tokens that come before it in the text.",
    "The old bridge over the river was closed for repairs after the storm damaged two of its arches.",
    "Selecting good pretraining data can lower the validation loss of the model that is trained on it.",
    "Farmers in the valley harvested the grapes early because the summer had been unusually warm.",
    "The library extended its opening hours so that students could study late during the exams.",
]
JUNK = ["Home | About | Contact", "   cookie settings", "Share this", "12:45 PM"]  # C4 (TFDS) removes these lines


def _text(i: int, junk: bool) -> str:
    body = [LINES[(i + k) % len(LINES)] for k in range(2 + i % 4)] + [f"This is the record number {i} of the corpus."]
    if junk:  # junk lines in the middle and at the end, indentation kept: C4 edits them out, the record keeps them
        body.insert(1, JUNK[i % len(JUNK)])
        body.append(JUNK[(i + 1) % len(JUNK)])
        body[0] = "  " + body[0]
    return "\n".join(body)


def _corpus(root: Path) -> tuple[Path, list[tuple[str, int, str]]]:
    """my_corpus/ with two parts and a stray file; returns the folder and (file, 0-based line, raw line) of every line."""
    folder = root / "my_corpus"
    folder.mkdir()
    parts: dict[str, list[str]] = {"part-0000.jsonl.zst": [], "part-0001.jsonl": []}
    for i in range(24):
        name = "part-0000.jsonl.zst" if i < 12 else "part-0001.jsonl"
        rec: dict = {"text": _text(i, junk=i % 3 == 0)}
        if i % 4 == 1:
            pass  # no id key
        elif i % 4 == 2:
            rec["id"] = None if i % 8 == 2 else ""
        else:
            rec["id"] = f"doc-{i}" if i != 7 else 7  # one numeric id
        parts[name].append(json.dumps(rec))
        if i == 4:
            parts[name] += ["", '{"id": "broken", "text": ', json.dumps({"id": "no-text"})]
        if i == 15:
            parts[name].append(json.dumps({"text": "Too short."}))  # C4 drops it: too few sentences, no id
    lines = []
    for name, recs in parts.items():
        raw = ("\n".join(recs) + "\n").encode()
        (folder / name).write_bytes(zstandard.ZstdCompressor().compress(raw) if name.endswith(".zst") else raw)
        lines += [(name, k, r) for k, r in enumerate(recs)]
    (folder / "notes.md").write_text("not a corpus file\n")
    return folder, lines


def _originals(lines: list[tuple[str, int, str]]) -> dict[str, str]:
    """Oracle: each record's id under the documented rule -> its text, straight from the raw lines."""
    out = {}
    for name, k, raw in lines:
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec.get("text"), str):
            continue
        rid = rec.get("id")
        key = f"{name}/{k}" if rid is None or rid == "" else (rid if isinstance(rid, str) else json.dumps(rid))
        out[key] = rec["text"]
    return out


def _select(tmp: Path, pool: Path, fraction: float = 0.7) -> Path:
    p = TokenPool(pool)
    ids = p.ids(None)
    scores = np.random.default_rng(3).normal(size=len(ids)).astype(np.float32)
    sc = write_scores(tmp / "scores-sel", ids, scores, parents=[parent_ref(pool)])
    assert main(["select", "--scores", str(sc), "--fraction", str(fraction), "--out", str(tmp / "sel")]) == 0
    return tmp / "sel"


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in gzip.decompress(path.read_bytes()).splitlines()]


@pytest.mark.parametrize("prefilter,tasks", [("gopher_repetition,c4", "2"), ("none", "1")])
def test_export_gives_back_the_original_records(tmp_path, prefilter, tasks, caplog):
    """(With the prefilter the pool is made by 2 prepare tasks, one per part, and their merge: issue 31.)"""
    folder, lines = _corpus(tmp_path)
    originals = _originals(lines)
    pool = tmp_path / "pool"
    with caplog.at_level(logging.WARNING, logger="lmselect"):
        assert main(["prepare", str(folder), "--out", str(pool), "--seq-len", "128", "--n-shards", "2",
                     "--vocab-size", "300", "--prefilter", prefilter, "--tasks", tasks, "--no-progress"]) == 0
    # item 4: the folder's parts are read (not "empty corpus"), the stray file is named
    assert any("notes.md" in r.getMessage() and "skipped 1 file" in r.getMessage() for r in caplog.records)
    p = TokenPool(pool)
    assert p.manifest["extra"]["tasks"] == int(tasks)
    assert p.manifest["counts"]["documents"] == len(originals) - (1 if prefilter != "none" else 0)
    # item 3: pool doc ids follow the one rule (missing, null and "" ids alike)
    assert set(p.doc_spans().column("doc_id").to_pylist()) <= set(originals)
    assert "part-0000.jsonl.zst/1" in set(p.doc_spans().column("doc_id").to_pylist())
    out = tmp_path / "export"
    assert main(["export", str(_select(tmp_path, pool)), "--out", str(out), "--text", "both"]) == 0
    rows = _rows(out / "documents.jsonl.gz")
    assert rows and any(not r["complete"] for r in rows)
    for r in rows:  # item 1: byte for byte against the input record
        orig = originals[r["doc_id"]]
        assert r["text"] == orig[r["char_start"] : r["char_end"]]
        if r["complete"]:
            assert r["text"] == orig
        assert r["edited"] == (prefilter != "none" and any(j.strip() in orig for j in JUNK))
        for seg in r["pool_text"].split("\n"):  # what the methods saw lies inside the exported original passage
            assert seg in r["text"]
        if not r["edited"]:
            assert r["pool_text"] == r["text"]
    if prefilter != "none":
        assert any(r["edited"] and r["complete"] for r in rows) and any(r["edited"] and not r["complete"] for r in rows)
        # the dropped list uses the same ids, and --dropped gives back their original text
        dropped = tmp_path / "dropped"
        assert main(["export", str(pool), "--dropped", "--out", str(dropped)]) == 0
        drows = _rows(dropped / "dropped.jsonl.gz")
        assert [d["id"] for d in drows] == ["part-0001.jsonl/4"]
        assert all(originals[d["id"]] == d["text"] for d in drows)


def test_export_score_dropped_and_datatrove_join_by_one_id(tmp_path, caplog):
    from lmselect.data.tokenizer import load_tokenizer, tokenizer_fingerprint
    from lmselect.models.presets import build_model
    from lmselect.models.scorer import SequenceScorer

    folder, lines = _corpus(tmp_path)
    originals = _originals(lines)
    pool = tmp_path / "pool"
    assert main(["prepare", str(folder), "--out", str(pool), "--seq-len", "128", "--n-shards", "2",
                 "--vocab-size", "300", "--prefilter", "gopher_repetition,c4", "--no-progress"]) == 0
    tok = load_tokenizer(pool / "tokenizer")
    sdir = tmp_path / "scorer"
    SequenceScorer.from_causal_lm(build_model("debug", len(tok), seed=0), activation="identity", seed=0) \
        .save_pretrained(sdir, extra={"tokenizer_fingerprint": tokenizer_fingerprint(tok)})
    scores = tmp_path / "scores"
    assert main(["score", "--model", str(sdir), "--jsonl", str(folder), "--tokenizer-from", str(pool),
                 "--seq-len", "16", "--out", str(scores), "--no-progress"]) == 0
    docs = [d for d in read_documents(scores).to_pylist() if not d["blank"] and not d["malformed"]]
    by_id = {d["doc_id"]: d for d in docs}
    assert set(by_id) == set(originals)  # every record, keyed by the same rule
    out = tmp_path / "export"
    assert main(["export", str(_select(tmp_path, pool)), "--out", str(out)]) == 0
    for r in _rows(out / "documents.jsonl.gz"):  # export rows join score rows by id, and the texts agree
        d = by_id[r["doc_id"]]
        assert d["n_chars"] == len(originals[r["doc_id"]]) and np.isfinite(d["score"])
    assert main(["export", str(pool), "--dropped", "--out", str(tmp_path / "dropped")]) == 0
    for d in _rows(tmp_path / "dropped" / "dropped.jsonl.gz"):
        assert d["id"] in by_id
    # dolma's rule on the attribute files: line i of the attribute file belongs to line i of the document file
    for name in ("part-0000.jsonl.zst", "part-0001.jsonl"):
        raw = (folder / name).read_bytes()
        doc_lines = (zstandard.ZstdDecompressor().decompressobj().decompress(raw) if name.endswith(".zst")
                     else raw).decode().split("\n")[:-1]
        araw = (scores / "attributes" / "lmselect" / name).read_bytes()
        attr_lines = (zstandard.ZstdDecompressor().decompressobj().decompress(araw) if name.endswith(".zst")
                      else araw).decode().split("\n")[:-1]
        assert len(attr_lines) == len(doc_lines)
        for k, (dl, al) in enumerate(zip(doc_lines, attr_lines)):
            a = json.loads(al)
            try:
                rec = json.loads(dl)
            except json.JSONDecodeError:
                continue
            assert a["id"] == rec.get("id")
            if isinstance(rec.get("text"), str):
                key = f"{name}/{k}" if rec.get("id") in (None, "") else str(rec["id"])
                assert a["attributes"]["lmselect__score"][0][2] == pytest.approx(by_id[key]["score"], rel=1e-6)


def test_datatrove_reader_with_lmselect_adapter_gives_the_same_ids(tmp_path):
    """datatrove's JsonlReader numbers lines from 0, blank ones included, and names files relative to its folder;
    its default adapter derives an id only for a missing key; lmselect_adapter applies the rule to null and ""."""
    pytest.importorskip("orjson")  # datatrove's JsonlReader needs it
    from datatrove.pipeline.readers import JsonlReader

    from lmselect.integrations.datatrove import lmselect_adapter

    folder, lines = _corpus(tmp_path)
    originals = _originals(lines)
    read = {d.id: d.text for d in JsonlReader(str(folder), glob_pattern="*.jsonl*", adapter=lmselect_adapter).run()}
    assert read == originals
    plain = {d.text: d.id for d in JsonlReader(str(folder), glob_pattern="*.jsonl*").run()}
    assert plain[originals["part-0000.jsonl.zst/1"]] == "part-0000.jsonl.zst/1"  # missing id: datatrove's own form


def test_lmselect_adapter_on_datatrove_default_adapter():
    """The same check without datatrove's file reading (which needs orjson): datatrove's own adapter, called as its
    readers call it, agrees with the rule for a missing id, and lmselect_adapter extends it to null and ""."""
    from datatrove.pipeline.readers.base import BaseReader

    from lmselect.integrations.datatrove import lmselect_adapter

    class R:  # the two attributes the adapters read, as a BaseReader sets them
        text_key, id_key = "text", "id"
        _default_adapter = BaseReader._default_adapter

    r = R()
    assert BaseReader._default_adapter(r, {"text": "a"}, "sub/p.jsonl", 3)["id"] == "sub/p.jsonl/3"
    for raw in ({"text": "a"}, {"text": "a", "id": None}, {"text": "a", "id": ""}):
        assert lmselect_adapter(r, dict(raw), "sub/p.jsonl", 3)["id"] == "sub/p.jsonl/3"
    assert lmselect_adapter(r, {"text": "a", "id": 7}, "p.jsonl", 0)["id"] == "7"
    assert lmselect_adapter(r, {"text": "a", "id": "x"}, "p.jsonl", 0)["id"] == "x"


def test_a_folder_means_the_same_everywhere(tmp_path, caplog):
    """prepare, score --jsonl and decontamination read a folder by one rule (readers.folder_files) and name what
    they skip; before, prepare read only .txt from a folder (\"empty corpus\") and the others skipped silently."""
    from lmselect.data.decontam import _resolve_entry
    from lmselect.data.readers import resolve_inputs
    from lmselect.score.windows import resolve_jsonl_inputs

    folder, _ = _corpus(tmp_path)
    (folder / "extra.txt").write_text("A plain text document with enough words to count.\n")
    with caplog.at_level(logging.WARNING, logger="lmselect"):
        kinds = [(Path(s.path).name, s.kind, s.rel) for s in resolve_inputs([str(folder)])]
        jsonl = [rel for _, rel in resolve_jsonl_inputs(folder)]
        protected = [Path(f).name for _, f in _resolve_entry(str(folder))]
    assert kinds == [("my_corpus", "text", None), ("part-0000.jsonl.zst", "jsonl", "part-0000.jsonl.zst"),
                     ("part-0001.jsonl", "jsonl", "part-0001.jsonl")]
    assert jsonl == ["part-0000.jsonl.zst", "part-0001.jsonl"]
    assert protected == ["extra.txt", "part-0000.jsonl.zst", "part-0001.jsonl"]
    msgs = [r.getMessage() for r in caplog.records]
    assert any("prepare: skipped 1 file" in m and "notes.md" in m for m in msgs)
    assert any("score --jsonl: skipped 2 file" in m and "extra.txt, notes.md" in m for m in msgs)
    assert any("decontaminate: skipped 1 file" in m and "notes.md" in m for m in msgs)


def test_readme_walk_with_a_run(tmp_path):
    """The walk as the README gives it: prepare the folder with the prefilter, `lmselect run` a recipe with
    pool.path, `lmselect export` the run: every exported row is its input record's original text."""
    import yaml

    from lmselect.testing import make_tiny_recipe

    folder, lines = _corpus(tmp_path)
    originals = _originals(lines)
    pool = tmp_path / "pool"
    assert main(["prepare", str(folder), "--out", str(pool), "--seq-len", "32", "--n-shards", "3",
                 "--val-sequences", "4", "--vocab-size", "300", "--prefilter", "gopher_repetition,c4",
                 "--no-progress"]) == 0
    recipe = make_tiny_recipe(tmp_path / "r")
    r = yaml.safe_load(recipe.read_text())
    r["pool"] = {"path": str(pool)}
    r["methods"], r["rounds"] = ["random"], 1
    recipe.write_text(yaml.safe_dump(r))
    run = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(run), "--no-report"]) == 0
    out = tmp_path / "exported"
    assert main(["export", str(run), "--out", str(out)]) == 0
    rows = _rows(out / "random" / "seed0" / "round1" / "documents.jsonl.gz")
    assert rows and any(r["edited"] for r in rows)
    for row in rows:
        orig = originals[row["doc_id"]]
        assert row["text"] == orig[row["char_start"] : row["char_end"]]
        assert not row["complete"] or row["text"] == orig
