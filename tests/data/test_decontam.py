"""Decontamination: normalisation, hashed n-grams against a tuple oracle, planted copies through prepare, reports."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from corpus_helpers import clean_records, write_jsonl

from lmselect.artifacts import LmselectError
from lmselect.cli import main
from lmselect.config import config_hash, to_dict
from lmselect.data.decontam import (
    CONTAMINATION_FILE,
    DecontamConfig,
    NgramHasher,
    ProtectedIndex,
    normalize_words,
    overlap_report,
)
from lmselect.data.pool import TokenPool
from lmselect.data.prepare import PrepareConfig, pool_config_hash, prepare
from lmselect.paths import TASKS_DIR

# 40 words; a pool document copies words[5:25] (20 words) or shares only words[20:32] (12 words)
PASSAGE = (
    "the lighthouse keeper counted seventeen gulls circling above the harbour while his daughter mended nets beside "
    "a crooked chimney and the ferry from the northern island arrived late carrying lemons copper pots and a letter "
    "sealed with green wax under a violet sky"
)
WORDS = PASSAGE.split()


def _disguised(words: list[str]) -> str:
    """The same words with case and punctuation changed: normalisation must see through it."""
    out = []
    for i, w in enumerate(words):
        w = w.upper() if i % 3 == 0 else w.capitalize() if i % 3 == 1 else w
        out.append(w + ("," if i % 4 == 3 else "") + ("!" if i % 7 == 6 else ""))
    return "\u201c" + " ".join(out) + "\u2026\u201d"


COPY20 = "Intro about xylophones and quartz. " + _disguised(WORDS[5:25]) + " Then zebras ate marmalade quietly."
SHARE12 = "Intro about xylophones and quartz. " + " ".join(WORDS[20:32]) + " then zebras ate marmalade quietly."


def _protected(tmp_path, texts: list[str]):
    return write_jsonl(tmp_path / "protected.jsonl", [{"text": t} for t in texts])


def _oracle_counts(protected: list[str], texts: list[str], n: int) -> list[tuple[int, int]]:
    """(n-gram windows, windows found) per text with plain Python tuples: the definition the hashes must match."""

    def grams(t: str) -> list[tuple[str, ...]]:
        w = normalize_words(t)
        return [] if not w else [tuple(w)] if len(w) < n else [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]

    index = {g for t in protected for g in grams(t)}
    return [(len(grams(t)), sum(g in index for g in grams(t))) for t in texts]


def test_normalisation_case_unicode_punctuation():
    assert normalize_words("Hello, WORLD!  It's well-known.") == ["hello", "world", "it", "s", "well", "known"]
    assert normalize_words("well - known") == normalize_words("well-known")
    # full-width letters and a ligature (NFKC)
    assert normalize_words("\uff28\uff45\uff4c\uff4c\uff4f \ufb01ne") == ["hello", "fine"]
    assert normalize_words("snake_case \u2014 x") == ["snake", "case", "x"]
    assert normalize_words(" ... !!! ") == []


@pytest.mark.parametrize("n", [1, 3, 13])
def test_hashed_index_matches_tuple_oracle(tmp_path, n):
    rng = random.Random(n)
    vocab = [f"w{i}" for i in range(30)] + ["Caf\u00e9", "CAFE\u0301", "x-y"]

    def text(k: int) -> str:
        return " ".join(rng.choice(vocab) for _ in range(k))

    protected = [text(rng.randint(0, 40)) for _ in range(30)] + ["w1 w2", "w3"]
    # pool texts: random ones, copies of protected spans, short ones and empty ones
    pool = [text(rng.randint(0, 60)) for _ in range(60)]
    pool += [protected[i][: rng.randint(0, len(protected[i]))] + " " + text(5) for i in range(10)]
    pool += ["W1, w2!", "w3", "", "w1 w2 w3"] + [" ".join(f"u{i}" for i in range(k)) for k in (1, 5, 20)]
    p = _protected(tmp_path, protected)
    index = ProtectedIndex.build([str(p)], n)
    total, matched, labels = index.check(pool)
    want = _oracle_counts(protected, pool, n)
    assert list(zip(total.tolist(), matched.tolist())) == want
    assert any(m for _, m in want) and any(t and not m for t, m in want)  # both outcomes are exercised
    assert all((lab == [str(p)]) == bool(m) for lab, (_, m) in zip(labels, want))


def test_hashes_are_stable_and_position_free():
    h = NgramHasher(3)
    a, da = h.hash_texts(["a b c d", "x y", ""])
    b, _ = NgramHasher(3).hash_texts(["zz a b c"])  # a fresh hasher (empty word cache) gives the same values
    assert da.tolist() == [0, 0, 1]
    assert a[0] == b[1] and len(set(a.tolist())) == 3
    assert a.dtype == np.uint64


def test_short_texts_are_one_ngram(tmp_path):
    p = _protected(tmp_path, ["Paris", "the northern island arrived"])
    index = ProtectedIndex.build([str(p)], 13)
    _, matched, _ = index.check(["PARIS.", "I love Paris in spring", "The northern island arrived!", "northern island"])
    # a short protected text matches a document that is exactly it (after normalisation), not one containing it
    assert matched.tolist() == [1, 0, 1, 0]


@pytest.fixture()
def planted(tmp_path):
    """A corpus with a planted 20-word copy, a 12-word share and clean text; a protected file holding PASSAGE."""
    d = tmp_path / "corpus"
    d.mkdir()
    plant = [
        {"id": "copy20", "text": COPY20},
        {"id": "share12", "text": SHARE12},
        {"id": "clean", "text": "Nothing shared here."},
    ]
    # planted first: the corpus tail (a partial row) is not packed, and these documents must all be in the pool
    inputs = [str(write_jsonl(d / "planted.jsonl", plant)), str(write_jsonl(d / "wiki.jsonl", clean_records(30)))]
    prot = tmp_path / "protected"
    prot.mkdir()
    write_jsonl(prot / "report.jsonl", [{"id": "r0", "text": PASSAGE}, {"id": "r1", "text": "Another report text."}])
    (prot / "SOURCE.md").write_text("not a protected text: ignored inside a folder")
    return inputs, prot


def _cfg(inputs, tok_dir, **decon) -> PrepareConfig:
    return PrepareConfig(
        inputs=list(inputs), tokenizer=tok_dir, vocab_size=300, seq_len=16, n_shards=2, workers=1,
        decontaminate=DecontamConfig(**decon),
    )


def test_planted_copy_is_flagged_and_12_words_are_not(tmp_path, planted, tok_dir, capsys):
    inputs, prot = planted
    pool = prepare(_cfg(inputs, tok_dir, protected=[str(prot)]), tmp_path / "pool", progress=False)
    m = json.loads((pool / "manifest.json").read_text())
    info = m["extra"]["decontamination"]
    label = f"{prot}/report.jsonl"
    assert (info["n"], info["mode"], info["documents"], info["contaminated"], info["dropped"]) == (13, "flag", 33, 1, 0)
    assert info["per_source"] == {
        "planted": {"docs": 3, "contaminated": 1, "dropped": 0}, "wiki": {"docs": 30, "contaminated": 0, "dropped": 0},
    }
    # every string field of a record is its text: "r0" + 43 passage words -> 32 13-grams; "r1 Another report text." -> 1
    want_set = {"path": str(prot / "report.jsonl"), "n_texts": 2, "n_ngrams": 32 + 1, "docs_matched": 1}
    assert info["per_set"] == {label: want_set}
    assert m["counts"]["documents"] == 33  # flag keeps every document
    assert "decontam_check_s" in m["timings"]
    rep = overlap_report(pool)
    assert rep["enabled"] and rep["summary"] == (
        "decontamination: 1 of 33 documents overlap the protected sets (13-grams); flagged"
    )
    # 20 copied words = 20 - 13 + 1 = 8 overlapping 13-grams, out of the document's 30 - 13 + 1 = 18
    (row,) = rep["top"]
    assert (row["doc_id"], row["source"], row["matched"], row["ngrams"], row["sets"], row["dropped"]) == (
        "copy20", "planted", 8, 18, [label], False,
    )
    assert row["fraction"] == pytest.approx(8 / 18)
    # flag mode leaves the pool's tokens identical to a pool prepared without decontamination
    plain = prepare(_cfg(inputs, tok_dir), tmp_path / "plain", progress=False)
    assert np.array_equal(np.asarray(TokenPool(pool).tokens), np.asarray(TokenPool(plain).tokens))
    assert not (plain / CONTAMINATION_FILE).exists() and overlap_report(plain) == {"enabled": False}


def test_drop_mode_removes_the_copy_before_tokenisation(tmp_path, planted):
    inputs, prot = planted
    # no tokenizer given: the BPE is trained, on the kept documents only
    out = tmp_path / "pool"
    assert main(["prepare", *inputs, "-o", str(out), "--vocab-size", "300", "--seq-len", "16", "--n-shards", "2",
                 "--workers", "1", "--no-progress", "--decontaminate", str(prot), "--decontam-mode", "drop"]) == 0
    pool = TokenPool(out)
    doc_ids = set(pool.doc_spans().to_pydict()["doc_id"])
    assert "copy20" not in doc_ids and {"share12", "clean"} <= doc_ids
    info = pool.manifest["extra"]["decontamination"]
    assert (info["contaminated"], info["dropped"], info["per_source"]["planted"]["dropped"]) == (1, 1, 1)
    assert pool.manifest["counts"]["documents"] == 32
    text = pool.decode(int(pool.ids(0)[0]))  # the pool still decodes (tokenizer trained without the copy)
    assert isinstance(text, str)


def test_min_fraction_threshold(tmp_path, planted, tok_dir):
    inputs, prot = planted
    # copy20 overlaps in 8 of 18 13-grams (44 %): counted at a 40 % threshold, not at 50 %
    for frac, want in ((0.4, 1), (0.5, 0)):
        cfg = _cfg(inputs, tok_dir, protected=[str(prot)], min_fraction=frac)
        pool = prepare(cfg, tmp_path / f"p{frac}", progress=False)
        assert overlap_report(pool)["contaminated"] == want


def test_config_hash_follows_the_options(planted, tok_dir):
    inputs, prot = planted
    off = _cfg(inputs, tok_dir)
    d = to_dict(off)
    d.pop("decontaminate")
    d.pop("workers")
    d.pop("tasks")
    d.pop("prefilter")  # off too: left out of the identity like decontamination
    assert pool_config_hash(off) == config_hash(d)  # off: same identity as before the option existed
    hashes = {
        pool_config_hash(_cfg(inputs, tok_dir, **kw))
        for kw in ({}, {"protected": [str(prot)]}, {"protected": [str(prot)], "n": 8},
                   {"protected": [str(prot)], "mode": "drop"}, {"protected": [str(prot)], "min_fraction": 0.5})
    }
    assert len(hashes) == 5


def test_eval_task_text_is_protected(tmp_path, tok_dir):
    """A pool document quoting 20 words of a bundled SciQ support passage is flagged against bundled:tasks."""
    with open(TASKS_DIR / "sciq" / "sciq_validation.jsonl") as f:
        rec = next(r for r in map(json.loads, f) if len(r["support"].split()) > 40)
    quote = " ".join(rec["support"].split()[10:30])
    d = tmp_path / "corpus"
    d.mkdir()
    records = clean_records(30) + [{"id": "quote", "text": "As a textbook says: " + quote}]
    inputs = [str(write_jsonl(d / "web.jsonl", records))]
    pool = prepare(_cfg(inputs, tok_dir, protected=["bundled:tasks"]), tmp_path / "pool", progress=False)
    rep = overlap_report(pool)
    assert [r["doc_id"] for r in rep["top"]] == ["quote"]
    sciq = "bundled:tasks/sciq/sciq_validation.jsonl"
    assert rep["top"][0]["sets"] == [sciq]  # attributed to the set it came from, and only to that one
    assert {k: v["docs_matched"] for k, v in rep["per_set"].items() if v["docs_matched"]} == {sciq: 1}
    assert "bundled:tasks/SOURCE.md" not in rep["per_set"] and len(rep["per_set"]) >= 10


def test_bad_protected_inputs_are_one_line_errors(tmp_path, planted, tok_dir):
    inputs, _ = planted
    with pytest.raises(LmselectError, match="nope.jsonl: protected set not found"):
        prepare(_cfg(inputs, tok_dir, protected=[str(tmp_path / "nope.jsonl")]), tmp_path / "p1", progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(LmselectError, match=r"bad.jsonl:2: invalid JSON"):
        prepare(_cfg(inputs, tok_dir, protected=[str(bad)]), tmp_path / "p2", progress=False)
    md = tmp_path / "notes.md"
    md.write_text("x")
    with pytest.raises(LmselectError, match="unsupported format"):
        prepare(_cfg(inputs, tok_dir, protected=[str(md)]), tmp_path / "p3", progress=False)
    assert not (tmp_path / "p1").exists() and not (tmp_path / "p2").exists()


def test_drop_everything_is_an_error(tmp_path, tok_dir):
    d = tmp_path / "c"
    d.mkdir()
    inputs = [str(write_jsonl(d / "x.jsonl", [{"text": PASSAGE}] * 20))]
    with pytest.raises(LmselectError, match="all 20 documents overlap"):
        prepare(_cfg(inputs, tok_dir, protected=inputs, mode="drop"), tmp_path / "p", progress=False)
    assert not (tmp_path / "p").exists()


def test_cli_prints_the_summary_line(tmp_path, planted, tok_dir, capsys):
    inputs, prot = planted
    assert main(["prepare", *inputs, "-o", str(tmp_path / "p"), "--tokenizer", tok_dir, "--seq-len", "16",
                 "--n-shards", "2", "--no-progress", "--decontaminate", str(prot / "report.jsonl"),
                 "--decontaminate.n=8"]) == 0
    out = capsys.readouterr().out
    assert "decontamination: 2 of 33 documents overlap the protected sets (8-grams); flagged" in out  # share12 too


def test_recipe_keys(tmp_path):
    from lmselect.config import ConfigError
    from lmselect.recipe import load_recipe

    (tmp_path / "report.jsonl").write_text('{"text": "x"}\n')
    recipe = tmp_path / "r.yaml"
    recipe.write_text("pool:\n  prepare:\n    inputs: ['bundled:demo/corpus/*.jsonl.gz']\n    seq_len: 128\n"
                      "    decontaminate: {protected: ['bundled:tasks', report.jsonl], mode: drop}\n")
    dec = load_recipe(str(recipe)).pool.prepare.decontaminate
    # bundled: stays as written (it labels the set); a relative path resolves against the recipe's folder
    assert dec.protected == ["bundled:tasks", str(tmp_path / "report.jsonl")] and dec.mode == "drop"
    with pytest.raises(ConfigError, match="'pool.prepare.decontaminate.mode' must be one of"):
        load_recipe(str(recipe), ["--pool.prepare.decontaminate.mode=remove"])
