"""Progress fits the place: a tqdm bar on a terminal, plain periodic log lines (never '\\r') anywhere else."""

from __future__ import annotations

import io
import logging

from lmselect.log import Progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_non_tty_gets_plain_lines_without_carriage_returns(caplog):
    stream = io.StringIO()
    with caplog.at_level(logging.INFO, logger="lmselect"):
        with Progress(10, desc="train x", stream=stream, interval_s=0.0) as p:
            for _ in range(4):
                p.update(1, loss=2.5)
    assert stream.getvalue() == ""  # no bar frames at all
    lines = [r.getMessage() for r in caplog.records]
    assert lines and lines[0].startswith("train x: step 1/10 (10%)") and "loss=2.5000" in lines[0]
    assert lines[-1].startswith("train x: step 4/10 (40%)")
    assert not any("\r" in ln for ln in lines)


def test_non_tty_lines_are_rate_limited(caplog):
    with caplog.at_level(logging.INFO, logger="lmselect"):
        with Progress(1000, stream=io.StringIO(), interval_s=3600.0) as p:
            for _ in range(500):
                p.update(1)
    assert caplog.records == []  # the loop's own metric lines carry the news; nothing every step


def test_tty_gets_a_bar():
    stream = _Tty()
    with Progress(5, desc="train y", stream=stream) as p:
        for _ in range(5):
            p.update(1, loss=1.0)
    out = stream.getvalue()
    assert "\r" in out and "train y" in out and "/5 [" in out  # redrawn in place (tqdm rate-limits the frames)


def test_training_output_in_a_file_has_no_carriage_returns(tiny_pool, tmp_path, capfd, caplog):
    from lmselect.train.loop import TrainConfig, train

    cfg = TrainConfig(preset="debug", steps=3, global_batch=4, micro_batch=4, log_every=1)
    with caplog.at_level(logging.INFO):
        train(cfg, tiny_pool, tiny_pool.ids(), tmp_path / "ck")
    captured = capfd.readouterr()
    assert "\r" not in captured.err and "\r" not in captured.out
    assert "\r" not in caplog.text and "step 3" in caplog.text


def test_expected_warnings_silenced(tiny_pool, tmp_path, monkeypatch, capfd):
    """The packed-documents length warning of transformers and lm-eval's `fatal: not a git repository`."""
    from transformers import PreTrainedTokenizerFast

    from lmselect.data.tokenizer import load_tokenizer

    records: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    hf_log = logging.getLogger("transformers")
    grab = Grab(level=logging.WARNING)
    hf_log.addHandler(grab)
    monkeypatch.setattr(hf_log, "level", logging.WARNING)
    try:
        long_text = "The quick brown fox jumps over the lazy dog. " * 40
        plain = PreTrainedTokenizerFast.from_pretrained(str(tiny_pool.tokenizer_dir), model_max_length=16)
        plain.encode(long_text)
        assert any("Token indices sequence length is longer" in r for r in records)  # the oracle: it does warn
        records.clear()
        tok = load_tokenizer(tiny_pool.tokenizer_dir)
        tok.model_max_length = 16
        assert len(tok.encode(long_text)) > 16
        assert not any("Token indices" in r for r in records)
    finally:
        hf_log.removeHandler(grab)

    import lm_eval.evaluator as ev

    from lmselect.eval.harness import quiet_git_probe

    monkeypatch.chdir(tmp_path)  # not a git checkout
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    ev.get_git_commit_hash()
    assert "not a git repository" in capfd.readouterr().err  # the oracle: the harness's probe prints it
    with quiet_git_probe():
        assert ev.get_git_commit_hash() is None
    assert "not a git repository" not in capfd.readouterr().err
