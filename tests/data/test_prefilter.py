"""Prefilter: each datatrove filter's wiring on tiny documents, the counts, the dropped-documents sidecar, bad input."""

from __future__ import annotations

import json
import logging

import pytest
from corpus_helpers import write_jsonl

from lmselect.artifacts import LmselectError
from lmselect.cli import main
from lmselect.config import ConfigError, config_hash, to_dict
from lmselect.data.pool import TokenPool
from lmselect.data.prefilter import DROPPED_FILE, FILTERS, Prefilter, normalize_names, prefilter_report, read_dropped
from lmselect.data.prepare import PrepareConfig, pool_config_hash, prepare
from lmselect.data.readers import Document

PROSE = [
    "The committee met on Tuesday to discuss the budget for the coming year and the plans of the town.",
    "Rain is expected in the north of the country, with sunshine in the south later in the day.",
    "She opened the door to the garden and saw that the whole lawn was covered with fresh snow.",
    "A language model predicts the next token from the tokens that come before it in the text.",
    "The old bridge over the river was closed for repairs after the storm damaged two of its arches.",
    "Selecting good pretraining data can lower the validation loss of the model that is trained on it.",
]
GOOD = "\n".join(PROSE)  # six lines, each a sentence of >= 16 words ending in a full stop: every filter keeps it


def _one(name: str, text: str):
    return Prefilter([name]).apply(text, "d")


@pytest.mark.parametrize("name", list(FILTERS))
def test_every_filter_keeps_clean_prose(name):
    fname, reason, text = _one(name, GOOD)
    assert (fname, reason) == (None, None) and text == GOOD


def test_gopher_repetition_drops_a_repeated_paragraph():
    assert _one("gopher_repetition", "\n\n".join([PROSE[0]] * 8))[:2] == ("gopher_repetition", "dup_para_frac")
    # the same sentence repeated on one line (the check's planted_repeated): caught by the n-gram rules
    fname, reason, _ = _one("gopher_repetition", " ".join([PROSE[1]] * 8))
    assert fname == "gopher_repetition" and reason.startswith(("top_", "duplicated_"))


def test_gopher_quality_rules():
    assert _one("gopher_quality", PROSE[0])[:2] == ("gopher_quality", "gopher_short_doc")  # < 50 words
    symbols = " ".join(["#tag"] * 30) + " " + GOOD
    assert _one("gopher_quality", symbols)[:2] == ("gopher_quality", "gopher_too_many_hashes")


def test_c4_presets_differ_in_the_tfds_constants():
    four_words = "Short lines are dropped."  # 4 words: under TFDS's 5, over datatrove's 3
    text = "\n".join(PROSE[:4] + [four_words, "a line without an end mark"])
    fname, _, kept = _one("c4", text)  # TFDS: 5 words per line, 3 sentences: 4 sentences pass, two lines edited out
    assert fname is None and kept == "\n".join(PROSE[:4])
    fname, _, kept = _one("c4_datatrove", text)  # datatrove: 3 words per line (keeps the short line), 5 sentences
    assert fname is None and kept == "\n".join(PROSE[:4] + [four_words])
    three = "\n".join(PROSE[:3])
    assert _one("c4", three)[0] is None
    assert _one("c4_datatrove", three)[:2] == ("c4_datatrove", "too_few_sentences")
    assert _one("c4", GOOD + "\nvar x = {a: 1};")[0] is None  # no end mark: the line goes, the page stays
    assert _one("c4", GOOD + "\nThe object {a: 1} is a literal.")[:2] == ("c4", "curly_bracket")


def test_fineweb_quality_drops_unpunctuated_lines():
    lists = "\n".join(f"item number {i} of the list" for i in range(20))
    assert _one("fineweb_quality", lists)[:2] == ("fineweb_quality", "line_punct_ratio")


