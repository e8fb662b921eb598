"""The bundled demo data: the formats prepare accepts, labelled sources, validation files disjoint from the pool."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmselect.data.readers import ReadStats, iter_documents, resolve_inputs
from lmselect.paths import DEMO_DIR

SOURCES = {"wikipedia", "news", "speeches", "reviews", "forum", "web", "email_ham", "email_spam"}


def test_demo_corpus_reads_with_sources_and_fits_budget():
    specs = resolve_inputs([str(DEMO_DIR / "corpus" / "*.jsonl.gz")])
    assert {s.default_source for s in specs} == SOURCES  # one file per source
    stats = ReadStats()
    chars: dict[str, int] = {}
    wiki_text = []
    for d in iter_documents(specs, strict=True, stats=stats):
        chars[d.source] = chars.get(d.source, 0) + len(d.text)
        if d.source == "wikipedia":
            wiki_text.append(d.text)
    assert set(chars) == SOURCES and stats.n_skipped == 0
    assert 4_000_000 < sum(chars.values()) < 9_000_000  # ~1-2 M BPE tokens
    assert sum(p.stat().st_size for p in DEMO_DIR.rglob("*") if p.is_file()) < 4_500_000
    assert (DEMO_DIR / "SOURCE.md").is_file()

    # clean_val paragraphs come from articles held out of the pool
    clean = [json.loads(line)["text"] for line in open(DEMO_DIR / "clean_val.jsonl", encoding="utf-8")]
    assert 200 <= len(clean) <= 500
    pool_wiki = "\n".join(wiki_text)
    assert not any(p in pool_wiki for p in clean)


def test_lambada_slice():
    sets = {}
    for name in ("lambada_report", "lambada_select"):
        recs = [json.loads(line) for line in open(DEMO_DIR / f"{name}.jsonl", encoding="utf-8")]
        assert len(recs) == 250 and all(isinstance(r["text"], str) and len(r["text"].split()) > 5 for r in recs)
        sets[name] = {r["text"] for r in recs}
    # the two roles are disjoint, and the bundled lambada_openai task slice lies in the report half only
    assert not sets["lambada_report"] & sets["lambada_select"]
    task = {json.loads(line)["text"] for line in open(DEMO_DIR.parent / "tasks" / "lambada" / "lambada_test.jsonl")}
    assert task <= sets["lambada_report"] and not task & sets["lambada_select"]


@pytest.mark.slow
def test_bundled_tokenizer_is_what_prepare_trains(tmp_path):
    """The demo ships the BPE that ``prepare`` trains on its corpus (after its prefilter and decontamination), so
    the demo skips ~25 s of training; retraining it with the demo's own settings must give the same vocabulary."""
    from lmselect.data.prepare import prepare
    from lmselect.data.tokenizer import tokenizer_fingerprint
    from lmselect.recipe import load_recipe

    cfg = load_recipe("demo", []).pool.prepare
    assert cfg.tokenizer and Path(cfg.tokenizer) == DEMO_DIR / "tokenizer"
    shipped = tokenizer_fingerprint(cfg.tokenizer)
    cfg.tokenizer = None  # train it, exactly as the demo would without the shipped one
    pool = prepare(cfg, tmp_path / "pool", progress=False)
    assert tokenizer_fingerprint(pool / "tokenizer") == shipped
