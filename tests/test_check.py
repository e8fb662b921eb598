"""``lmselect check``: the known-answer check end to end on a tiny planted corpus (debug presets, a few steps)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from lmselect.paths import DATA_DIR

RECIPE = """
name: tinycheck
seed: 0
pool:
  prepare: {{inputs: ["{corpus}/*.jsonl"], vocab_size: 512, seq_len: 64, n_shards: 3, seed: 0, workers: 1}}
validation: {{selection: {sel}, selection_kind: lambada, lambada: {report}, clean: null, max_items: 200, seq_len: 64, batch_size: 16}}
target: {{preset: debug}}
proxy: {{preset: debug}}
warmup: {{fraction: 0.5, steps: {warm}}}
rounds: 2
select_fraction: 0.2
round_steps: 3
methods: [random]
train: {{global_batch: 8, micro_batch: 8, log_every: 10, optim: {{lr: 3.0e-3, warmup_steps: 2}}}}
decay: {{steps: 2, halve_every: 1}}
eval: {{downstream: false}}
bliss: {{outer_steps: 2, batch_size: 8, val_batch_size: 8, log_every: 1, save_every: 1}}
rho1: {{steps: {ref_steps}, batch_size: 16, lr: 1.0e-3, seq_len: 64}}
reference: {{steps: {ref_steps}, batch_size: 16, lr: 1.0e-3, seq_len: 64}}
score_batch_size: 64
"""


def make_check_inputs(d: Path, n_docs: int = 30, doc_chars: int = 1200, n_sel: int = 160, warm: int = 30,
                      ref_steps: int = 40) -> Path:
    """A small four-source corpus cut from the bundled demo corpus and a fiction selection set (LAMBADA passages)."""
    corpus = d / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for src in ("news", "wikipedia", "email_spam", "reviews"):
        rows = []
        with gzip.open(DATA_DIR / "demo" / "corpus" / f"{src}.jsonl.gz", "rt") as f:
            for line in f:
                rec = json.loads(line)
                rows.append(json.dumps({"source": src, "text": rec["text"][:doc_chars].rsplit(" ", 1)[0]}) + "\n")
                if len(rows) == n_docs:
                    break
        (corpus / f"{src}.jsonl").write_text("".join(rows))
    sel = d / "selection.jsonl"
    sel.write_text("".join((DATA_DIR / "demo" / "lambada_select.jsonl").read_text().splitlines(True)[:n_sel]))
    report = DATA_DIR / "demo" / "lambada_report.jsonl"  # disjoint from the selection half, as a recipe requires
    p = d / "recipe.yaml"
    p.write_text(RECIPE.format(corpus=corpus, sel=sel, report=report, warm=warm, ref_steps=ref_steps))
    return p


@pytest.fixture(scope="module")
def check_recipe(tmp_path_factory) -> Path:
    return make_check_inputs(tmp_path_factory.mktemp("check"))


def _bench_labels():
    """bench/bliss_labels.py as a module (bench scripts are not a package)."""
    import importlib.util

    from lmselect.paths import REPO_DIR

    spec = importlib.util.spec_from_file_location("bliss_labels", REPO_DIR / "bench" / "bliss_labels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _rows(res: dict, source: str) -> list[dict]:
    return [r for r in res["rows"] if r["source"] == source]


def test_bench_labels_auc_and_rates_against_brute_force():
    """bench/bliss_labels.py's ROC AUC is the pairwise (Mann–Whitney) definition; its probe finds a separable kind
    and not noise; its rates are each source's share of the top fraction over the base rate."""
    bench = _bench_labels()
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.3).astype(int)
    s = rng.normal(size=300) + 1.5 * y
    brute = np.mean([p > n for p in s[y == 1] for n in s[y == 0]])
    assert bench.roc_auc(y, s) == pytest.approx(brute, abs=1e-12)
    separable = np.c_[rng.normal(size=(300, 4)), y + 0.3 * rng.normal(size=300)]
    assert bench.probe_auc(separable, y) > 0.95
    assert abs(bench.probe_auc(rng.normal(size=(300, 5)), y) - 0.5) < 0.12
    assert np.isnan(bench.probe_auc(separable[:20], np.r_[np.ones(2), np.zeros(18)].astype(int)))
    src = np.array(["a"] * 5 + ["b"] * 5)
    r = bench._rates(src, np.arange(10.0), 0.2)  # top 2 are both "b": b at 2/5 = 0.4 = 2x the base 0.2, a at 0
    assert r == {"a": 0.0, "b": 2.0}