def test_empty_and_emptied_documents_are_dropped_without_a_traceback():
    from datatrove.pipeline.filters import C4QualityFilter

    for name in FILTERS:  # datatrove's repetition filter divides by the text length: never called on ""
        assert _one(name, "")[:2] == (name, "empty")
        assert _one(name, "  \n ")[:2] == (name, "empty")
    pre = Prefilter(["c4", "gopher_repetition"])
    pre.filters[0] = ("c4", C4QualityFilter(min_num_sentences=-1))  # no sentence minimum: a page can be emptied
    assert pre.apply("no end mark here\nnor here", "x")[:2] == ("c4", "emptied")


def test_names_unknown_repeated_and_none():
    assert normalize_names("none") == [] and normalize_names(["c4", " Gopher_Repetition "]) == ["c4", "gopher_repetition"]
    with pytest.raises(ConfigError, match="unknown prefilter 'gopher_repetiton'; did you mean 'gopher_repetition'"):
        PrepareConfig(inputs=["x"], prefilter=["gopher_repetiton"]).validate()
    with pytest.raises(ConfigError, match="listed twice"):
        PrepareConfig(inputs=["x"], prefilter=["c4", "c4"]).validate()
    with pytest.raises(ConfigError, match="'none' cannot be combined"):
        PrepareConfig(inputs=["x"], prefilter=["none", "c4"]).validate()


def test_first_pass_memo_gives_the_counted_pass_the_same_result():
    docs = [Document(t, f"d{i}", "s") for i, t in enumerate(
        [GOOD, PROSE[0], "\n\n".join([PROSE[2]] * 6), GOOD + "\nno end mark", ""] * 120)]
    fresh = Prefilter(["gopher_repetition", "c4"])
    want = [(d.doc_id, d.text) for d in fresh.filter(docs)]
    twice = Prefilter(["gopher_repetition", "c4"])
    for _ in zip(range(100), twice.filter(docs, record=False)):  # a prefix, as the tokenizer-training pass reads
        pass
    assert 0 < twice._memo_n < len(docs)
    assert [(d.doc_id, d.text) for d in twice.filter(docs)] == want
    assert twice.manifest_info()["by_filter"] == fresh.manifest_info()["by_filter"]


# ---------------------------------------------------------------------------------------------------------------
# through prepare


