"""lmselect inspect: pool summary and samples; lineage for other artifacts; clear errors otherwise."""

from __future__ import annotations

import json
import sys
import types

from lmselect.artifacts import Manifest, write_manifest
from lmselect.cli import main
from lmselect.data.prepare import PrepareConfig, prepare


def test_inspect_prepared_pool(tmp_path, corpus, tok_dir, capsys):
    cfg = PrepareConfig(inputs=corpus, tokenizer=tok_dir, seq_len=16, n_shards=2, val_sequences=2, workers=1)
    out = prepare(cfg, tmp_path / "pool", progress=False)
    assert main(["inspect", str(out), "--n", "2", "--shard", "1"]) == 0
    text = capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    assert "seq_len 16" in text and m["extra"]["tokenizer_fingerprint"] in text
    for shard, k in m["counts"]["sequences_per_shard"].items():
        assert f"  {shard} " in text and f" {k} " in text
    assert "val (-1)" in text and "wiki" in text and "spam" in text
    assert text.count("\n--- seq ") == 2 and text.count("  shard 1  source ") == 2
    assert main(["inspect", str(out), "--shard", "7"]) == 2
    assert "shard 7 has no sequences" in capsys.readouterr().err


def test_inspect_write_pool_fixture(tiny_pool, capsys):
    # pools written directly with write_pool (no prepare counts) are summarised too
    assert main(["inspect", str(tiny_pool.path), "--n", "1", "--shard", "val"]) == 0
    text = capsys.readouterr().out
    assert "clean" in text and text.count("\n--- seq ") == 1 and "shard -1" in text


def test_inspect_non_pool_uses_lineage(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    write_manifest(run, Manifest(kind="run"))
    seen = []
    fake = types.ModuleType("lmselect.provenance")
    fake.print_lineage = lambda p, recipe=None: seen.append(str(p))
    monkeypatch.setitem(sys.modules, "lmselect.provenance", fake)
    assert main(["inspect", str(run)]) == 0 and seen == [str(run)]
    monkeypatch.setitem(sys.modules, "lmselect.provenance", None)  # import now fails
    assert main(["inspect", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"lmselect inspect: error: {run}: a 'run' artifact; lineage printing needs lmselect.provenance, which is not available"


def test_inspect_errors(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nothing")]) == 2
    assert f"{tmp_path / 'nothing'}: no such file or directory" in capsys.readouterr().err
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "tokens.bin").write_bytes(b"")
    (partial / "sequences.parquet").write_bytes(b"")
    assert main(["inspect", str(partial)]) == 2
    assert "incomplete artifact" in capsys.readouterr().err