def test_truncate_words_cuts_at_a_word_boundary():
    from lmselect.check import truncate_words

    text = "alpha beta gamma delta"
    assert truncate_words(text, 0) == text and truncate_words(text, 100) == text
    assert truncate_words(text, 12) == "alpha beta"  # "alpha beta g" cut back to the last whole word
    assert truncate_words("x" * 50, 10) == "x" * 10  # no space: a hard cut


def test_junk_makers_are_what_they_say():
    from lmselect.check import random_words, repeat_sentence, shuffle_words

    rng = np.random.default_rng(0)
    text = "The cat sat on the mat today. It was a very warm and sunny day in the town. Birds sang."
    sh = shuffle_words(text, rng)
    assert sorted(sh.split()) == sorted(text.split()) and sh != text  # same unigrams, other order
    rep = repeat_sentence(text, rng)
    sent = "It was a very warm and sunny day in the town."  # the only sentence of 5-60 words... and the first
    assert rep.count(sent) >= 2 and len(rep) >= len(text) and set(rep.split(sent)) <= {"", " "}
    vocab = ["a", "b", "c"]
    rw = random_words(300, vocab, rng).split()
    assert len(rw) == 300 and set(rw) == set(vocab)


def test_random_fails_the_check_end_to_end(check_recipe, tmp_path, capsys):
    """`random` picks target-like data at about the base rate: the check must say FAIL (exit 1)."""
    from lmselect.cli import main

    out = tmp_path / "random"
    rc = main(["check", str(check_recipe), "--method", "random", "--out", str(out), "--plant-fraction", "0.1",
               "--warmup.steps=5", "--min-reached", "1"])
    assert rc == 1
    printed = capsys.readouterr().out
    assert "Known-answer check: random — FAIL" in printed and "| 1 | planted_target |" in printed
    res = json.loads((out / "check.json").read_text())
    assert (out / "check.md").read_text().startswith("# Known-answer check: random — FAIL")
    assert res["verdict"] == "FAIL" and res["criteria"] == 8  # 4 planted sources x 2 rounds
    # no prefilter: the pipeline table is the method on everything (token rates, about the sequence rates)
    pipe = res["pipeline"]
    assert pipe["filters"] == [] and pipe["verdict"] == res["method_verdict"] == "FAIL" and pipe["criteria"] == 8
    for p, m in zip(pipe["rows"], res["rows"]):
        assert (p["round"], p["source"], p["removed"], p["reached"]) == (m["round"], m["source"], 0, m["documents"])
        assert abs(p["ratio"] - m["ratio"]) < 0.5
    assert "## Pipeline: prefilter (none) + random" in printed and "## Method alone" in printed
    for r in _rows(res, "planted_target"):
        assert r["candidates"] >= 20 and not r["pass"] and 0.3 < r["ratio"] < 2.0  # about the base rate (35 candidates)
    # how many distinct planted documents each rate is made of, against docs.parquet directly
    import pandas as pd

    from lmselect.data.pool import TokenPool

    pool = TokenPool(out / "pool")
    docs = pd.read_parquet(out / "pool" / "docs.parquet")
    for r in res["rows"]:
        sel = np.load(out / "run" / "random" / "seed0" / f"round{r['round']}" / "selection" / "selected.npy")
        d = docs[docs["source"] == r["source"]]
        assert r["documents"] == d.loc[d["seq_id"].isin(pool.ids(r["round"])), "doc_id"].nunique() > 0
        assert r["selected_documents"] == d.loc[d["seq_id"].isin(sel), "doc_id"].nunique()
        assert r["selected_documents"] <= r["documents"]
    assert "| documents (selected) |" in printed
    # the pipeline really ran: the method saw only the visible part of the selection set
    plant = json.loads((out / "inputs" / "plant.json").read_text())
    assert plant["counts"]["visible"] + plant["counts"]["held_out"] == 160
    vis = {json.loads(x)["text"] for x in (out / "inputs" / "selection_visible.jsonl").read_text().splitlines()}
    held = {json.loads(x)["text"] for x in (out / "inputs" / "planted_target.jsonl").read_text().splitlines()}
    assert vis and held and not vis & held
    cfg = (out / "run" / "config.yaml").read_text()
    assert "selection_visible.jsonl" in cfg and "methods:\n- random" in cfg


