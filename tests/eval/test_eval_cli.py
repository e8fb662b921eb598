"""`lmselect eval` end to end on a tiny debug checkpoint, the headline average, the live-model API, bad input."""

from __future__ import annotations

import json
import math
import os
import random
import shutil

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lmselect.artifacts import LmselectError, read_manifest  # noqa: E402
from lmselect.cli import main  # noqa: E402
from lmselect.eval.harness import evaluate_model, headline_average  # noqa: E402
from lmselect.eval.tasks import ALL_TASKS, HEADLINE_TASKS, LOCAL_TASKS  # noqa: E402
from lmselect.paths import TASKS_DIR  # noqa: E402

LIMIT = 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_tokenizer):
    """A freshly initialised debug-preset model saved in HF format with its tokenizer."""
    from lmselect.models import build_model

    d = tmp_path_factory.mktemp("ckpt") / "model"
    model = build_model("debug", len(tiny_tokenizer), seed=0, eos_token_id=tiny_tokenizer.eos_token_id)
    model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def cli_results(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "out"
    rc = main(["eval", str(checkpoint), "--limit", str(LIMIT), "--out", str(out), "--batch-size", "8", "--seed", "7"])
    assert rc == 0
    return out, json.loads((out / "results.json").read_text())


def test_cli_writes_results_for_all_tasks(cli_results, checkpoint):
    out, res = cli_results
    assert list(res["tasks"]) == list(ALL_TASKS)
    for t, d in res["tasks"].items():
        assert d["n"] == LIMIT and d["n_available"] == 40, t
        assert 0.0 <= d["acc"] <= 1.0 and d["acc_stderr"] is not None, t
        assert d["version"] is not None
    # acc_norm exactly where the harness task defines it (boolq and winogrande report acc only)
    assert {t for t, d in res["tasks"].items() if "acc_norm" in d} == set(HEADLINE_TASKS) - {"boolq", "winogrande"}
    lam = res["tasks"]["lambada_openai"]
    assert lam["perplexity"] > 1.0 and "headline_metric" not in lam
    assert res["lambada_openai"] == lam
    # provenance: harness + task versions, seeds, batch size, limit, splits, checkpoint
    assert res["harness"]["version"] and set(res["harness"]["task_versions"]) == set(ALL_TASKS)
    assert res["harness"]["task_versions"]["boolq"] == 2.0
    assert res["seeds"] == {"random_seed": 7, "numpy_seed": 7, "torch_seed": 7, "fewshot_seed": 7}
    assert res["batch_size"] == 8 and res["limit"] == LIMIT and res["device"] == "cpu"
    assert res["comparable"] is False and any("limit" in r for r in res["not_comparable_because"])
    assert res["data_source"] == "bundled"
    assert res["splits"]["sciq"]["split"] == "validation" and res["splits"]["sciq"]["harness_split"] == "test"
    assert "validation" in res["splits"]["sciq"]["note"]
    assert res["checkpoint"] == str(checkpoint.resolve()) and res["model_manifest"] is None
    m = read_manifest(out, kind="eval")
    assert m["counts"] == {t: LIMIT for t in ALL_TASKS} and m["seed"] == 7
    assert m["extra"]["comparable"] is False and (out / "config.yaml").is_file()
    assert m["extra"]["average"] == res["average"]


def test_average_is_mean_of_headline_metrics(cli_results):
    _, res = cli_results
    per = res["tasks"]
    vals = [per[t]["acc_norm"] if per[t].get("acc_norm") is not None else per[t]["acc"] for t in HEADLINE_TASKS]
    assert res["average"] == pytest.approx(sum(vals) / 9, abs=1e-12)
    assert res["headline"]["value"] == res["average"]
    ses = [per[t][res["headline"]["metrics"][t] + "_stderr"] for t in HEADLINE_TASKS]
    assert res["average_stderr"] == pytest.approx(math.sqrt(sum(s * s for s in ses)) / 9)
    assert res["headline"]["complete"] and res["headline"]["n_tasks"] == 9
    assert "lambada_openai" not in res["headline"]["tasks"]


def test_headline_average_rules():
    per = {
        "sciq": {"acc": 0.9, "acc_stderr": 0.03, "acc_norm": 0.5, "acc_norm_stderr": 0.04},
        "boolq": {"acc": 0.6, "acc_stderr": 0.05},
        "winogrande": {"acc": 0.2, "acc_stderr": 0.0, "acc_norm": None},  # undefined acc_norm falls back to acc
        "lambada_openai": {"acc": 1.0, "acc_stderr": 0.0, "perplexity": 3.0},
    }
    avg = headline_average(per)
    assert avg["value"] == pytest.approx((0.5 + 0.6 + 0.2) / 3)
    assert avg["stderr"] == pytest.approx(math.sqrt(0.04**2 + 0.05**2) / 3)
    assert avg["metrics"] == {"sciq": "acc_norm", "boolq": "acc", "winogrande": "acc"}
    assert not avg["complete"] and avg["n_tasks"] == 3 and "lambada_openai" not in avg["tasks"]
    assert headline_average({})["value"] is None


def test_live_model_matches_checkpoint_and_restores_state(checkpoint, cli_results):
    """evaluate_model on the in-memory model: same numbers as the saved checkpoint; RNG and train mode untouched."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, res_ckpt = cli_results
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(checkpoint)
    model.train()
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    expect = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    res = evaluate_model(model, tok, tasks=["piqa", "arc_easy"], limit=LIMIT, batch_size=4, seed=7)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expect
    assert model.training
    assert list(res["tasks"]) == ["piqa", "arc_easy"] and not res["headline"]["complete"]
    for t in ("piqa", "arc_easy"):
        for k in ("acc", "acc_norm"):
            assert res["tasks"][t][k] == pytest.approx(res_ckpt["tasks"][t][k]), (t, k)


def _run_cli(argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def test_not_a_model_directory(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    rc, err = _run_cli(["eval", str(tmp_path)], capsys)
    assert rc == 2 and len(err) == 1 and str(tmp_path) in err[0] and "config.json" in err[0]
    rc, err = _run_cli(["eval", str(tmp_path / "missing")], capsys)
    assert rc == 2 and "not found" in err[0]


def test_unknown_task(checkpoint, tmp_path, capsys):
    rc, err = _run_cli(["eval", str(checkpoint), "--tasks", "sciq,mmlu", "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and len(err) == 1 and "unknown eval task 'mmlu'" in err[0]


def test_missing_and_malformed_task_files(checkpoint, tmp_path, capsys):
    data = tmp_path / "taskdata"
    shutil.copytree(TASKS_DIR, data)
    (data / LOCAL_TASKS["piqa"].file).unlink()
    rc, err = _run_cli(["eval", str(checkpoint), "--task-data", str(data), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and len(err) == 1 and "piqa_validation_hfschema.jsonl" in err[0] and "'piqa'" in err[0]
    assert not (tmp_path / "o" / "manifest.json").exists()

    # a file with the wrong schema (e.g. the original PIQA release without labels) names the missing field
    (data / LOCAL_TASKS["piqa"].file).write_text(json.dumps({"goal": "g", "sol1": "a", "sol2": "b"}) + "\n")
    with pytest.raises(LmselectError, match=r"piqa_validation_hfschema.jsonl:1: 'piqa' record lacks field\(s\) label"):
        evaluate_model(None, None, tasks=["piqa"], task_data=data)  # fails before touching the model
    (data / LOCAL_TASKS["sciq"].file).write_text("{not json\n")
    with pytest.raises(LmselectError, match=r"sciq_validation.jsonl:1: invalid JSON"):
        evaluate_model(None, None, tasks=["sciq"], task_data=data)
    with pytest.raises(LmselectError, match="task-data directory not found"):
        evaluate_model(None, None, tasks=["sciq"], task_data=tmp_path / "nope")
