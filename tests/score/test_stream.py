"""``score --jsonl`` streamed (issue 31 item 2): blocks of lines scored as they are read, ``--shard i/n`` reading only
its own files (or its blocks of a shared file), and the merge of n shards writing exactly what one process writes."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import lmselect.data.readers as readers
import lmselect.score.windows as windows
from lmselect.artifacts import is_complete, read_manifest
from lmselect.cli import main
from lmselect.score import DOCUMENTS_FILE, read_scores_table
from lmselect.testing import SAMPLE_TEXT


def _lines(k: int, n: int) -> list[str]:
    """``n`` lines of file ``k``: records of 1 to 4 windows, with a blank line, a malformed one, one without an id
    and an empty text among them."""
    out = []
    for i in range(n):
        if i == 3:
            out.append("")  # blank line
        elif i == 5:
            out.append('{"id": "bad", "text": ')  # malformed
        elif i == 6:
            out.append(json.dumps({"text": SAMPLE_TEXT[(k + i) % 8]}))  # no id: "<file>/<line>"
        elif i == 7:
            out.append(json.dumps({"id": i, "text": ""}))
        else:
            out.append(json.dumps({"id": f"f{k}-{i}", "text": " ".join(SAMPLE_TEXT[(k + i + j) % 8]
                                                                       for j in range(1 + i % 4))}))
    return out


def _corpus(root: Path, sizes: list[int]) -> Path:
    root.mkdir()
    for k, n in enumerate(sizes):
        data = ("\n".join(_lines(k, n)) + "\n").encode()
        p = root / ("sub" if k % 2 else "") / f"part-{k}.jsonl{'.gz' if k % 2 else ''}"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(gzip.compress(data, mtime=0) if k % 2 else data)
    return root


def _score(scorer_dir: Path, src: Path, pool: Path, out: Path, *extra: object) -> int:
    return main(["score", "--model", str(scorer_dir), "--jsonl", str(src), "--tokenizer-from", str(pool),
                 "--seq-len", "8", "--batch-size", "3", "--out", str(out), "--no-progress", *map(str, extra)])


def _outputs(out: Path) -> dict[str, bytes]:
    """Every merged output's bytes: documents.parquet and the attribute files."""
    files = [out / DOCUMENTS_FILE, *sorted((out / "attributes").rglob("*"))]
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in files if p.is_file()}


@pytest.mark.parametrize("sizes,block_lines,block_bytes", [([10, 14, 9, 12], 5, 1 << 20), ([40], 4, 1 << 20),
                                                           ([40], 1000, 600)],
                         ids=["files", "shared-file", "shared-file-bytes"])
def test_three_shards_merge_to_what_one_process_writes(tmp_path, tiny_pool, scorer_dir, monkeypatch, sizes,
                                                       block_lines, block_bytes):
    """4 files over 3 shards (each reads only its own files), and 1 file of 10 blocks (cut by lines, or by bytes)
    over 3 shards (each decodes and scores only its own blocks): documents.parquet, the attribute files and the
    window rows are byte-identical to one process's, and so are the manifest's counts."""
    monkeypatch.setattr(windows, "BLOCK_LINES", block_lines)
    monkeypatch.setattr(windows, "BLOCK_BYTES", block_bytes)
    src = _corpus(tmp_path / "corpus", sizes)
    one, three = tmp_path / "one", tmp_path / "three"
    assert _score(scorer_dir, src, tiny_pool.path, one) == 0
    opened: list[str] = []
    real_open = readers.open_binary
    monkeypatch.setattr(readers, "open_binary", lambda p: opened.append(Path(p).name) or real_open(p))
    files = [rel for _, rel in readers.resolve_jsonl_inputs(src)]
    owners = windows.shard_owners(len(files), 3)
    for s in range(3):
        opened.clear()
        assert _score(scorer_dir, src, tiny_pool.path, three, "--shard", f"{s}/3") == 0
        assert sorted(opened) == sorted(Path(files[f]).name for f in range(len(files)) if s in owners[f])
        assert is_complete(three, "scores") == (s == 2)  # the last shard to finish merges
    if len(sizes) > 1:
        assert owners == [[0], [0], [1], [2]]  # whole files: a shard opens only its own
    else:
        assert owners == [[0, 1, 2]]  # a shared file: blocks 0, 3, 6, ... / 1, 4, 7, ... / 2, 5, 8, ...
        n_blocks = len(list((three / "blocks").glob("*.docs.parquet")))
        assert n_blocks >= 6, n_blocks  # every shard had blocks to score
    a, b = _outputs(one), _outputs(three)
    assert sorted(a) == sorted(b) and len(a) == 1 + len(sizes)
    for name in a:
        assert a[name] == b[name], name
    ta, tb = read_scores_table(one), read_scores_table(three)
    assert ta.equals(tb)
    ma, mb = read_manifest(one, kind="scores"), read_manifest(three, kind="scores")
    assert mb["counts"]["parts"] == 3 and ma["counts"]["parts"] == 1
    drop = ("parts",)
    assert {k: v for k, v in ma["counts"].items() if k not in drop} == \
        {k: v for k, v in mb["counts"].items() if k not in drop}
    assert ma["counts"]["blank_lines"] == len(sizes) and ma["counts"]["skipped"] == len(sizes)
    assert ma["counts"]["documents_without_id"] == 2 * len(sizes)  # the malformed line has no usable id either
    # ids do not depend on the split: "<file>/<0-based line>" for the records without one, line-aligned rows
    docs = pq.read_table(one / DOCUMENTS_FILE).to_pylist()
    assert len(docs) == sum(sizes)
    assert [d["doc_id"] for d in docs if d["id_derived"]] == [f"{f}/{i}" for f in files for i in (5, 6)]
    assert [d["doc_index"] for d in docs] == list(range(sum(sizes)))
    assert list(ta.column("seq_id").to_numpy()) == list(range(ta.num_rows))


def test_killed_run_resumes_from_its_blocks(tmp_path, tiny_pool, scorer_dir, monkeypatch):
    """A run killed after some blocks: the rerun scores only the blocks that are missing, and its output equals an
    uninterrupted run's."""
    monkeypatch.setattr(windows, "BLOCK_LINES", 4)
    src = _corpus(tmp_path / "corpus", [12, 9])
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert _score(scorer_dir, src, tiny_pool.path, full) == 0
    real = windows._score_block
    calls: list[int] = []

    def dies_after_three(*a, **k):
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process is killed while reading block 4
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(windows, "_score_block", dies_after_three)
    assert _score(scorer_dir, src, tiny_pool.path, cut) != 0  # "interrupted; rerun the same command to resume"
    assert not is_complete(cut, "scores") and len(list((cut / "blocks").glob("*.docs.parquet"))) == 3
    scored: list[int] = []
    monkeypatch.setattr(windows, "_score_block", lambda *a, **k: scored.append(1) or real(*a, **k))
    assert _score(scorer_dir, src, tiny_pool.path, cut) == 0
    assert len(scored) == 3  # 12 + 9 lines = 3 + 3 blocks of 4; three were on disk
    assert _outputs(cut) == _outputs(full)
    assert read_scores_table(cut).equals(read_scores_table(full))
    m = read_manifest(cut, kind="scores")
    assert 0 < m["extra"]["parts"][0]["computed_now"] < m["counts"]["windows"]