def test_bliss_check_runs_end_to_end_at_tiny_scale(check_recipe, tmp_path, capsys):
    """The CI-sized known-answer check of BLISS: plants, prepares, runs the bilevel solve and judges every planted
    source in both rounds. Two outer steps cannot learn the answer, so the verdict itself is not asserted here (the
    demo-scale check is bench/bliss_ablation.py); what is asserted is that the check measures BLISS's own
    selection and its solver diagnostics."""
    from lmselect.cli import main

    out = tmp_path / "bliss"
    rc = main(["check", str(check_recipe), "--method", "bliss", "--out", str(out), "--plant-fraction", "0.1",
               "--warmup.steps=5", "--min-reached", "1"])  # ~10 planted documents per kind at this scale
    assert rc in (0, 1)
    res = json.loads((out / "check.json").read_text())
    assert res["criteria"] == 8 and {r["source"] for r in res["rows"]} == {
        "planted_target", "planted_shuffled", "planted_repeated", "planted_random"}
    assert res["verdict"] == ("PASS" if rc == 0 else "FAIL")
    assert "Known-answer check: bliss" in capsys.readouterr().out
    for r in (1, 2):
        assert (out / "run" / "bliss" / "seed0" / f"round{r}" / "bilevel" / "diagnostics.json").is_file()

    # bench/bliss_labels.py on this check: it re-runs round 1's solve outside the pipeline, so its score model must
    # be the pipeline's (same scores for the same sequences), and it labels every sampled candidate with the last z
    from lmselect.score import read_scores

    bench = _bench_labels()
    assert bench.main(["--check", str(out), "--variants", "default", "--candidates", "60"]) == 0
    got = np.load(out / "labels" / "default-seed0.npz")
    ids, scores = read_scores(out / "run" / "bliss" / "seed0" / "round1" / "scores")
    pos = {int(i): k for k, i in enumerate(ids)}
    np.testing.assert_allclose(got["score"], scores[[pos[int(i)] for i in got["seq_id"]]], rtol=1e-5, atol=1e-6)
    assert len(got["c"]) == 60 and np.isfinite(got["c"]).all() and np.std(got["c"]) > 0
    res = json.loads((out / "labels" / "default-seed0.json").read_text())
    assert set(res["labels"]) == set(res["scores"]) >= {"planted_target"}
    assert "| default | 0 | score model |" in (out / "labels" / "labels.md").read_text()


