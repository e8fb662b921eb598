"""Our local tasks issue exactly the harness's requests.

For every one of the ten tasks, the same documents go (a) through our local task (harness YAML + local json file +
schema converter) and (b) through the harness's built-in task object, loaded by the harness's TaskManager from its
own YAML with ``datasets.load_dataset`` answering with those documents in the harness's native schema instead of
downloading them. The request lists (type, context, continuation, choice index) must be identical, and so must the
targets, metrics and task versions.

The native-schema reference documents are built independently of our converters wherever the local file is not
already native: LogiQA from the original release text with the EleutherAI/logiqa loader's parsing, BoolQ mapped
to super_glue by hand; the OLMES ARC/OpenBookQA conversions are checked against the prompts the OLMES dumps hold.
"""

from __future__ import annotations

import gzip
import json
import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lmselect.eval.tasks import (  # noqa: E402
    ALL_TASKS,
    LOCAL_TASKS,
    build_tasks,
    harness_task_manager,
    olmes_to_arc,
    olmes_to_openbookqa,
)
from lmselect.paths import TASKS_DIR  # noqa: E402


def _raw(task: str) -> list[dict]:
    path = TASKS_DIR / LOCAL_TASKS[task].file
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _logiqa_reference() -> list[dict]:
    """The EleutherAI/logiqa loading script (the harness's dataset) applied to the original release file."""

    def normalize(text: str) -> str:
        return text.replace(".", ". ").strip()

    raw = (TASKS_DIR / "logiqa" / "Test.txt").read_text(encoding="utf-8")
    docs = []
    for row in raw.strip().split("\n\n"):
        ex = row.split("\n")
        docs.append(
            {
                "label": ex[0].strip(),
                "context": normalize(ex[1]),
                "question": normalize(ex[2]),
                "options": [normalize(o[2:]) for o in ex[3:]],
            }
        )
    return docs


def _reference_docs(task: str) -> list[dict]:
    """The documents in the schema of the harness's Hugging Face dataset for ``task``."""
    if task == "logiqa":
        return _logiqa_reference()
    if task == "boolq":  # super_glue/boolq: question, passage, idx, label (0 = False, 1 = True)
        return [
            {"question": d["question"], "passage": d["passage"], "idx": i, "label": 1 if d["answer"] else 0}
            for i, d in enumerate(_raw(task))
        ]
    if task in ("arc_easy", "arc_challenge"):
        return [olmes_to_arc(d) for d in _raw(task)]
    if task == "openbookqa":
        return [olmes_to_openbookqa(d) for d in _raw(task)]
    return _raw(task)  # native-schema files


@pytest.fixture(scope="module")
def local_tasks():
    return build_tasks(ALL_TASKS, TASKS_DIR)


def _builtin_task(task: str, docs: list[dict], monkeypatch):
    """The harness's own task object, built by its TaskManager, reading ``docs`` as its scored split."""
    import datasets

    calls = []

    def fake_load_dataset(path=None, name=None, **kwargs):
        calls.append((path, name))
        # every split the config may touch (the few-shot sampler reads "train" at construction); the harness
        # scores test if the config has a test split, else validation, as it would online
        ds = datasets.Dataset.from_list(docs)
        return datasets.DatasetDict({s: ds for s in ("train", "validation", "test")})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task_obj = harness_task_manager().load([task])["tasks"][task]
    monkeypatch.undo()
    # it really is the built-in config: the Hub dataset path, not our json loader, scoring the harness's split
    assert calls and calls[0][0] != "json"
    cfg = task_obj.config
    assert (cfg.test_split or cfg.validation_split) == LOCAL_TASKS[task].harness_split
    return task_obj


def _requests(task_obj) -> list[tuple]:
    task_obj.set_config(key="num_fewshot", value=0)
    task_obj.build_all_requests(limit=None)
    return [(i.request_type, i.arguments, i.idx, i.doc_id) for i in task_obj.instances]


@pytest.mark.parametrize("task", ALL_TASKS)
def test_local_task_requests_identical_to_harness(task, local_tasks, monkeypatch):
    ref_docs = _reference_docs(task)
    assert len(ref_docs) >= 30
    local = local_tasks[task]
    builtin = _builtin_task(task, ref_docs, monkeypatch)

    assert len(local.eval_docs) == len(builtin.eval_docs) == len(ref_docs)
    req_local, req_builtin = _requests(local), _requests(builtin)
    assert req_local == req_builtin
    # non-trivial: one request per choice (multiple choice) or one per passage (LAMBADA), with real text in it
    assert len(req_local) >= len(ref_docs)
    assert all(isinstance(a, tuple) and all(isinstance(s, str) for s in a) for _, a, _, _ in req_local)
    assert all(a[1] for _, a, _, _ in req_local)  # continuations are never empty

    docs_l, docs_b = list(local.eval_docs), list(builtin.eval_docs)
    assert [local.doc_to_target(d) for d in docs_l] == [builtin.doc_to_target(d) for d in docs_b]
    assert local.config.output_type == builtin.config.output_type
    assert local.aggregation() == builtin.aggregation()
    assert local.higher_is_better() == builtin.higher_is_better()
    assert local.VERSION == builtin.VERSION


@pytest.mark.parametrize("task", ["arc_easy", "arc_challenge", "openbookqa"])
def test_olmes_conversion_reproduces_the_dumped_prompts(task, monkeypatch):
    """The OLMES dumps hold the rendered prompt; our native-schema docs must render to it in the harness task."""
    raw = _raw(task)
    builtin = _builtin_task(task, _reference_docs(task), monkeypatch)
    for d, r in zip(builtin.eval_docs, raw):
        text = builtin.doc_to_text(d)
        # ARC's template is exactly OLMES's "Question: ...\nAnswer:"; OpenBookQA's harness prompt is the bare stem
        assert (text if task != "openbookqa" else f"Question: {text}\nAnswer:") == r["query"]
        assert builtin.doc_to_choice(d) == r["choices"]
        assert builtin.doc_to_target(d) == r["gold"]


def test_logiqa_parsed_jsonl_matches_original_loader():
    """The parsed jsonl + our normalisation equals the EleutherAI loader on the original text, record by record."""
    from lmselect.eval.tasks import logiqa_parsed_to_native

    ref = _logiqa_reference()
    conv = [logiqa_parsed_to_native(d) for d in _raw("logiqa")]
    assert conv == ref
    # the normalisation matters: without it, at least one record would differ
    assert any(d["context"] != r["context"] for d, r in zip(_raw("logiqa"), ref))
