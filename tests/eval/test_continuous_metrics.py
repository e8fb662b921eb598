"""The continuous downstream metrics (probability of the correct choice normalised over the choices, bits per byte of
the correct continuation) against a hand computation: one item by formula, and a tiny model on two items of a
harness task whose loglikelihoods are recomputed here with a plain forward pass."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lmselect.eval.harness import continuous_average, evaluate_model, item_metrics  # noqa: E402
from lmselect.eval.tasks import LOCAL_TASKS  # noqa: E402
from lmselect.paths import TASKS_DIR  # noqa: E402


def test_item_metrics_by_hand():
    lls = [-2.0, -1.0, -3.0]
    m = item_metrics(lls, 1, " héllo")  # 7 UTF-8 bytes (é is two)
    assert m["prob_correct"] == pytest.approx(math.exp(-1) / (math.exp(-2) + math.exp(-1) + math.exp(-3)))
    assert m["bpb"] == pytest.approx(1.0 / (math.log(2) * 7))
    # very negative loglikelihoods (a tiny model on long answers) do not underflow to 0/0
    assert item_metrics([-1000.0, -1001.0], 0, "ab")["prob_correct"] == pytest.approx(1 / (1 + math.exp(-1)))
    assert "prob_correct" not in item_metrics([-4.0], 0, "word")  # one continuation (LAMBADA): bits per byte only


def test_continuous_average_is_the_mean_with_the_se_of_a_mean():
    per = {"piqa": {"prob_correct": 0.6, "prob_correct_stderr": 0.03}, "sciq": {"prob_correct": 0.4,
                                                                              "prob_correct_stderr": 0.04}}
    avg = continuous_average(per, "prob_correct")
    assert avg["value"] == pytest.approx(0.5) and avg["stderr"] == pytest.approx(0.05 / 2)
    assert avg["n_tasks"] == 2 and not avg["complete"] and continuous_average({}, "bpb")["value"] is None


def _loglik(model, tok, context: str, continuation: str) -> float:
    """log P(continuation | context) with the harness's split of the pair: trailing spaces of the context move to
    the continuation, the whole string is encoded once and the continuation is the tokens after the context's."""
    n_sp = len(context) - len(context.rstrip())
    if n_sp:
        context, continuation = context[:-n_sp], context[-n_sp:] + continuation
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    ids = torch.tensor([whole[:-1]])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits.double()[0], -1)
    pos = range(len(whole) - 1 - len(cont), len(whole) - 1)
    return float(sum(lp[p, t] for p, t in zip(pos, cont)))


def test_tiny_model_on_two_items_matches_a_hand_computation(tiny_tokenizer):
    from lmselect.models import build_model

    tok = tiny_tokenizer
    model = build_model("debug", len(tok), seed=0, eos_token_id=tok.eos_token_id).eval()
    res = evaluate_model(model, tok, tasks=["piqa"], limit=2, batch_size=2, seed=7)
    # piqa's prompt (harness YAML): "Question: {goal}\nAnswer:" and the choices " {sol1}", " {sol2}"; gold = label
    with open(TASKS_DIR / LOCAL_TASKS["piqa"].file, encoding="utf-8") as f:
        docs = [json.loads(line) for line in f if line.strip()][:2]
    probs, bpbs = [], []
    for d in docs:
        ctx = f"Question: {d['goal']}\nAnswer:"
        conts = [" " + d["sol1"], " " + d["sol2"]]
        lls = np.array([_loglik(model, tok, ctx, c) for c in conts])
        g = int(d["label"])
        # exp(ll_g) / Σ exp(ll_i), written as 1 / Σ exp(ll_i − ll_g): a random tiny model's lls are about −600
        probs.append(1.0 / sum(math.exp(x - lls[g]) for x in lls))
        bpbs.append(-lls[g] / (math.log(2) * len(conts[g].encode("utf-8"))))
    t = res["tasks"]["piqa"]
    assert t["n_continuous"] == 2
    assert t["prob_correct"] == pytest.approx(np.mean(probs), rel=1e-4)
    assert t["bpb"] == pytest.approx(np.mean(bpbs), rel=1e-4)
    assert t["prob_correct_stderr"] == pytest.approx(np.std(probs, ddof=1) / math.sqrt(2), rel=1e-3, abs=1e-9)
    assert t["bpb_stderr"] == pytest.approx(np.std(bpbs, ddof=1) / math.sqrt(2), rel=1e-3)
    # the nine-task averages are over the tasks present (here one); accuracy stays beside them
    assert res["average_prob_correct"] == pytest.approx(t["prob_correct"]) and "acc" in t and "acc_norm" in t
    assert res["continuous"]["bpb"]["n_tasks"] == 1 and not res["continuous"]["bpb"]["complete"]


def test_gold_of_a_multiple_input_task_and_lambada_bits_per_byte_by_hand(tiny_tokenizer):
    """winogrande scores two *contexts* with one continuation (gold = doc_to_text, the harness's multiple-input
    rule); LAMBADA has one continuation, so bits per byte only."""
    from lmselect.models import build_model

    tok = tiny_tokenizer
    model = build_model("debug", len(tok), seed=1, eos_token_id=tok.eos_token_id).eval()
    res = evaluate_model(model, tok, tasks=["winogrande", "lambada_openai"], limit=2, batch_size=2, seed=7)

    def rows(task):
        with open(TASKS_DIR / LOCAL_TASKS[task].file, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()][:2]

    probs, bpbs = [], []
    for d in rows("winogrande"):  # the harness's preprocess_winogrande: context up to "_" + option, then the rest
        i = d["sentence"].index("_")
        cont = " " + d["sentence"][i + 1:].strip()
        lls = [_loglik(model, tok, d["sentence"][:i] + d[f"option{k}"], cont) for k in (1, 2)]
        g = {"1": 0, "2": 1}[d["answer"]]
        probs.append(1.0 / sum(math.exp(x - lls[g]) for x in lls))
        bpbs.append(-lls[g] / (math.log(2) * len(cont.encode("utf-8"))))
    w = res["tasks"]["winogrande"]
    assert w["prob_correct"] == pytest.approx(np.mean(probs), rel=1e-4)
    assert w["bpb"] == pytest.approx(np.mean(bpbs), rel=1e-4)
    lam = []
    for d in rows("lambada_openai"):  # context = all but the last word; continuation = " " + last word
        ctx, word = d["text"].rsplit(" ", 1)
        lam.append(-_loglik(model, tok, ctx, " " + word) / (math.log(2) * len((" " + word).encode("utf-8"))))
    lt = res["tasks"]["lambada_openai"]
    assert lt["bpb"] == pytest.approx(np.mean(lam), rel=1e-4) and "prob_correct" not in lt
    # LAMBADA is the selection target: never in the nine-task averages
    assert res["continuous"]["bpb"]["tasks"] == ["winogrande"]