def test_reference_scorer_picks_target_like_data(check_recipe, tmp_path):
    """The ``reference`` method (excess loss of a reference LM trained on the visible selection set).

    Measured at this tiny scale: target-like documents are picked at 4-5x the base rate and random-word junk at
    <= 0.3x in both rounds; one-sentence-repeated and word-shuffled junk land near the 0.5x line (0.0-0.9x
    depending on corpus cut and training steps), so only the parts it does reliably are asserted."""
    from lmselect.check import CheckConfig, run_check
    from lmselect.recipe import load_recipe

    res = run_check(load_recipe(check_recipe), tmp_path / "ref", CheckConfig(method="reference", plant_fraction=0.1,
                                                                                   min_reached=1))
    for r in _rows(res, "planted_target"):
        assert r["pass"] and r["ratio"] >= 3.0, r
    for r in _rows(res, "planted_random"):
        assert r["pass"], r
    junk = [r["rate"] for r in res["rows"] if r["kind"] == "junk"]
    assert np.mean(junk) < 0.5 * res["rows"][0]["base"]
    for r in (1, 2):  # a method like any other: its scores are a stage of each round of the run
        assert (tmp_path / "ref" / "run" / "reference" / "seed0" / f"round{r}" / "scores" / "manifest.json").is_file()
    assert res["diagnostics"] and "scorer" in res["diagnostics"][1]["verdict"]


def test_scores_mode_judges_an_external_scorer(check_recipe, tmp_path):
    """--prepare-only, score the planted pool elsewhere, --scores DIR: an oracle scorer PASSes, exit 0."""
    from lmselect.cli import main
    from lmselect.data.pool import TokenPool
    from lmselect.score import write_scores

    out = tmp_path / "ext"
    args = ["check", str(check_recipe), "--out", str(out), "--plant-fraction", "0.1", "--min-reached", "1"]
    assert main(args + ["--prepare-only"]) == 0
    pool = TokenPool(out / "pool")
    ids = pool.ids(None)
    src = pool.sources(ids)
    oracle = np.where(src == "planted_target", 1.0, np.where(np.char.startswith(src.astype(str), "planted_"), 0.0, 0.5))
    write_scores(tmp_path / "oracle", ids, oracle)
    assert main(args + ["--scores", str(tmp_path / "oracle")]) == 0
    res = json.loads((out / "check.json").read_text())
    assert res["verdict"] == "PASS" and res["passed"] == res["criteria"] == 8
    # the same scores, but missing a shard's sequences: a one-line error naming the sidecar
    write_scores(tmp_path / "partial", ids[pool.shard[ids] != 2], oracle[pool.shard[ids] != 2])
    assert main(args + ["--scores", str(tmp_path / "partial")]) == 2


def test_token_level_and_bad_settings_are_refused_before_compute(check_recipe, tmp_path, capsys):
    from lmselect.cli import main

    assert main(["check", str(check_recipe), "--method", "rho1", "--out", str(tmp_path / "x")]) == 2
    assert "not applicable (token-level)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["check", str(check_recipe), "--target-holdout", "1.5", "--out", str(tmp_path / "y")]) == 2
    assert "--target-holdout" in capsys.readouterr().err
    # other plant settings into a planted output directory are refused
    out = tmp_path / "z"
    assert main(["check", str(check_recipe), "--prepare-only", "--out", str(out)]) == 0
    assert main(["check", str(check_recipe), "--prepare-only", "--out", str(out), "--seed", "3"]) == 2
    assert "planted with other settings" in capsys.readouterr().err


