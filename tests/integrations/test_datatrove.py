"""The datatrove step: ``LocalPipelineExecutor(tasks=2, workers=2)`` over JsonlReader -> LmselectScorer ->
JsonlWriter gives exactly the document scores ``lmselect score --jsonl`` gives on the same files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmselect.cli import main
from lmselect.models.presets import build_model
from lmselect.models.scorer import SequenceScorer
from lmselect.score import read_documents
from lmselect.testing import SAMPLE_TEXT

pytest.importorskip("datatrove")


@pytest.fixture()
def scorer_dir(tmp_path, tiny_tokenizer):
    d = tmp_path / "scorer"
    SequenceScorer.from_causal_lm(build_model("debug", len(tiny_tokenizer), seed=0), activation="identity",
                                  seed=0).save_pretrained(d)
    tiny_tokenizer.save_pretrained(str(d / "backbone"))  # the scorer carries its tokenizer (checked against the pool's)
    return d


def _write(folder: Path, n_files: int = 2, per_file: int = 6) -> list[Path]:
    folder.mkdir()
    paths = []
    for f in range(n_files):
        recs = [{"id": f"f{f}-d{i}", "text": " ".join(SAMPLE_TEXT[(f * per_file + i) % len(SAMPLE_TEXT):][: 1 + i % 4])}
                for i in range(per_file)]
        p = folder / f"part{f}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in recs))
        paths.append(p)
    return paths


def test_local_executor_scores_equal_score_jsonl(tmp_path, tiny_pool, scorer_dir):
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    from lmselect.integrations.datatrove import LmselectScorer

    files = _write(tmp_path / "corpus")
    expected: dict[str, float] = {}
    for p in files:  # lmselect score --jsonl, file by file (batch size 1: identical forward shapes, see below)
        out = tmp_path / f"sc-{p.stem}"
        assert main(["score", "--model", str(scorer_dir), "--jsonl", str(p), "--tokenizer-from", str(tiny_pool.path),
                     "--seq-len", "8", "--batch-size", "1", "--out", str(out), "--no-progress"]) == 0
        docs = read_documents(out).to_pylist()
        assert max(d["n_windows"] for d in docs) >= 3  # several windows per document: the roll-up is exercised
        expected.update({d["doc_id"]: d["score"] for d in docs})

    LocalPipelineExecutor(
        pipeline=[JsonlReader(str(tmp_path / "corpus")),
                  LmselectScorer(scorer_dir, tiny_pool.path, seq_len=8, batch_size=1, docs_per_batch=4, device="cpu"),
                  JsonlWriter(str(tmp_path / "scored"), output_filename="${rank}.jsonl", compression=None)],
        tasks=2, workers=2, logging_dir=str(tmp_path / "logs"),
    ).run()
    outs = sorted((tmp_path / "scored").glob("*.jsonl"))
    assert len(outs) == 2  # both tasks wrote their share
    got = {}
    for p in outs:
        for line in p.read_text().splitlines():
            r = json.loads(line)
            got[r["id"]] = r["metadata"]["lmselect_score"]
    assert got.keys() == expected.keys()
    # Same windows, same roll-up; the forward may differ in the last float32 bits, because datatrove's worker
    # processes can run torch with another thread count than this one (another reduction order): 1-2 ulps seen in a
    # fresh venv. A different window or roll-up moves a score by far more than this.
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert len(set(got.values())) > 1


def test_threshold_drops_and_step_is_picklable(tmp_path, tiny_pool, scorer_dir):
    import pickle

    from datatrove.data import Document

    from lmselect.integrations.datatrove import LmselectScorer

    docs = [Document(text=" ".join(SAMPLE_TEXT[i : i + 2]), id=str(i)) for i in range(8)] + [Document(text="", id="e")]
    step = LmselectScorer(scorer_dir, tiny_pool.path, seq_len=8, device="cpu", key="q")
    scored = list(step.run(iter([Document(text=d.text, id=d.id) for d in docs])))
    assert [d.id for d in scored] == [d.id for d in docs] and scored[-1].metadata["q"] is None
    cut = float(np.median([d.metadata["q"] for d in scored[:-1]]))
    kept = list(LmselectScorer(scorer_dir, tiny_pool.path, seq_len=8, device="cpu", key="q", threshold=cut).run(
        iter([Document(text=d.text, id=d.id) for d in docs])))
    assert kept and all(d.metadata["q"] >= cut for d in kept) and len(kept) < len(docs) - 1
    assert step._scorer is not None and pickle.loads(pickle.dumps(step))._scorer is None  # ships without the model


def test_a_dsir_rounds_text_scorer_scores_whole_documents(tmp_path):
    """A text scorer (here DSIR's, as a round saves it in scores/text_scorer) needs no tokenizer: each document's
    score is the round's log importance weight of its whole text."""
    from datatrove.data import Document

    from lmselect.integrations.datatrove import LmselectScorer
    from lmselect.select.dsir import DsirConfig, _save_text_scorer, fit_log_ratio

    target = [" ".join(SAMPLE_TEXT[i : i + 3]) for i in range(0, 12, 3)]
    raw = [" ".join(SAMPLE_TEXT[i : i + 2]) for i in range(len(SAMPLE_TEXT) - 2)] + [""]
    cfg = DsirConfig(buckets=97)
    log_ratio, logw = fit_log_ratio(target, raw, cfg)
    _save_text_scorer(tmp_path / "scores" / "text_scorer", log_ratio, cfg, {"target_items": len(target)})
    step = LmselectScorer(tmp_path / "scores", key="dsir")
    out = list(step.run(iter([Document(text=t, id=str(i)) for i, t in enumerate(raw)])))
    got = np.array([d.metadata["dsir"] for d in out])
    assert np.array_equal(got, logw.astype(np.float32)) and got[-1] == 0.0 and len(set(got.tolist())) > 3


def test_the_step_checks_the_tokenizer_like_score_jsonl(tmp_path, tiny_pool, tiny_tokenizer):
    """A score model that carries no tokenizer is refused (its scores could be garbage) unless trust_tokenizer."""
    from datatrove.data import Document

    from lmselect.errors import LmselectError
    from lmselect.integrations.datatrove import LmselectScorer

    d = tmp_path / "bare"
    SequenceScorer.from_causal_lm(build_model("debug", len(tiny_tokenizer), seed=0), seed=0).save_pretrained(d)
    docs = [Document(text=SAMPLE_TEXT[0], id="0")]
    with pytest.raises(LmselectError, match="carries no tokenizer"):
        list(LmselectScorer(d, tiny_pool.path, seq_len=8, device="cpu").run(iter(docs)))
    out = list(LmselectScorer(d, tiny_pool.path, seq_len=8, device="cpu", trust_tokenizer=True).run(iter(docs)))
    assert out[0].metadata["lmselect_score"] is not None
