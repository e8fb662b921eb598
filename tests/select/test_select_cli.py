"""``lmselect select`` and ``write_selection``: top = brute-force sort, seeded Gumbel, per-source rates, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmselect.artifacts import is_complete, parent_ref, read_manifest
from lmselect.cli import main
from lmselect.data.tokenizer import tokenizer_fingerprint
from lmselect.score import write_scores
from lmselect.select.random import random_selection, select_random
from lmselect.select.selection import read_selection, write_selection


@pytest.fixture()
def scored(tmp_path, tiny_pool):
    """A scores sidecar over the pool's training sequences, with deliberate ties."""
    ids = tiny_pool.ids(None)
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 6, size=len(ids)).astype(np.float32) / 4  # few distinct values -> many ties
    d = write_scores(tmp_path / "scores", ids, scores, parents=[parent_ref(tiny_pool.path)])
    return d, ids, scores


def _select(*args: object) -> int:
    return main(["select", *map(str, args)])


def _brute(ids: np.ndarray, scores: np.ndarray, k: int, largest: bool = True) -> np.ndarray:
    key = [(-s if largest else s, i) for i, s in zip(ids.tolist(), scores.astype(np.float64).tolist())]
    return np.array(sorted(i for _, i in sorted(key)[:k]), dtype=np.int64)


@pytest.mark.parametrize("lowest", [False, True])
def test_top_equals_bruteforce_sort(tmp_path, tiny_pool, scored, lowest):
    d, ids, scores = scored
    out = tmp_path / "sel"
    flags = ["--lowest"] if lowest else []
    assert _select("--scores", d, "--pool", tiny_pool.path, "--fraction", 0.3, "--out", out, *flags) == 0
    k = int(round(0.3 * len(ids)))
    sel = read_selection(out)
    np.testing.assert_array_equal(sel, _brute(ids, scores, k, largest=not lowest))
    assert sel.dtype == np.int64 and np.all(np.diff(sel) > 0)
    s = json.loads((out / "summary.json").read_text())
    assert s["method"] == "top" and s["k"] == k and s["n_candidates"] == len(ids) and s["fraction"] == 0.3
    chosen = scores[np.isin(ids, sel)]
    assert s["threshold"] == pytest.approx(float(chosen.max() if lowest else chosen.min()))
    h = s["histogram"]
    assert len(h["edges"]) == 51 and len(h["all"]) == 50
    assert sum(h["all"]) == len(ids) and sum(h["selected"]) == k
    assert h["edges"][0] == pytest.approx(float(scores.min())) and h["edges"][-1] == pytest.approx(float(scores.max()))
    assert (out / "score_hist.png").stat().st_size > 1000 and (out / "config.yaml").is_file()
    m = read_manifest(out, kind="selection")
    assert {p["kind"] for p in m["parents"]} == {"scores", "pool"}
    assert m["counts"] == {"candidates": len(ids), "selected": k}


def test_gumbel_is_seeded(tmp_path, tiny_pool, scored):
    d, ids, _ = scored

    def run(seed: int, name: str) -> np.ndarray:
        out = tmp_path / name
        assert _select("--scores", d, "--pool", tiny_pool.path, "--fraction", 0.5, "--method", "gumbel",
                       "--temperature", 5.0, "--seed", seed, "--out", out) == 0
        return read_selection(out)

    a, b, c = run(1, "a"), run(1, "b"), run(2, "c")
    np.testing.assert_array_equal(a, b)
    assert len(a) == len(c) == len(ids) // 2
    assert not np.array_equal(a, c)  # temperature 5 on scores in [0, 1.25]: the noise dominates
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert s["method"] == "gumbel" and s["threshold"] is None and s["temperature"] == 5.0 and s["seed"] == 1