def test_several_method_seeds_pass_only_when_every_seed_passes():
    """judge() over two run seeds: seed 0 meets every criterion, seed 1 keeps repeated junk: FAIL, 1 of 2 seeds."""
    from lmselect.check import PLANTED, CheckConfig, check_markdown, judge

    def summary(seed: int, repeated_rate: float) -> dict:
        per = {n: {"candidates": 40, "selected": 0, "rate": 0.0} for n in PLANTED}
        per["planted_target"] = {"candidates": 40, "selected": 20, "rate": 0.5}
        per["planted_repeated"] = {"candidates": 40, "selected": int(40 * repeated_rate), "rate": repeated_rate}
        per["forum"] = {"candidates": 100, "selected": 30 + 10 * seed, "rate": (30 + 10 * seed) / 100}
        return {"round": 1, "seed": seed, "selected_rate": 0.2, "per_source": per}

    cfg = CheckConfig(method_seeds=(0, 1), min_reached=3)
    docs = {(0, 1): {"planted_repeated": {"documents": 3, "selected_documents": 0}},
            (1, 1): {"planted_repeated": {"documents": 3, "selected_documents": 1}}}
    res = judge([summary(0, 0.05), summary(1, 0.25)], cfg, docs)
    assert res["verdict"] == "FAIL" and res["seeds"] == [0, 1] and res["seeds_passed"] == [0]
    assert res["passed"] == 7 and res["criteria"] == 8
    bad = [r for r in res["rows"] if not r["pass"]]
    assert [(r["seed"], r["source"], r["selected_documents"]) for r in bad] == [(1, "planted_repeated", 1)]
    md = check_markdown({"method": "x", "pool": "p", "config": {"target_ratio": 2.0, "junk_ratio": 0.5}, **res})
    assert "| seed | round | planted source |" in md and "| 1 | 1 | planted_repeated | 40 | 10 | 3 (1) |" in md
    assert "Seeds passing every criterion: 1 of 2 (0)" in md
    assert "seed 0 round 1: forum 0.30 (1.5x); seed 1 round 1: forum 0.40 (2.0x)" in md
    one = judge([summary(0, 0.05)], CheckConfig())
    assert one["verdict"] == "PASS" and "| seed |" not in check_markdown(
        {"method": "x", "pool": "p", "config": {"target_ratio": 2.0, "junk_ratio": 0.5}, **one})


def test_planting_key_names_bundled_data_portably(tmp_path):
    """The planted directory's identity names bundled data as bundled:REL, so it is reused from another install."""
    from lmselect.check import CheckConfig, build_planted_inputs
    from lmselect.recipe import load_recipe

    plant = build_planted_inputs(load_recipe("demo"), tmp_path, CheckConfig())
    assert plant["key"]["corpus"] == ["bundled:demo/corpus/*.jsonl.gz"]
    assert plant["key"]["selection_set"] == "bundled:demo/lambada_select.jsonl"
    assert build_planted_inputs(load_recipe("demo"), tmp_path, CheckConfig())["key"] == plant["key"]  # reused


def test_junk_documents_are_capped_so_no_document_decides_a_rate(tmp_path):
    """--max-doc-chars: junk is made from at most that many characters of a corpus document, so one long source
    cannot become a junk document of dozens of sequences; the same character budget then spans more documents."""
    from lmselect.check import JUNK, CheckConfig, build_planted_inputs
    from lmselect.recipe import load_recipe

    def docs(plant: dict, kind: str) -> list[str]:
        return [json.loads(line)["text"] for line in Path(plant["files"][kind]).read_text().splitlines()]

    whole = build_planted_inputs(load_recipe("demo"), tmp_path / "whole", CheckConfig(max_doc_chars=0))
    capped = build_planted_inputs(load_recipe("demo"), tmp_path / "capped", CheckConfig(max_doc_chars=500))
    assert capped["key"]["max_doc_chars"] == 500 and whole["key"] != capped["key"]
    assert max(map(len, docs(whole, "planted_shuffled"))) > 500  # the demo corpus has longer documents
    assert max(map(len, docs(capped, "planted_shuffled"))) <= 500  # same characters as its (cut) source
    # a repeated sentence (at most 60 words) overshoots its cut source by less than one copy of itself
    assert max(map(len, docs(capped, "planted_repeated"))) < 500 + 1000
    assert np.median([len(d) for d in docs(capped, "planted_repeated")]) <= 600
    for kind in JUNK:
        assert capped["counts"][kind]["documents"] > whole["counts"][kind]["documents"]


def _scores(pool, kind: str, seed: int = 0) -> np.ndarray:
    """An oracle (target-like 1, junk 0, corpus 0.5) or random scores for every sequence of ``pool``."""
    ids = pool.ids(None)
    src = pool.sources(ids).astype(str)
    if kind == "random":
        return ids, np.random.default_rng(seed).random(len(ids))
    return ids, np.where(src == "planted_target", 1.0, np.where(np.char.startswith(src, "planted_"), 0.0, 0.5))


