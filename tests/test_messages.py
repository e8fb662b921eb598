"""Regression (issue 29, item 8): messages that named the wrong thing or nothing."""

from __future__ import annotations

import json

import numpy as np

from lmselect.artifacts import parent_ref
from lmselect.cli import main
from lmselect.data.pool import TokenPool
from lmselect.score import write_scores
from lmselect.testing import SAMPLE_TEXT


def _corpus(tmp_path, field: str = "text", n: int = 40):
    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps({"id": f"d{i}", field: " ".join(SAMPLE_TEXT[i % 8 : i % 8 + 3])}) + "\n"
                         for i in range(n)))
    return p


def test_inspect_pool_says_what_decontamination_did(tmp_path, capsys):
    src = _corpus(tmp_path)
    prot = tmp_path / "protected.jsonl"
    prot.write_text(json.dumps({"text": SAMPLE_TEXT[0]}) + "\n")
    args = ["--seq-len", "16", "--n-shards", "1", "--vocab-size", "300", "--no-progress"]
    assert main(["prepare", str(src), "--out", str(tmp_path / "p1"), "--decontaminate", str(prot), *args]) == 0
    assert main(["prepare", str(src), "--out", str(tmp_path / "p0"), *args]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "p1"), "--n", "0"]) == 0
    text = capsys.readouterr().out
    assert "decontamination: " in text and "documents overlap the protected sets" in text and str(prot) in text
    assert main(["inspect", str(tmp_path / "p0"), "--n", "0"]) == 0
    assert "decontamination: off" in capsys.readouterr().out


def test_a_wrong_text_field_is_named(tmp_path, capsys):
    src = _corpus(tmp_path, field="content")
    with src.open("a") as f:
        f.write(json.dumps({"id": "x", "text": "One record with the default field."}) + "\n")
    assert main(["prepare", str(src), "--out", str(tmp_path / "p"), "--seq-len", "64", "--n-shards", "1",
                 "--vocab-size", "300", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "40 of 41 records have no 'text' field (their fields: id, content): check --text-field" in err


def test_export_refusal_names_the_final_round_not_none(tmp_path, tiny_pool, capsys):
    run = tmp_path / "run"
    ids = tiny_pool.ids(None)
    sc = write_scores(tmp_path / "sc", ids, np.arange(len(ids), dtype=np.float32), parents=[parent_ref(tiny_pool.path)])
    for r in (1, 2):
        assert main(["select", "--scores", str(sc), "--fraction", "0.5",
                     "--out", str(run / "random" / "seed0" / f"round{r}" / "selection")]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "x")]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--round", "1", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "round final" in err and "None" not in err


def test_select_prints_what_it_selected(tmp_path, tiny_pool, capsys):
    """A guard (this already printed on the main this was fixed against; the report could not be reproduced)."""
    ids = tiny_pool.ids(None)
    sc = write_scores(tmp_path / "sc", ids, np.arange(len(ids), dtype=np.float32), parents=[parent_ref(tiny_pool.path)])
    assert main(["select", "--scores", str(sc), "--fraction", "0.5", "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"selected {len(ids) // 2} of {len(ids)}") and str(tmp_path / "s") in out
    assert TokenPool(tiny_pool.path)  # the pool is untouched
