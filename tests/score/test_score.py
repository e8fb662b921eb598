"""``lmselect score``: sidecar equals a direct forward, sharding, resume, torchrun ranks, --lm-loss, raw jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmselect.artifacts import ArtifactError, LmselectError, is_complete, read_manifest
from lmselect.cli import main
from lmselect.data.tokenizer import tokenizer_fingerprint
from lmselect.models.losses import sequence_ce
from lmselect.models.presets import build_model
from lmselect.models.scorer import SequenceScorer
from lmselect.score import (
    part_name,
    partial_name,
    read_scores,
    read_scores_table,
    score_pool,
)


@pytest.fixture()
def lm(tiny_tokenizer):
    return build_model("debug", len(tiny_tokenizer), seed=0)


@pytest.fixture()
def scorer(lm):
    # identity head: a wide, tie-free spread of scores (sigmoid squeezes them near 0.5)
    return SequenceScorer.from_causal_lm(lm, activation="identity", seed=0).eval()


@pytest.fixture()
def scorer_dir(tmp_path, scorer, tiny_tokenizer):
    d = tmp_path / "scorer"
    scorer.save_pretrained(d, extra={"tokenizer_fingerprint": tokenizer_fingerprint(tiny_tokenizer)})
    return d


def _direct(scorer: torch.nn.Module, batch: torch.Tensor, mask: torch.Tensor | None = None) -> np.ndarray:
    with torch.no_grad():
        return scorer(batch, attention_mask=mask).float().numpy()


def _cli(*args: object) -> int:
    return main(["score", *map(str, args), "--no-progress"])


def test_score_pool_cli_equals_direct_forward(tmp_path, tiny_pool, scorer, scorer_dir):
    tokens_mtime = (tiny_pool.path / "tokens.bin").stat().st_mtime_ns
    out = tmp_path / "scores"
    assert _cli("--model", scorer_dir, "--pool", tiny_pool.path, "--out", out, "--batch-size", 5) == 0
    ids, scores = read_scores(out)
    assert ids.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(ids, tiny_pool.ids(None))  # every training sequence, no hold-out
    np.testing.assert_allclose(scores, _direct(scorer, tiny_pool.batch(ids)), rtol=1e-5, atol=1e-5)
    m = read_manifest(out, kind="scores")
    assert [p["kind"] for p in m["parents"]] == ["pool"]
    assert m["counts"]["sequences"] == len(ids) and m["counts"]["parts"] == 1
    assert m["timings"]["sequences_per_s"] > 0 and m["extra"]["pool_shards"] == [0, 1]
    assert (out / part_name(0, 1)).is_file() and (out / "config.yaml").is_file()
    # a sidecar only: the pool is untouched
    assert (tiny_pool.path / "tokens.bin").stat().st_mtime_ns == tokens_mtime
    assert is_complete(tiny_pool.path, "pool")


def test_pool_shard_option_selects_shards(tmp_path, tiny_pool, scorer, scorer_dir):
    out = tmp_path / "s1"
    assert _cli("--model", scorer_dir, "--pool", tiny_pool.path, "--pool-shard", "1,val", "--out", out) == 0
    ids, scores = read_scores(out)
    np.testing.assert_array_equal(ids, np.sort(np.concatenate([tiny_pool.ids(1), tiny_pool.ids("val")])))
    np.testing.assert_allclose(scores, _direct(scorer, tiny_pool.batch(ids)), rtol=1e-5, atol=1e-5)
    assert _cli("--model", scorer_dir, "--pool", tiny_pool.path, "--pool-shard", "7", "--out", tmp_path / "x") == 2


def test_sharded_parts_merge_to_unsharded(tmp_path, tiny_pool, scorer_dir):
    full, sh = tmp_path / "full", tmp_path / "sharded"
    assert _cli("--model", scorer_dir, "--pool", tiny_pool.path, "--out", full, "--batch-size", 7) == 0
    assert _cli("--model", scorer_dir, "--pool", tiny_pool.path, "--out", sh, "--shard", "0/2", "--batch-size", 4) == 0
    assert (sh / part_name(0, 2)).is_file() and not (sh / part_name(1, 2)).exists()
    assert not is_complete(sh)
    with pytest.raises(ArtifactError):
        read_scores(sh)  # incomplete sidecars are refused
    assert _cli("--model", scorer_dir, "--pool", tiny_pool.path, "--out", sh, "--shard", "1/2", "--batch-size", 4) == 0
    assert is_complete(sh, "scores")  # the last part to finish wrote the manifest
    a_ids, a = read_scores(full)
    b_ids, b = read_scores(sh)
    np.testing.assert_array_equal(a_ids, b_ids)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # the two parts are disjoint, contiguous halves
    import pyarrow.parquet as pq

    p0 = pq.read_table(sh / part_name(0, 2)).column("seq_id").to_numpy()
    p1 = pq.read_table(sh / part_name(1, 2)).column("seq_id").to_numpy()
    assert len(p0) + len(p1) == len(a_ids) and p0.max() < p1.min()


def test_resume_recomputes_only_the_missing_part(tmp_path, tiny_pool, scorer_dir):
    out = tmp_path / "scores"
    assert _cli("--model", scorer_dir, "--pool", tiny_pool.path, "--out", out, "--num-parts", 3) == 0
    ids0, s0 = read_scores(out)
    mt = {i: (out / part_name(i, 3)).stat().st_mtime_ns for i in range(3)}
    uuid0 = read_manifest(out)["uuid"]
    # complete: a rerun recomputes nothing and keeps the manifest
    assert _cli("--model", scorer_dir, "--pool", tiny_pool.path, "--out", out) == 0
    assert {i: (out / part_name(i, 3)).stat().st_mtime_ns for i in range(3)} == mt
    assert read_manifest(out)["uuid"] == uuid0
    (out / part_name(1, 3)).unlink()
    # plain rerun (no --num-parts): the existing 3-way split is picked up, only part 1 is computed
    assert _cli("--model", scorer_dir, "--pool", tiny_pool.path, "--out", out) == 0
    assert (out / part_name(0, 3)).stat().st_mtime_ns == mt[0]
    assert (out / part_name(2, 3)).stat().st_mtime_ns == mt[2]
    m = read_manifest(out, kind="scores")
    assert m["uuid"] != uuid0  # the stale manifest was replaced
    computed = [p["computed_now"] for p in m["extra"]["parts"]]
    assert computed[1] == len(np.array_split(ids0, 3)[1])
    ids1, s1 = read_scores(out)
    np.testing.assert_array_equal(ids0, ids1)
    np.testing.assert_allclose(s0, s1, rtol=1e-5, atol=1e-6)
    # a different split into the same directory is refused with a one-line error
    assert _cli("--model", scorer_dir, "--pool", tiny_pool.path, "--out", out, "--num-parts", 2) == 2


class _Counting(torch.nn.Module):
    """Wraps a scorer: counts scored rows and can fail on the n-th call (a killed process)."""

    def __init__(self, inner: torch.nn.Module, fail_at: int | None = None):
        super().__init__()
        self.inner, self.fail_at, self.calls, self.rows = inner, fail_at, 0, 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise KeyboardInterrupt  # what a SIGINT looks like mid-part
        self.rows += len(input_ids)
        return self.inner(input_ids, attention_mask=attention_mask)


def test_partial_checkpoint_resumes_inside_a_part(tmp_path, tiny_pool, scorer):
    out = tmp_path / "scores"
    ids = tiny_pool.ids(None)  # 32 sequences -> 8 batches of 4
    dying = _Counting(scorer, fail_at=6)
    with pytest.raises(KeyboardInterrupt):
        score_pool(dying, tiny_pool, ids, out, batch_size=4, checkpoint_every=2, progress=False)
    assert (out / partial_name(0, 1)).is_file() and not (out / part_name(0, 1)).exists()
    again = _Counting(scorer)
    score_pool(again, tiny_pool, ids, out, batch_size=4, checkpoint_every=2, progress=False)
    assert again.rows == len(ids) - 16  # 4 batches were checkpointed before the kill
    assert not (out / partial_name(0, 1)).exists()
    got_ids, got = read_scores(out)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_allclose(got, _direct(scorer, tiny_pool.batch(ids)), rtol=1e-5, atol=1e-5)


def test_torchrun_ranks_each_take_their_part(tmp_path, tiny_pool, scorer_dir, monkeypatch):
    out = tmp_path / "scores"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert _cli("--model", scorer_dir, "--pool", tiny_pool.path, "--out", out) == 0
    assert (out / part_name(1, 2)).is_file() and not (out / part_name(0, 2)).exists() and not is_complete(out)
    monkeypatch.setenv("RANK", "0")
    assert _cli("--model", scorer_dir, "--pool", tiny_pool.path, "--out", out) == 0
    assert is_complete(out, "scores")
    # a cluster-array task under torchrun: --shard 1/2 with 2 ranks -> parts 2 and 3 of 4
    out2 = tmp_path / "arr"
    monkeypatch.setenv("RANK", "1")
    assert _cli("--model", scorer_dir, "--pool", tiny_pool.path, "--out", out2, "--shard", "1/2") == 0
    assert [p.name for p in out2.glob("part-*.parquet")] == [part_name(3, 4)]


def test_lm_loss_scores_are_negative_mean_ce(tmp_path, tiny_pool, lm, capsys, tiny_tokenizer):
    ckpt = tmp_path / "ckpt"
    lm.save_pretrained(ckpt)
    tiny_tokenizer.save_pretrained(ckpt)  # a plain HF checkpoint carries its tokenizer
    out = tmp_path / "scores"
    assert _cli("--model", ckpt, "--lm-loss", "--pool", tiny_pool.path, "--pool-shard", "0", "--out", out) == 0
    ids, scores = read_scores(out)
    with torch.no_grad():
        ref = -sequence_ce(lm.eval(), tiny_pool.batch(ids)).numpy()
    np.testing.assert_allclose(scores, ref, rtol=1e-5, atol=1e-5)
    capsys.readouterr()
    assert _cli("--model", ckpt, "--pool", tiny_pool.path, "--out", tmp_path / "x") == 2
    err = capsys.readouterr().err.strip()
    assert "--lm-loss" in err and len(err.splitlines()) == 1


def _write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_jsonl_windows_carry_doc_ids_and_offsets(tmp_path, tiny_pool, tiny_tokenizer, scorer, scorer_dir):
    long = " ".join(["The quick brown fox jumps over the lazy dog."] * 4)
    recs = [
        {"id": "doc-a", "text": long},
        {"text": "Rain is expected in the north."},  # no id -> its line number
        "",  # blank line: skipped but counted
        {"id": 7, "text": ""},  # empty text: no windows
        {"id": "doc-d", "text": "She opened the door and saw the garden covered in snow."},
    ]
    src = _write_jsonl(tmp_path / "docs.jsonl", recs)
    out = tmp_path / "scores"
    seq_len = 8
    assert _cli("--model", scorer_dir, "--jsonl", src, "--tokenizer-from", tiny_pool.path, "--seq-len", seq_len,
                "--out", out, "--batch-size", 3) == 0
    t = read_scores_table(out).to_pylist()
    assert {r["doc_id"] for r in t} == {"doc-a", "docs.jsonl/1", "doc-d"}  # no id: datatrove's file/line id
    texts = {"doc-a": recs[0]["text"], "docs.jsonl/1": recs[1]["text"], "doc-d": recs[4]["text"]}
    for doc_id, text in texts.items():
        rows = [r for r in t if r["doc_id"] == doc_id]  # sorted by seq_id = window order
        enc = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(rows) == -(-len(enc) // seq_len)
        # windows tile the text: consecutive spans, first at 0, last at the end
        assert rows[0]["char_start"] == 0 and rows[-1]["char_end"] == len(text)
        assert "".join(text[r["char_start"] : r["char_end"]] for r in rows) == text
        for w, r in enumerate(rows):
            win = enc[w * seq_len : (w + 1) * seq_len]
            assert text[r["char_start"] : r["char_end"]] == tiny_tokenizer.decode(win)  # offsets slice the window
            ref = _direct(scorer, torch.tensor([win]))[0]
            assert r["score"] == pytest.approx(float(ref), abs=1e-5)
    m = read_manifest(out, kind="scores")
    assert m["counts"]["documents"] == 4 and m["counts"]["empty_documents"] == 1
    assert m["counts"]["windows"] == len(t)


def test_jsonl_reader_is_prepares_zst_text_field_skip_and_count(tmp_path, tiny_pool, scorer_dir, caplog):
    """Regression (issue 21, item 7): ``score --jsonl`` reads like prepare: .jsonl.zst, ``--text-field``, malformed
    lines skipped and counted (with the right line number for bad UTF-8) and a warning when many are; every line
    keeps its row so the attribute file stays line-aligned."""
    import logging

    import zstandard

    lines = [json.dumps({"id": "m1", "content": "Subject: meeting moved to Thursday afternoon."}).encode(),
             json.dumps({"id": "m2", "content": "Your parcel could not be delivered today."}).encode(),
             json.dumps({"id": 3, "body": "no content field"}).encode(),
             b'{"id": "m4", "content": "caf\xe9 au lait"}',  # Latin-1 byte: not UTF-8
             json.dumps({"id": "m5", "content": "Minutes of the budget review are attached."}).encode()]
    src = tmp_path / "mail.jsonl.zst"
    src.write_bytes(zstandard.ZstdCompressor().compress(b"\n".join(lines) + b"\n"))
    out = tmp_path / "scores"
    with caplog.at_level(logging.WARNING, logger="lmselect"):
        assert _cli("--model", scorer_dir, "--jsonl", src, "--tokenizer-from", tiny_pool.path, "--seq-len", 8,
                    "--text-field", "content", "--out", out) == 0
    m = read_manifest(out, kind="scores")
    assert m["counts"]["skipped"] == 2 and m["counts"]["skipped_by_reason"] == {"bad_utf8": 1, "no_text_field": 1}
    assert any(e.startswith(f"{src}:4: not valid UTF-8") for e in m["extra"]["skipped_examples"])
    assert any("2 of 5 records" in r.getMessage() and "malformed" in r.getMessage() for r in caplog.records)
    from lmselect.score import read_documents

    docs = read_documents(out).to_pylist()
    assert [d["malformed"] for d in docs] == [False, False, True, True, False]
    assert [d["line"] for d in docs] == [1, 2, 3, 4, 5]
    attrs = [json.loads(x) for x in zstandard.ZstdDecompressor().stream_reader(
        (out / "attributes" / "lmselect" / "mail.jsonl.zst").open("rb")).read().splitlines()]
    assert [a["id"] for a in attrs] == ["m1", "m2", 3, None, "m5"]  # one line per input line, ids as in the file
    assert attrs[2]["attributes"]["lmselect__score"] == [] and attrs[0]["attributes"]["lmselect__score"]


def test_strict_reader_names_the_right_line_for_bad_utf8(tmp_path):
    """Regression: bad UTF-8 on line 4 of a .gz file was reported as line 1."""
    import gzip

    from lmselect.data.readers import iter_json_records

    p = tmp_path / "val.jsonl.gz"
    p.write_bytes(gzip.compress(b'{"text": "a"}\n{"text": "b"}\n{"text": "c"}\n{"text": "d\xff"}\n'))
    with pytest.raises(LmselectError, match=r"val\.jsonl\.gz:4: not valid UTF-8"):
        list(iter_json_records(p))


def test_other_job_into_same_dir_is_refused(tmp_path, tiny_pool, scorer_dir, capsys):
    out = tmp_path / "scores"
    assert _cli("--model", scorer_dir, "--pool", tiny_pool.path, "--pool-shard", "0", "--out", out) == 0
    capsys.readouterr()
    assert _cli("--model", scorer_dir, "--pool", tiny_pool.path, "--pool-shard", "1", "--out", out) == 2
    assert "different job" in capsys.readouterr().err
    with pytest.raises(LmselectError, match="--shard"):
        from lmselect.score import parse_shard

        parse_shard("2/2")


def test_lm_loss_checks_the_tokenizer_a_plain_checkpoint_carries(tmp_path, tiny_pool, lm, capsys):
    """Regression (issue 21, item 2): an off-the-shelf HF checkpoint whose tokenizer differs from the pool's scored
    with rc 0 (plausible garbage). Now: refused in one line before any compute; a checkpoint with no tokenizer is
    refused unless --trust-tokenizer."""
    from lmselect.data.tokenizer import train_bpe
    from lmselect.testing import SAMPLE_TEXT

    other = train_bpe([t.upper() for t in SAMPLE_TEXT] * 4, vocab_size=300)
    ckpt = tmp_path / "hf-ckpt"
    lm.save_pretrained(ckpt)
    other.save_pretrained(ckpt)
    docs = _write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "text": "She opened the door and saw the garden."}])
    for inp in (["--pool", tiny_pool.path, "--pool-shard", "0"], ["--jsonl", docs, "--tokenizer-from", tiny_pool.path]):
        capsys.readouterr()
        assert _cli("--model", ckpt, "--lm-loss", *inp, "--out", tmp_path / "x") == 2
        err = capsys.readouterr().err.strip()
        assert "tokenizer mismatch" in err and len(err.splitlines()) == 1
        assert not (tmp_path / "x").exists()
    bare = tmp_path / "bare-ckpt"  # weights only: nothing to check
    lm.save_pretrained(bare)
    capsys.readouterr()
    assert _cli("--model", bare, "--lm-loss", "--pool", tiny_pool.path, "--pool-shard", "0", "--out", tmp_path / "y") == 2
    err = capsys.readouterr().err.strip()
    assert "--trust-tokenizer" in err and len(err.splitlines()) == 1
    assert _cli("--model", bare, "--lm-loss", "--trust-tokenizer", "--pool", tiny_pool.path, "--pool-shard", "0",
                "--out", tmp_path / "y") == 0