def test_prefilter_pipeline_and_method_tables_oracle_and_random(check_recipe, tmp_path, capsys):
    """--prefilter gopher_repetition: the planted junk goes through it like any input. The pipeline table counts
    what it removed (every repeated-sentence document), the method table judges only kinds that reached the method;
    an oracle scorer passes both, random scores fail the method on what reached it."""
    from lmselect.cli import main
    from lmselect.data.pool import TokenPool
    from lmselect.score import write_scores

    out = tmp_path / "pre"
    args = ["check", str(check_recipe), "--out", str(out), "--plant-fraction", "0.1", "--prefilter",
            "gopher_repetition", "--min-reached", "3"]
    assert main(args + ["--prepare-only"]) == 0
    pool = TokenPool(out / "pool")
    info = pool.manifest["extra"]["prefilter"]
    assert info["filters"] == ["gopher_repetition"]
    planted = json.loads((out / "inputs" / "plant.json").read_text())["counts"]
    assert info["per_source"]["planted_repeated"]["by_filter"] == {
        "gopher_repetition": planted["planted_repeated"]["documents"]}
    # the pipeline's denominators: every planted document's tokens (with EOS), removed ones included
    tok = pool.load_tokenizer()
    for name in ("planted_target", "planted_repeated"):
        texts = [json.loads(x)["text"] for x in (out / "inputs" / f"{name}.jsonl").read_text().splitlines()]
        assert info["per_source"][name]["input_tokens"] == sum(len(tok(t)["input_ids"]) + 1 for t in texts)
    for kind in ("oracle", "random"):
        write_scores(tmp_path / kind, *_scores(pool, kind))
        rc = main(args + ["--scores", str(tmp_path / kind)])
        res = json.loads((out / "check.json").read_text())
        pipe = res["pipeline"]
        rep = [r for r in pipe["rows"] if r["source"] == "planted_repeated"]
        assert [(r["planted"], r["removed"], r["reached"], r["selected_documents"], r["pass"]) for r in rep] == [
            (planted["planted_repeated"]["documents"],) * 2 + (0, 0, True)] * 2
        assert all(r["removed_by_filter"] == {"gopher_repetition": r["removed"]} for r in rep)
        # rate = the kind's selected tokens (docs.parquet spans of the round's top sequences) / its input tokens
        import pandas as pd

        spans = pd.read_parquet(out / "pool" / "docs.parquet")
        t1 = next(r for r in pipe["rows"] if r["source"] == "planted_target" and r["round"] == 1)
        from lmselect.check import scores_by_round
        from lmselect.score import read_scores

        _, _, sel1 = scores_by_round(pool, *read_scores(tmp_path / kind), 0.2, 2)[1]
        want = spans.loc[spans["seq_id"].isin(sel1) & (spans["source"] == "planted_target"), "length"].sum()
        assert t1["selected_tokens"] == want and t1["rate"] == pytest.approx(want / t1["input_tokens"])
        m_rep = [r for r in res["rows"] if r["source"] == "planted_repeated"]
        assert [(r["judged"], r["pass"], r["note"]) for r in m_rep] == [(False, False, "not judged (0 reached)")] * 2
        assert res["not_judged"] >= 2 and res["criteria"] + res["not_judged"] == 8
        if kind == "oracle":
            assert rc == 0 and res["verdict"] == pipe["verdict"] == "PASS" and res["method_verdict"] == "PASS"
        else:  # random on what reached it: target-like about the base rate
            assert res["method_verdict"] == "FAIL"
            assert rc == (0 if pipe["verdict"] == "PASS" else 1)
        md = (out / "check.md").read_text()
        assert "## Pipeline: prefilter (gopher_repetition) + scores" in md and "not judged (0 reached)" in md
    capsys.readouterr()
    assert main(args[:-4] + ["--prefilter", "none", "--prepare-only"]) == 2  # the same --out, another prefilter
    assert "its pool was prepared with prefilter gopher_repetition; this check asks for none" in capsys.readouterr().err