@pytest.fixture()
def mixed(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    good = [{"id": f"g{i}", "text": GOOD.replace("Tuesday", f"day {i}")} for i in range(12)]
    rep = [{"id": f"r{i}", "text": "\n\n".join([PROSE[i % 6]] * 6)} for i in range(5)]
    note = ("Note {i} about apples pears plums cherries grapes melons lemons limes oranges figs dates and kiwis from "
            "the orchard behind the old farm house near the river where the miller kept his goats sheep and two brown "
            "horses during the long cold winter months")  # no end mark: C4 removes the line, then the page
    short = [{"id": f"s{i}", "text": note.format(i=i)} for i in range(4)]
    return [str(write_jsonl(d / "web.jsonl", good + rep)), str(write_jsonl(d / "notes.jsonl", short))]


def _cfg(inputs, tok_dir, **kw) -> PrepareConfig:
    return PrepareConfig(inputs=list(inputs), tokenizer=tok_dir, seq_len=16, n_shards=2, workers=1, **kw)


def test_prepare_counts_sidecar_and_identity(tmp_path, mixed, tok_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="lmselect.data.prefilter"):
        pool_dir = prepare(_cfg(mixed, tok_dir, prefilter=["gopher_repetition", "c4"]), tmp_path / "pool",
                           progress=False)
    # a source removed whole is a warning with its counts
    assert "all 4 documents of source 'notes' were removed (c4 4)" in caplog.text
    pool = TokenPool(pool_dir)
    info = pool.manifest["extra"]["prefilter"]
    assert info["filters"] == ["gopher_repetition", "c4"]
    assert info["settings"]["c4"] == {"class": "C4QualityFilter", "kwargs": {"min_words_per_line": 5, "min_num_sentences": 3}}
    assert (info["documents"], info["dropped"], info["kept"]) == (21, 9, 12)
    assert info["by_filter"] == {"gopher_repetition": {"dropped": 5, "reasons": {"dup_para_frac": 5}},
                                 "c4": {"dropped": 4, "reasons": {"too_few_sentences": 4}}}
    web, notes = info["per_source"]["web"], info["per_source"]["notes"]
    assert (web["documents"], web["dropped"], web["by_filter"]) == (17, 5, {"gopher_repetition": 5})
    assert (notes["documents"], notes["kept"], notes["kept_tokens"]) == (4, 0, 0)
    # the tokens kept are the tokens the pool holds; the input tokens count the removed documents too
    assert web["kept_tokens"] == pool.manifest["counts"]["per_source"]["web"]["tokens"]
    assert web["input_tokens"] > web["kept_tokens"] and notes["input_tokens"] > 0
    assert pool.manifest["counts"]["documents"] == 12
    assert "gopher" not in " ".join(set(pool.doc_spans().to_pydict()["doc_id"]))
    rows = read_dropped(pool_dir)
    assert [(r["id"], r["source"], r["filter"], r["reason"]) for r in rows] == (
        [(f"r{i}", "web", "gopher_repetition", "dup_para_frac") for i in range(5)]
        + [(f"s{i}", "notes", "c4", "too_few_sentences") for i in range(4)])
    assert [r["index"] for r in rows] == [12, 13, 14, 15, 16, 17, 18, 19, 20]  # position in the reader's stream
    rep = prefilter_report(pool_dir)
    assert rep["enabled"] and rep["summary"].startswith(
        "prefilter gopher_repetition, c4: 9 of 21 documents removed (gopher_repetition 5, c4 4)")
    # identity: off = the hash of a pool made before the option existed; the filters and their order count
    off = _cfg(mixed, tok_dir)
    d = to_dict(off)
    for k in ("workers", "tasks", "decontaminate", "prefilter"):
        d.pop(k)
    assert pool_config_hash(off) == config_hash(d) == pool_config_hash(_cfg(mixed, tok_dir, prefilter=["none"]))
    hashes = {pool_config_hash(_cfg(mixed, tok_dir, prefilter=p)) for p in ([], ["c4"], ["c4", "gopher_repetition"],
                                                                              ["gopher_repetition", "c4"])}
    assert len(hashes) == 4
    assert prefilter_report(prepare(off, tmp_path / "plain", progress=False)) == {"enabled": False}
    assert not (tmp_path / "plain" / DROPPED_FILE).exists()


def test_prefilter_removing_everything_is_an_error_and_leaves_no_pool(tmp_path, tok_dir):
    d = tmp_path / "c"
    d.mkdir()
    inputs = [str(write_jsonl(d / "x.jsonl", [{"text": f"note {i}"} for i in range(20)]))]
    with pytest.raises(LmselectError, match=r"prefilter: all 20 documents were removed \(c4 20\); nothing is left"):
        prepare(_cfg(inputs, tok_dir, prefilter=["c4"]), tmp_path / "p", progress=False)
    assert not (tmp_path / "p").exists()
    # the trained-tokenizer path hits it in the first (tokenizer-training) pass: the same one line
    rc = main(["prepare", *inputs, "-o", str(tmp_path / "q"), "--vocab-size", "300", "--seq-len", "16",
               "--n-shards", "2", "--no-progress", "--prefilter", "c4"])
    assert rc == 2 and not (tmp_path / "q").exists()


def test_cli_flag_summary_and_did_you_mean(tmp_path, mixed, capsys):
    out = tmp_path / "p"
    assert main(["prepare", *mixed, "-o", str(out), "--vocab-size", "300", "--seq-len", "16", "--n-shards", "2",
                 "--workers", "1", "--no-progress", "--prefilter", "gopher_repetition"]) == 0
    assert "prefilter gopher_repetition: 5 of 21 documents removed (gopher_repetition 5)" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["config"]["prefilter"] == ["gopher_repetition"]
    assert main(["prepare", *mixed, "-o", str(tmp_path / "q"), "--prefilter", "fineweb"]) == 2
    assert "did you mean 'fineweb_quality'" in capsys.readouterr().err


def test_recipe_key_and_stage_identity(tmp_path):
    from lmselect.recipe import load_recipe
    from lmselect.stages import stage_specs

    r = load_recipe("demo", ["--pool.prepare.prefilter=none"])
    assert r.pool.prepare.prefilter == [] and "prefilter" not in stage_specs(r)["pool"]["pool"]["prepare"]
    r2 = load_recipe("demo", ["--pool.prepare.prefilter=c4"])
    assert stage_specs(r2)["pool"]["pool"]["prepare"]["prefilter"] == ["c4"]
    with pytest.raises(ConfigError, match="'pool.prepare.prefilter': unknown prefilter 'c5'; did you mean 'c4'"):
        load_recipe("demo", ["--pool.prepare.prefilter=c5"])


def test_inspect_and_export_show_what_was_dropped(tmp_path, mixed, tok_dir, capsys):
    import gzip

    pool_dir = prepare(_cfg(mixed, tok_dir, prefilter=["gopher_repetition", "c4"]), tmp_path / "pool", progress=False)
    assert main(["inspect", str(pool_dir), "--n", "0"]) == 0
    out = capsys.readouterr().out
    assert "prefilter gopher_repetition, c4: 9 of 21 documents removed" in out
    assert "gopher_repetition: 5 (dup_para_frac 5)" in out and "r0 (gopher_repetition: dup_para_frac)" in out
    assert main(["export", str(pool_dir), "--dropped", "--out", str(tmp_path / "x")]) == 0
    assert "exported 9 documents the prefilter removed" in capsys.readouterr().out
    with gzip.open(tmp_path / "x" / "dropped.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f]
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(5)] + [f"s{i}" for i in range(4)]
    assert rows[0]["text"] == "\n\n".join([PROSE[0]] * 6) and rows[0]["filter"] == "gopher_repetition"
    assert json.loads((tmp_path / "x" / "manifest.json").read_text())["kind"] == "export"
    # inputs changed since: refused in one line; a pool without a prefilter has nothing to export
    with open(mixed[1], "a") as f:
        f.write(json.dumps({"text": "one more note"}) + "\n")
    assert main(["export", str(pool_dir), "--dropped", "--out", str(tmp_path / "y")]) == 2
    assert "inputs changed since it was prepared" in capsys.readouterr().err
    plain = prepare(_cfg(mixed, tok_dir), tmp_path / "plain", progress=False)
    assert main(["export", str(plain), "--dropped", "--out", str(tmp_path / "z")]) == 2
    assert "prepared without a prefilter" in capsys.readouterr().err


def test_report_section_shows_the_prefilter(tmp_path, mixed, tok_dir):
    """The run report's "What the prefilter removed" section, from a pool manifest's extra.prefilter."""
    from lmselect.report.results import headline_sections, results_markdown

    pool_dir = prepare(_cfg(mixed, tok_dir, prefilter=["gopher_repetition", "c4"]), tmp_path / "pool", progress=False)
    res = {"methods": {}, "rows": [], "paired_vs_random": {}, "paired_vs_level_control": {}, "diagnostics": {},
           "prefilter": prefilter_report(pool_dir), "run": "r", "tasks": {}, "curves": []}
    (sec,) = [s for s in headline_sections(res) if s["title"].startswith("What the prefilter removed")]
    assert sec["note"].startswith("prefilter gopher_repetition, c4: 9 of 21 documents removed")
    assert sec["rows"] == [["notes", "4", "4", "c4 4", "0%"], ["web", "17", "5", "gopher_repetition 5", "71%"]]
    assert sec["bullets"] == ["gopher_repetition: 5 removed (dup_para_frac 5)", "c4: 4 removed (too_few_sentences 4)"]
    assert "## What the prefilter removed" in results_markdown(res)