def test_gumbel_low_temperature_is_top_k(tmp_path, tiny_pool):
    ids = tiny_pool.ids(None)
    scores = np.linspace(0, 1, len(ids)).astype(np.float32)[::-1].copy()  # distinct, decreasing with id
    d = write_scores(tmp_path / "scores", ids, scores, parents=[parent_ref(tiny_pool.path)])
    out = tmp_path / "sel"
    assert _select("--scores", d, "--fraction", 0.25, "--method", "gumbel", "--temperature", 1e-6, "--out", out) == 0
    np.testing.assert_array_equal(read_selection(out), ids[: len(ids) // 4])


def test_per_source_rates_on_tiny_pool(tmp_path, tiny_pool, scored):
    d, ids, scores = scored
    out = tmp_path / "sel"
    assert _select("--scores", d, "--fraction", 0.5, "--out", out) == 0  # pool taken from the scores' manifest
    sel = read_selection(out)
    per = json.loads((out / "summary.json").read_text())["per_source"]
    src_all = tiny_pool.sources(ids)
    src_sel = tiny_pool.sources(sel)
    assert set(per) == {"clean", "spam"}
    for name in ("clean", "spam"):
        c, s = int((src_all == name).sum()), int((src_sel == name).sum())
        assert per[name] == {"candidates": c, "selected": s, "rate": pytest.approx(s / c)}
    assert sum(v["selected"] for v in per.values()) == len(sel)
    assert (out / "source_rates.png").is_file()


@pytest.mark.parametrize("bad", ["0", "1.5", "-0.2", "nan"])
def test_bad_fraction_is_a_one_line_error(tmp_path, tiny_pool, scored, capsys, bad):
    d, _, _ = scored
    rc = _select("--scores", d, "--pool", tiny_pool.path, "--fraction", bad, "--out", tmp_path / "sel")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "fraction" in err
    assert not (tmp_path / "sel").exists()


def test_same_command_twice_gives_identical_selection(tmp_path, tiny_pool, scored):
    d, _, _ = scored
    out = tmp_path / "sel"
    args = ["--scores", d, "--pool", tiny_pool.path, "--fraction", 0.2, "--method", "gumbel", "--seed", 4, "--out", out]
    assert _select(*args) == 0
    first = (out / "selected.npy").read_bytes()
    uuid = read_manifest(out)["uuid"]
    assert _select(*args) == 0
    assert (out / "selected.npy").read_bytes() == first
    assert read_manifest(out)["uuid"] != uuid and is_complete(out, "selection")  # rebuilt, atomically replaced


def test_pool_mismatch_and_foreign_out_dir_are_refused(tmp_path, tiny_pool, tiny_tokenizer, scored, capsys):
    from lmselect.testing import make_pool

    d, _, _ = scored
    other = make_pool(tmp_path / "other_pool", tiny_tokenizer, seed=1)
    assert _select("--scores", d, "--pool", other, "--fraction", 0.2, "--out", tmp_path / "sel") == 2
    assert "computed on pool" in capsys.readouterr().err
    # --out pointing at the pool itself must not destroy it
    assert _select("--scores", d, "--fraction", 0.2, "--out", tiny_pool.path) == 2
    assert is_complete(tiny_pool.path, "pool")


def test_random_selection_has_no_histogram(tmp_path, tiny_pool):
    ids = tiny_pool.ids(0)
    a = select_random(tiny_pool, ids, 0.25, seed=7)
    np.testing.assert_array_equal(a, select_random(tiny_pool, ids, 0.25, seed=7))
    assert len(a) == 4 and np.all(np.isin(a, ids))
    out = random_selection(tmp_path / "sel", tiny_pool, ids, 0.25, seed=7)
    np.testing.assert_array_equal(read_selection(out), a)
    s = json.loads((out / "summary.json").read_text())
    assert s["method"] == "random" and s["histogram"] is None and s["threshold"] is None and s["seed"] == 7
    assert sum(v["candidates"] for v in s["per_source"].values()) == len(ids)
    assert not (out / "score_hist.png").exists()
    assert read_manifest(out, kind="selection")["seed"] == 7


def test_write_selection_rejects_non_candidates(tmp_path, tiny_pool):
    from lmselect.artifacts import LmselectError

    with pytest.raises(LmselectError, match="not candidates"):
        write_selection(tmp_path / "sel", tiny_pool, np.arange(4), None, np.array([1, 9]), "random", 0.5)


def test_score_then_select_end_to_end(tmp_path, tiny_pool, tiny_tokenizer):
    from lmselect.models.presets import build_model
    from lmselect.models.scorer import SequenceScorer
    from lmselect.score import read_scores

    SequenceScorer.from_causal_lm(build_model("debug", len(tiny_tokenizer), seed=0), seed=0).save_pretrained(
        tmp_path / "m", extra={"tokenizer_fingerprint": tokenizer_fingerprint(tiny_tokenizer)}
    )
    assert main(["score", "--model", str(tmp_path / "m"), "--pool", str(tiny_pool.path), "--pool-shard", "1",
                 "--out", str(tmp_path / "scores"), "--no-progress"]) == 0
    assert _select("--scores", tmp_path / "scores", "--fraction", 0.25, "--out", tmp_path / "sel") == 0
    ids, scores = read_scores(tmp_path / "scores")
    np.testing.assert_array_equal(read_selection(tmp_path / "sel"), _brute(ids, scores, 4))
    assert np.all(np.isin(read_selection(tmp_path / "sel"), tiny_pool.ids(1)))


def test_threshold_for_pipeline_methods_only_when_the_cut_is_sharp(tmp_path, tiny_pool):
    from lmselect.select.topk import top_fraction

    ids = tiny_pool.ids(0)
    scores = np.random.default_rng(0).normal(size=len(ids))
    sharp = top_fraction(ids, scores, 0.25)
    write_selection(tmp_path / "a", tiny_pool, ids, scores, sharp, "bliss", 0.25)
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert s["threshold"] == pytest.approx(float(scores[np.isin(ids, sharp)].min()))
    not_sharp = np.sort(np.concatenate([sharp[1:], ids[~np.isin(ids, sharp)][:1]]))
    write_selection(tmp_path / "b", tiny_pool, ids, scores, not_sharp, "mates", 0.25)
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["threshold"] is None


def test_select_documents_of_a_scored_jsonl(tmp_path, tiny_pool, tiny_tokenizer, capsys):
    """Scores of a .jsonl file: select ranks documents by their rolled-up score and writes the original records."""
    import gzip

    from lmselect.models.presets import build_model
    from lmselect.models.scorer import SequenceScorer
    from lmselect.score import read_documents
    from lmselect.testing import SAMPLE_TEXT

    SequenceScorer.from_causal_lm(build_model("debug", len(tiny_tokenizer), seed=0), activation="identity",
                                  seed=0).save_pretrained(
        tmp_path / "m", extra={"tokenizer_fingerprint": tokenizer_fingerprint(tiny_tokenizer)})
    recs = [{"id": f"doc{i}", "text": " ".join(SAMPLE_TEXT[i : i + 1 + i % 3]), "source": ["a", "b"][i % 2],
             "meta": {"n": i}} for i in range(10)]
    lines = [json.dumps(r, indent=None, separators=(", ", ": ")) for r in recs]
    lines.insert(4, "")  # a blank line: not a record, but it shifts the line numbers
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(lines) + "\n")
    scores = tmp_path / "scores"
    assert main(["score", "--model", str(tmp_path / "m"), "--jsonl", str(src), "--tokenizer-from",
                 str(tiny_pool.path), "--seq-len", "8", "--out", str(scores), "--no-progress"]) == 0
    out = tmp_path / "sel"
    capsys.readouterr()
    assert _select("--scores", scores, "--fraction", 0.3, "--out", out) == 0
    assert "selected 3 of 10 documents" in capsys.readouterr().out
    docs = read_documents(scores).to_pylist()
    want = sorted(sorted(docs, key=lambda d: (-d["score"], d["doc_index"]))[:3], key=lambda d: d["doc_index"])
    np.testing.assert_array_equal(read_selection(out), [d["doc_index"] for d in want])
    with gzip.open(out / "selected.jsonl.gz", "rt") as f:
        got = f.read().splitlines()
    assert got == [lines[d["line"] - 1] for d in want]  # the original lines, unchanged, in file order
    assert [json.loads(g)["id"] for g in got] == [d["doc_id"] for d in want]
    s = json.loads((out / "summary.json").read_text())
    assert s["unit"] == "documents" and s["k"] == 3 and s["n_candidates"] == 10
    assert set(s["per_source"]) == {"a", "b"} and sum(v["selected"] for v in s["per_source"].values()) == 3
    m = read_manifest(out, kind="selection")
    assert [p["kind"] for p in m["parents"]] == ["scores"]
    # lowest, and errors: pool flags do not apply; a changed file is refused
    assert _select("--scores", scores, "--fraction", 0.3, "--lowest", "--out", tmp_path / "low") == 0
    low = sorted(sorted(docs, key=lambda d: (d["score"], d["doc_index"]))[:3], key=lambda d: d["doc_index"])
    np.testing.assert_array_equal(read_selection(tmp_path / "low"), [d["doc_index"] for d in low])
    capsys.readouterr()
    assert _select("--scores", scores, "--fraction", 0.3, "--pool-shard", "1", "--out", tmp_path / "x") == 2
    assert "--pool" in capsys.readouterr().err
    src.write_text(src.read_text() + json.dumps({"text": "one more"}) + "\n")
    assert _select("--scores", scores, "--fraction", 0.3, "--out", tmp_path / "y") == 2
    err = capsys.readouterr().err.strip()
    assert "changed since it was scored" in err and len(err.splitlines()) == 1 and not (tmp_path / "y").exists()