def test_check_plants_into_the_corpus_a_prepared_pool_came_from(check_recipe, tmp_path, capsys):
    """A recipe with pool.path: the check reads that pool's inputs and settings from its manifest and plants there;
    a pool whose inputs are gone is a one-line error that says what to set."""
    import shutil

    from lmselect.check import prepare_from_pool
    from lmselect.cli import main
    from lmselect.recipe import load_recipe

    r = load_recipe(check_recipe)
    pool = tmp_path / "pool"
    assert main(["prepare", *r.pool.prepare.inputs, "-o", str(pool), "--vocab-size", "512", "--seq-len", "64",
                 "--n-shards", "3", "--workers", "1", "--no-progress"]) == 0
    with_path = load_recipe(check_recipe, [f"--pool.path={pool}"])
    got = prepare_from_pool(with_path)
    assert got.pool.path is None and got.pool.prepare.inputs == r.pool.prepare.inputs
    assert got.pool.prepare.seq_len == 64 and got.pool.prepare.vocab_size == 512
    out = tmp_path / "chk"
    assert main(["check", str(check_recipe), f"--pool.path={pool}", "--out", str(out), "--plant-fraction", "0.1",
                 "--prepare-only"]) == 0
    assert (out / "pool" / "manifest.json").is_file()
    moved = tmp_path / "moved"
    shutil.copytree(pool, tmp_path / "pool2")
    m = json.loads((tmp_path / "pool2" / "manifest.json").read_text())
    m["config"]["inputs"] = [str(moved / "*.jsonl")]
    (tmp_path / "pool2" / "manifest.json").write_text(json.dumps(m))
    capsys.readouterr()
    assert main(["check", str(check_recipe), f"--pool.path={tmp_path / 'pool2'}", "--out", str(tmp_path / "c2"),
                 "--prepare-only"]) == 2
    err = capsys.readouterr().err
    assert "was prepared from inputs that cannot be read now" in err and "set pool.prepare.inputs" in err
    assert len(err.strip().splitlines()) == 1


def test_check_with_pool_path_honours_overrides_and_the_pools_decontamination(check_recipe, tmp_path, capsys):
    """Regression (issue 29, item 5): with pool.path, ``--prefilter=none`` (any pool.prepare override) was replaced
    by the pool's recorded settings, and the pool's drop-mode decontamination became flag mode for the corpus. Now
    the overrides apply on top of the pool's settings, the corpus is decontaminated as the pool was (the planted
    documents are flagged, never dropped), and the check says what its pool is."""
    from lmselect.cli import main
    from lmselect.recipe import load_recipe

    r = load_recipe(check_recipe)
    corpus_doc = json.loads(Path(sorted(Path(r.pool.prepare.inputs[0]).parent.glob("*.jsonl"))[0]).read_text()
                            .splitlines()[0])["text"]
    prot = tmp_path / "protected.jsonl"
    prot.write_text(json.dumps({"text": corpus_doc}) + "\n")
    pool = tmp_path / "pool"
    assert main(["prepare", *r.pool.prepare.inputs, "-o", str(pool), "--vocab-size", "512", "--seq-len", "64",
                 "--n-shards", "3", "--workers", "1", "--no-progress", "--prefilter", "gopher_repetition,c4",
                 "--decontaminate", str(prot), "--decontaminate", str(r.validation.selection),
                 "--decontam-mode", "drop"]) == 0
    assert json.loads((pool / "manifest.json").read_text())["extra"]["decontamination"]["dropped"] >= 1
    out = tmp_path / "chk"
    capsys.readouterr()
    assert main(["check", str(check_recipe), f"--pool.path={pool}", "--prefilter=none", "--out", str(out),
                 "--plant-fraction", "0.1", "--prepare-only"]) == 0
    said = capsys.readouterr().out
    assert f"check pool: prepared from the inputs and settings of pool.path {pool}" in said
    assert "prefilter none" in said and "decontamination drop against 2 protected set(s)" in said
    m = json.loads((out / "pool" / "manifest.json").read_text())
    assert not m["config"].get("prefilter") and "prefilter" not in m["extra"]  # --prefilter=none honoured
    dec = m["extra"]["decontamination"]
    assert dec["mode"] == "drop" and dec["dropped"] >= 1  # the corpus document is dropped, as in the pool
    target = dec["per_source"]["planted_target"]
    assert target["contaminated"] > 0 and target["dropped"] == 0  # planted selection-set text: flagged, kept
    # a --key=value override of pool.prepare is honoured the same way; a reused --out with another prefilter refused
    assert main(["check", str(check_recipe), f"--pool.path={pool}", "--out", str(out), "--prepare-only"]) == 2
    assert "prepared with prefilter none" in capsys.readouterr().err


