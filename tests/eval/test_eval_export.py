"""``lmselect eval --export-tasks DIR``: configs that plain ``lm_eval --include_path DIR`` runs offline.

Oracle: the exported tasks, loaded by the harness's own TaskManager from the YAML files, turn every document into
the same requests (context, choices, target) as lmselect's in-process local tasks; and a real ``python -m lm_eval``
subprocess runs two of them offline on a tiny checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmselect.cli import main
from lmselect.eval.tasks import ALL_TASKS, build_tasks, export_task_configs, exported_task_name
from lmselect.paths import TASKS_DIR


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("tasks_export")
    names = export_task_configs("all", TASKS_DIR, out)
    assert names == [exported_task_name(t) for t in ALL_TASKS]
    return out


def test_exported_tasks_match_in_process_tasks(exported):
    from lm_eval.tasks import TaskManager, get_task_dict

    tm = TaskManager(include_defaults=False, include_path=[str(exported)])
    theirs = get_task_dict([exported_task_name(t) for t in ALL_TASKS], tm)
    ours = build_tasks(list(ALL_TASKS), TASKS_DIR)
    for t in ALL_TASKS:
        a, b = ours[t], theirs[exported_task_name(t)]
        da, db = list(a.eval_docs), list(b.eval_docs)
        assert len(da) == len(db) > 0, t
        for x, y in zip(da, db):
            assert a.doc_to_text(x) == b.doc_to_text(y), t
            assert a.doc_to_target(x) == b.doc_to_target(y), t
            if a.config.output_type == "multiple_choice":
                assert a.doc_to_choice(x) == b.doc_to_choice(y), t


def test_export_cli_prints_the_command(tmp_path, capsys):
    out = tmp_path / "tasks"
    assert main(["eval", "--export-tasks", str(out), "--tasks", "sciq,boolq"]) == 0
    text = capsys.readouterr().out
    assert f"--include_path {out} --tasks lmselect_sciq,lmselect_boolq" in text
    assert sorted(p.name for p in out.iterdir()) == ["boolq", "sciq"]
    assert main(["eval", "--tasks", "sciq"]) == 2  # neither a checkpoint nor --export-tasks
    assert "give a CHECKPOINT_DIR" in capsys.readouterr().err


def test_plain_lm_eval_runs_offline(exported, tiny_pool, tmp_path):
    from lmselect.models.presets import build_model
    from lmselect.train.checkpoint import save_checkpoint

    ckpt = save_checkpoint(
        tmp_path / "ckpt", build_model("debug", tiny_pool.vocab_size, seed=0, eos_token_id=tiny_pool.eos_id),
        tokenizer_dir=tiny_pool.tokenizer_dir,
    )
    work = tmp_path / "work"  # not a git checkout
    work.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               HF_HOME=str(tmp_path / "hf_home"))  # an empty cache: nothing can come from an earlier download
    tasks = "lmselect_sciq,lmselect_arc_easy"  # one native schema, one converted
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={ckpt}",
           "--include_path", str(exported), "--tasks", tasks, "--device", "cpu", "--limit", "2",
           "--output_path", str(tmp_path / "results")]
    r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    files = list((tmp_path / "results").rglob("results_*.json"))
    assert len(files) == 1
    res = json.loads(files[0].read_text())["results"]
    assert set(res) == {"lmselect_sciq", "lmselect_arc_easy"}
    assert all(0.0 <= res[t]["acc,none"] <= 1.0 for t in res)
    assert Path(ckpt / "model.safetensors").is_file()
