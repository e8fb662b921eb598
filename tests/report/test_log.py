"""MetricLogger: stdout + jsonl always; tensorboard / wandb optional, off by default, offline, one-line errors."""

from __future__ import annotations

import logging
import sys
import types

import pytest

from lmselect.artifacts import LmselectError
from lmselect.log import MetricLogger, read_jsonl


def test_jsonl_and_stdout(tmp_path, caplog):
    p = tmp_path / "log" / "train_log.jsonl"
    with caplog.at_level(logging.INFO, logger="lmselect"):
        with MetricLogger(p, stdout_every=2, prefix="[t] ") as lg:
            for s in range(1, 5):
                lg.log(s, loss=1.0 / s, tokens=128 * s, note="x", bad=float("nan"))
    recs = read_jsonl(p)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert recs[1]["loss"] == 0.5 and recs[3]["tokens"] == 512 and recs[0]["bad"] == "nan"
    printed = [r.getMessage() for r in caplog.records if r.name == "lmselect"]
    assert len(printed) == 2 and printed[0].startswith("[t] step 2 loss=0.5000 tokens=256")
    with open(p, "a") as f:  # a killed writer leaves a truncated last line: ignored
        f.write('{"step": 5, "lo')
    assert len(read_jsonl(p)) == 4
    with MetricLogger(p, append=False) as lg:
        lg.log(7, loss=1.0)
    assert [r["step"] for r in read_jsonl(p)] == [7]


def test_unknown_backend_is_a_one_line_error(tmp_path):
    with pytest.raises(LmselectError, match="unknown logging backend 'mlflow'"):
        MetricLogger(tmp_path / "l.jsonl", backends=["mlflow"])


def test_missing_extras_name_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(LmselectError, match=r"lmselect\[tensorboard\]"):
        MetricLogger(tmp_path / "l.jsonl", backends=["tensorboard"])
    with pytest.raises(LmselectError, match=r"lmselect\[wandb\]"):
        MetricLogger(tmp_path / "l.jsonl", backends=["wandb"])


class _Recorder:
    def __init__(self, **kw):
        self.kw = kw
        self.calls: list[tuple] = []
        self.closed = False

    def add_scalar(self, tag, value, step):
        self.calls.append((tag, value, step))

    def log(self, metrics, step):
        self.calls.append((dict(metrics), step))

    def close(self):
        self.closed = True

    def finish(self):
        self.closed = True


def test_tensorboard_backend_gets_numeric_scalars(tmp_path, monkeypatch):
    made = []

    def writer(log_dir):
        made.append(_Recorder(log_dir=log_dir))
        return made[-1]

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=writer))
    lg = MetricLogger(tmp_path / "run" / "train_log.jsonl", backends=["jsonl", "tensorboard"])
    lg.log(3, loss=2.5, lr=1e-3, name="abc", flag=True, bad=float("inf"))
    lg.close()
    lg.close()  # idempotent
    (w,) = made
    assert w.kw["log_dir"] == str(tmp_path / "run" / "tb") and (tmp_path / "run" / "tb").is_dir()
    assert sorted(w.calls) == [("loss", 2.5, 3), ("lr", 1e-3, 3)]
    assert w.closed and read_jsonl(tmp_path / "run" / "train_log.jsonl")[0]["name"] == "abc"


def test_wandb_backend_is_offline_by_default(tmp_path, monkeypatch):
    runs = []

    def init(**kw):
        runs.append(_Recorder(**kw))
        return runs[-1]

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with MetricLogger(tmp_path / "l.jsonl", backends=["wandb"], run_name="bliss-r1", wandb_config={"lr": 1}) as lg:
        lg.log(1, loss=3.0, text="no")
    (r,) = runs
    assert r.kw["mode"] == "offline" and r.kw["name"] == "bliss-r1" and r.kw["dir"] == str(tmp_path)
    assert r.kw["config"] == {"lr": 1}
    assert r.calls == [({"loss": 3.0}, 1)] and r.closed
    monkeypatch.setenv("WANDB_MODE", "disabled")
    MetricLogger(None, backends=["wandb"]).close()
    assert runs[-1].kw["mode"] == "disabled"


def test_real_tensorboard_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    with MetricLogger(tmp_path / "l.jsonl", backends=["tensorboard"]) as lg:
        lg.log(1, loss=1.0)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