def test_compare_controls_plants_the_pool_and_judges_the_known_answer_arms(check_recipe, tmp_path, capsys):
    """`compare --controls` end to end at tiny scale: the check's planted documents are in the pool, the methods see
    only the visible part of the selection set, the positive arm trains on every planted target-like sequence of its
    round (the rest from random's own selection), the negative arm on the planted junk, and the table gives the noise
    floor, the detectable effect and a verdict for both controls."""
    import pandas as pd

    from lmselect.cli import main
    from lmselect.data.pool import TokenPool

    out = tmp_path / "cmp"
    rc = main(["compare", str(check_recipe), "--controls", "--seeds", "2", "--methods", "random", "--out", str(out),
               "--no-report", "--warmup.steps=3", "--decay.steps=0", "--rounds=1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "## What this comparison can detect" in printed and "could detect ≥" in printed
    assert "## Known-answer controls" in printed
    res = json.loads((out / "results.json").read_text())
    arms = res["known_answer_controls"]["arms"]
    assert set(arms) == {"control_positive", "control_negative"} and "can_rank" in res["known_answer_controls"]
    assert res["noise_floor"]["val_loss.lambada"]["control_seeds"] == 2
    assert "selection_visible.jsonl" in (out / "config.yaml").read_text()
    pool = TokenPool(out / "pool")
    docs = pd.read_parquet(out / "pool" / "docs.parquet", columns=["seq_id", "source"])
    target = set(docs.loc[docs["source"] == "planted_target", "seq_id"])
    junk = set(docs.loc[docs["source"].isin(["planted_shuffled", "planted_repeated", "planted_random"]), "seq_id"])
    assert target and junk  # no prefilter here: every kind reaches the pool
    for seed in (0, 1):
        for rnd in (1,):
            cand = set(pool.ids(rnd).tolist())
            sel = {kind: set(np.load(out / kind / f"seed{seed}" / f"round{rnd}" / "selection" / "selected.npy").tolist())
                   for kind in ("random", "control_positive", "control_negative")}
            k = len(sel["random"])
            assert len(sel["control_positive"]) == len(sel["control_negative"]) == k
            pos_target = target & cand
            assert pos_target and (pos_target <= sel["control_positive"] if len(pos_target) <= k else
                                   sel["control_positive"] <= pos_target)
            assert sel["control_positive"] - pos_target <= sel["random"]  # the fill is random's own selection
            assert (junk & cand) <= sel["control_negative"] or sel["control_negative"] <= junk
    assert 0 < arms["control_positive"]["planted_share"] <= 1


def test_compare_scales_is_refused_in_one_line_before_any_compute(check_recipe, tmp_path, capsys):
    from lmselect.cli import main

    for arg, msg in (("debug", "give two different target presets"), ("debug,debug", "give two different"),
                     ("debug,pythia-99m", "unknown preset 'pythia-99m'")):
        assert main(["compare", str(check_recipe), "--scales", arg, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0]
    assert not (tmp_path / "x").exists()
