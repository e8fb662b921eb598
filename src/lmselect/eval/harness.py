"""Zero-shot downstream evaluation with lm-evaluation-harness, on a live model or a saved checkpoint.

    from lmselect.eval import evaluate_model, evaluate_checkpoint
    res = evaluate_model(model, tokenizer, limit=20)           # live model, no save needed mid-run
    res = evaluate_checkpoint("runs/x/target", out_dir=...)    # loads, evaluates, writes results.json + manifest

The model is wrapped in the harness's own ``HFLM(pretrained=model, tokenizer=tokenizer)`` and scored by
``lm_eval.evaluator.simple_evaluate`` on harness task objects (``tasks.build_tasks``), so prompts, answer choices,
metrics and standard errors are those of the harness. Per task we report acc, acc_norm (where the task defines it),
their standard errors and n; the headline is the unweighted mean over the nine METHODS.md §6 tasks of acc_norm where
defined, else acc. LAMBADA (OpenAI) reports acc and perplexity and is kept out of the average.

Beside accuracy, two **continuous** metrics per item, computed from the harness's own loglikelihoods of the answer
choices (``log_samples``), which carry signal where accuracy sits at chance (DataDecide, arXiv 2504.11393; Signal and
Noise, arXiv 2508.13144; OLMES definitions):

* ``prob_correct`` = softmax(ll)_gold = exp(ll_gold) / Σ_i exp(ll_i): the probability of the correct choice normalised
  over the choices (multiple-choice tasks; higher is better);
* ``bpb`` = −ll_gold / (ln 2 · UTF-8 bytes of the gold continuation): bits per byte of the correct continuation
  (multiple-choice tasks and LAMBADA's target word; lower is better).

Each is averaged over the task's items with its standard error sd / √n, and over the nine headline tasks
(``average_prob_correct``, ``average_bpb``) with SE = √(Σ SE_i²) / k.

Task data: ``task_data=None`` reads the bundled slices (``data/tasks``, 40 items per task: a demo, not comparable to
published numbers), ``task_data=DIR`` full local files in the staged layout, ``online=True`` the harness's download.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from lmselect.artifacts import (
    LmselectError,
    Manifest,
    atomic_write_json,
    building,
    library_versions,
    parent_ref,
    read_json,
    save_config,
    write_manifest,
)
from lmselect.config import to_dict
from lmselect.eval.tasks import (
    ALL_TASKS,
    HEADLINE_TASKS,
    build_tasks,
    harness_task_manager,
    local_task_file,
    resolve_task_names,
    task_split_info,
)
from lmselect.paths import TASKS_DIR
from lmselect.stats import se_of_mean, standard_error

RESULTS_FILE = "results.json"
DEFAULT_SEED = 1234  # the harness's default numpy/torch/few-shot seed
# Only LAMBADA perplexity is bootstrapped (acc/acc_norm have closed-form standard errors); 1,000 resamples keep it a
# couple of seconds on CPU. The harness CLI default is 100,000; the value used is recorded with every result.
DEFAULT_BOOTSTRAP_ITERS = 1000


@dataclass
class EvalConfig:
    """Resolved settings of one evaluation (saved as ``config.yaml`` beside the results)."""

    tasks: list[str] = field(default_factory=lambda: list(ALL_TASKS))
    task_data: str | None = None  # None = bundled slices (unless online)
    online: bool = False
    limit: int | None = None
    batch_size: int = 16
    device: str | None = None  # None: the model's device (live model) / "cpu" (checkpoint)
    dtype: str = "float32"
    seed: int = DEFAULT_SEED
    bootstrap_iters: int = DEFAULT_BOOTSTRAP_ITERS
    max_length: int | None = None  # None: the model's max_position_embeddings


# ----------------------------------------------------------------------------------------------------------------
# result summaries


def _metric(res: dict[str, Any], name: str) -> float | None:
    v = res.get(f"{name},none")
    if v is None or isinstance(v, str):  # the harness writes "N/A" for an undefined stderr
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def headline_metric(task_metrics: dict[str, Any]) -> str:
    """``acc_norm`` where the task reports it, else ``acc`` (METHODS.md §6)."""
    return "acc_norm" if task_metrics.get("acc_norm") is not None else "acc"


def headline_average(per_task: dict[str, dict[str, Any]], tasks: Sequence[str] = HEADLINE_TASKS) -> dict[str, Any]:
    """Unweighted mean of each headline task's headline metric, with the standard error of that mean.

    The tasks are independent samples, so SE(mean) = sqrt(sum SE_i^2) / k. ``complete`` is False when some of the
    nine tasks were not evaluated (the mean is then over those present and is not the headline number).
    """
    present = [t for t in tasks if t in per_task]
    if not present:
        return {"value": None, "stderr": None, "n_tasks": 0, "tasks": [], "complete": False, "metrics": {}}
    vals, ses, metrics = [], [], {}
    for t in present:
        m = headline_metric(per_task[t])
        metrics[t] = m
        vals.append(float(per_task[t][m]))
        ses.append(per_task[t].get(f"{m}_stderr"))
    se = math.sqrt(sum(s * s for s in ses)) / len(ses) if all(s is not None for s in ses) else None
    return {
        "value": sum(vals) / len(vals),
        "stderr": se,
        "n_tasks": len(present),
        "tasks": present,
        "metrics": metrics,
        "complete": len(present) == len(tasks),
    }


def item_metrics(lls: Sequence[float], gold: int, continuation: str) -> dict[str, float]:
    """The continuous metrics of one item from its per-choice loglikelihoods (natural log) ``lls``, the gold choice
    index and the gold continuation's text: ``bpb`` always, ``prob_correct`` when there are several choices."""
    ll = np.asarray(lls, dtype=np.float64)
    n_bytes = max(len(continuation.encode("utf-8")), 1)
    out = {"bpb": float(-ll[gold] / (math.log(2.0) * n_bytes))}
    if len(ll) > 1:
        z = ll - ll.max()  # softmax without overflow: the harness's loglikelihoods reach -1e3 on tiny models
        out["prob_correct"] = float(np.exp(z[gold]) / np.exp(z).sum())
    return out


def _gold_index(task: Any, doc: dict[str, Any]) -> int | None:
    """The gold choice of a multiple-choice document exactly as the harness's ``process_results`` finds it
    (``doc_to_text`` for multiple-input tasks such as winogrande, else ``doc_to_target``; a string is looked up among
    the choices). None where it is not one valid index (multiple targets, out of range)."""
    gold = task.doc_to_text(doc) if getattr(task, "multiple_input", 0) else task.doc_to_target(doc)
    if isinstance(gold, str):
        choices = task.doc_to_choice(doc)
        gold = choices.index(gold) if gold in choices else None
    if isinstance(gold, (int, np.integer)) and not isinstance(gold, bool):
        return int(gold)
    return None


def continuous_metrics(samples: dict[str, list[dict[str, Any]]], task_objs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per task: mean and standard error over items of ``prob_correct`` and ``bpb`` (:func:`item_metrics`) from the
    harness's logged samples (``filtered_resps`` = the per-request loglikelihoods, ``arguments`` = the (context,
    continuation) pairs it scored). Multiple-choice tasks get both metrics, loglikelihood tasks (LAMBADA) ``bpb``."""
    out: dict[str, dict[str, Any]] = {}
    for t, items in samples.items():
        task = task_objs.get(t)
        if task is None:
            continue
        kind = getattr(task, "OUTPUT_TYPE", None)
        per: dict[str, list[float]] = {}
        for smp in items:
            resps = smp.get("filtered_resps") or []
            args = smp.get("arguments") or []
            lls = [float(r[0] if isinstance(r, (list, tuple)) else r) for r in resps]
            if not lls or len(lls) != len(args):
                continue
            if kind == "multiple_choice":
                gold = _gold_index(task, smp["doc"])
                if gold is None or not 0 <= gold < len(lls):
                    continue
            elif kind == "loglikelihood" and len(lls) == 1:
                gold = 0
            else:
                continue
            for k, v in item_metrics(lls, gold, str(args[gold][1])).items():
                per.setdefault(k, []).append(v)
        d: dict[str, Any] = {}
        for k, vals in per.items():
            d[k] = float(np.mean(vals))
            d[f"{k}_stderr"] = standard_error(vals)
        if per:
            d["n_continuous"] = max(len(v) for v in per.values())
            out[t] = d
    return out


def continuous_average(per_task: dict[str, dict[str, Any]], metric: str,
                       tasks: Sequence[str] = HEADLINE_TASKS) -> dict[str, Any]:
    """Unweighted mean of ``metric`` (``prob_correct`` / ``bpb``) over the headline tasks that report it, with
    SE = √(Σ SE_i²) / k (independent tasks); ``complete`` when all of ``tasks`` have it."""
    present = [t for t in tasks if isinstance((per_task.get(t) or {}).get(metric), (int, float))]
    if not present:
        return {"value": None, "stderr": None, "n_tasks": 0, "tasks": [], "complete": False}

    ses = [per_task[t].get(f"{metric}_stderr") for t in present]
    return {"value": float(np.mean([per_task[t][metric] for t in present])),
            "stderr": se_of_mean(ses) if all(s is not None for s in ses) else None,
            "n_tasks": len(present), "tasks": present, "complete": len(present) == len(tasks)}


def summarize_harness_results(raw: dict[str, Any], tasks: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per-task {acc, acc_stderr, acc_norm, acc_norm_stderr, n, version, [perplexity, perplexity_stderr]}."""
    out: dict[str, dict[str, Any]] = {}
    for t in tasks:
        res = raw["results"].get(t)
        if res is None:
            raise LmselectError(f"task '{t}': the harness returned no result")
        d: dict[str, Any] = {}
        for m in ("acc", "acc_norm", "perplexity"):
            v = _metric(res, m)
            if v is None and f"{m},none" not in res:
                continue  # metric not defined by this task
            d[m] = v
            d[f"{m}_stderr"] = _metric(res, f"{m}_stderr")
        n = raw.get("n-samples", {}).get(t, {})
        d["n"] = int(n.get("effective", 0))
        d["n_available"] = int(n.get("original", 0))
        d["version"] = raw.get("versions", {}).get(t)
        if t in HEADLINE_TASKS:
            d["headline_metric"] = headline_metric(d)
        out[t] = d
    return out


# ----------------------------------------------------------------------------------------------------------------
# running


@contextlib.contextmanager
def _preserve_global_state(model: Any) -> Iterator[None]:
    """Undo what evaluation does to a live training run: global RNG seeding, eval() mode, env tweaks.

    ``simple_evaluate`` seeds python/numpy/torch globally and HFLM calls ``model.eval()``; a training loop that
    evaluates mid-run must resume bit-identically, so every one of these is restored afterwards.
    """
    import torch

    py_state = random.getstate()
    np_state = np.random.get_state()
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    was_training = bool(getattr(model, "training", False))
    # the harness bootstraps with a multiprocessing pool of cpu_count() workers unless this is set; a forked pool
    # per task is slower than in-process for our small bootstrap counts and unfriendly inside training jobs
    old_env = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = old_env
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        if was_training:
            model.train()


def evaluate_model(
    model: Any,
    tokenizer: Any,
    tasks: str | Sequence[str] | None = ALL_TASKS,
    task_data: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    device: str | None = None,
    seed: int = DEFAULT_SEED,
    *,
    online: bool = False,
    bootstrap_iters: int = DEFAULT_BOOTSTRAP_ITERS,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Evaluate a live ``transformers`` causal LM zero-shot on ``tasks``; returns the results dict (not written).

    ``task_data``: None = bundled slices (``data/tasks``) unless ``online``; a directory = full local files in the
    staged layout. ``device``: None keeps the model where it is; otherwise the model is moved there for the
    evaluation and moved back afterwards. Global RNG states and train/eval mode are restored on return.
    """
    import torch
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    names = resolve_task_names(tasks)
    if limit is not None and int(limit) <= 0:
        raise LmselectError(f"eval limit must be a positive number of items per task, got {limit}")
    if batch_size <= 0:
        raise LmselectError(f"eval batch_size must be positive, got {batch_size}")
    data_source = "online" if online else ("bundled" if task_data is None else "local")
    data_dir = None if online else Path(task_data if task_data is not None else TASKS_DIR)

    # tasks (and their files) first: a bad task file is reported before anything touches the model
    t0 = time.perf_counter()
    task_objs = build_tasks(names, data_dir, online=online)
    t_build = time.perf_counter() - t0
    if model is None or tokenizer is None:
        raise LmselectError("evaluate_model: both a model and its tokenizer are required")

    orig_device = next(model.parameters()).device
    target = torch.device(device) if device is not None else orig_device
    with _preserve_global_state(model):
        if target != orig_device:
            model.to(target)
        try:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=int(batch_size), max_length=max_length)
            t1 = time.perf_counter()
            with quiet_git_probe():
                raw = simple_evaluate(
                    model=lm,
                    tasks=list(task_objs.values()),
                    num_fewshot=0,
                    batch_size=int(batch_size),
                    limit=limit,
                    bootstrap_iters=int(bootstrap_iters),
                    log_samples=True,  # the per-item loglikelihoods behind the continuous metrics
                    random_seed=seed,
                    numpy_random_seed=seed,
                    torch_random_seed=seed,
                    fewshot_random_seed=seed,
                    task_manager=_task_manager(),
                )
            t_eval = time.perf_counter() - t1
        finally:
            if target != orig_device:
                model.to(orig_device)
    if raw is None:  # only non-zero ranks of a distributed harness run return None
        raise LmselectError("lm-evaluation-harness returned no results (non-zero rank?)")

    per_task = summarize_harness_results(raw, names)
    for t, cont in continuous_metrics(raw.get("samples") or {}, task_objs).items():
        if t in per_task:
            per_task[t].update(cont)
    raw.pop("samples", None)  # every document and request of every task: not kept
    n_items = sum(d["n"] for d in per_task.values())
    reasons = []
    if limit is not None:
        reasons.append(f"limit={limit}")
    if data_source == "bundled":
        reasons.append("bundled task slices")
    import lm_eval

    avg = headline_average(per_task)
    prob, bpb = continuous_average(per_task, "prob_correct"), continuous_average(per_task, "bpb")
    return {
        "tasks": per_task,
        # flat numbers for consumers (pipeline, report); the details of how they were formed under "headline"
        "average": avg["value"],
        "average_stderr": avg["stderr"],
        "headline": avg,
        # the continuous metrics the comparison headlines (higher prob_correct, lower bpb is better)
        "average_prob_correct": prob["value"],
        "average_prob_correct_stderr": prob["stderr"],
        "average_bpb": bpb["value"],
        "average_bpb_stderr": bpb["stderr"],
        "continuous": {"prob_correct": prob, "bpb": bpb},
        "lambada_openai": per_task.get("lambada_openai"),
        "comparable": not reasons,
        "not_comparable_because": reasons,
        "limit": limit,
        "data_source": data_source,
        "task_data": str(data_dir) if data_dir is not None else None,
        "splits": {t: task_split_info(t, data_dir, online) for t in names},
        "harness": {
            "name": "lm-evaluation-harness",
            "version": lm_eval.__version__,
            "task_versions": {t: raw.get("versions", {}).get(t) for t in names},
            "num_fewshot": 0,
            "bootstrap_iters": int(bootstrap_iters),
            "model_wrapper": "lm_eval.models.huggingface.HFLM",
        },
        "seeds": {"random_seed": seed, "numpy_seed": seed, "torch_seed": seed, "fewshot_seed": seed},
        "batch_size": int(batch_size),
        "device": str(target),
        "max_length": int(lm.max_length),
        "n_items": n_items,
        "timings": {"build_tasks_s": t_build, "evaluate_s": t_eval, "items_per_s": n_items / max(t_eval, 1e-9)},
        "versions": library_versions(),
    }


@contextlib.contextmanager
def quiet_git_probe() -> Iterator[None]:
    """Stop lm-eval printing ``fatal: not a git repository`` outside a git checkout.

    ``simple_evaluate`` records the commit of the *current directory* via ``lm_eval.loggers.utils.
    get_git_commit_hash``, which runs ``git describe --always`` with stderr going to the terminal. We run the same probe
    with stderr discarded (same value recorded: the hash, or the harness's fallback lookup, or None).
    """
    import subprocess

    import lm_eval.evaluator as ev
    from lm_eval.loggers import utils as lm_utils

    def quiet() -> str | None:
        try:
            out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=10)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
        return lm_utils.get_commit_from_path(os.getcwd())

    original = getattr(ev, "get_git_commit_hash", None)
    if original is None:  # another harness version: nothing to patch
        yield
        return
    ev.get_git_commit_hash = quiet
    try:
        yield
    finally:
        ev.get_git_commit_hash = original


def _task_manager() -> Any:
    # simple_evaluate builds a full TaskManager (a ~5 s scan) when given none; ours indexes only our folders

    return harness_task_manager()


# ----------------------------------------------------------------------------------------------------------------
# checkpoints

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def check_checkpoint_dir(path: str | Path) -> Path:
    """``path`` if it looks like an HF-format causal-LM directory, else a one-line ``LmselectError`` saying why."""
    p = Path(path)
    if not p.exists():
        raise LmselectError(f"{p}: checkpoint directory not found")
    if not p.is_dir():
        raise LmselectError(f"{p}: not a checkpoint directory (expected config.json + weights + tokenizer files)")
    if not (p / "config.json").is_file():
        raise LmselectError(f"{p}: not a model checkpoint (no config.json)")
    if not any((p / f).is_file() for f in _WEIGHT_FILES):
        raise LmselectError(f"{p}: not a model checkpoint (no model.safetensors or pytorch_model.bin)")
    if not any((p / f).is_file() for f in _TOKENIZER_FILES):
        raise LmselectError(f"{p}: checkpoint has no tokenizer files (tokenizer.json / tokenizer_config.json)")
    return p


def load_checkpoint(path: str | Path, dtype: str = "float32", device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) of an HF-format checkpoint directory, with one-line errors for broken ones."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = check_checkpoint_dir(path)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype, None)
    if torch_dtype is None or (dtype != "auto" and not isinstance(torch_dtype, torch.dtype)):
        raise LmselectError(f"unknown dtype '{dtype}' (use float32, bfloat16, float16 or auto)")
    try:
        tok = AutoTokenizer.from_pretrained(str(p))
    except Exception as e:
        raise LmselectError(f"{p}: cannot load tokenizer ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from e
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch_dtype)
    except Exception as e:
        raise LmselectError(f"{p}: cannot load model ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from e
    return model.to(device).eval(), tok


def evaluate_checkpoint(
    path: str | Path,
    out_dir: str | Path | None = None,
    tasks: str | Sequence[str] | None = ALL_TASKS,
    task_data: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    seed: int = DEFAULT_SEED,
    *,
    online: bool = False,
    bootstrap_iters: int = DEFAULT_BOOTSTRAP_ITERS,
    max_length: int | None = None,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Load the checkpoint at ``path``, evaluate it, write ``results.json`` + manifest kind=eval to ``out_dir``.

    ``out_dir`` defaults to ``<path>/eval``. Tasks and task files are checked before the model is loaded.
    Returns the results dict as written.
    """
    ckpt = check_checkpoint_dir(path)
    names = resolve_task_names(tasks)
    if not online:  # fail on a missing task file before spending time loading the model

        for t in names:
            local_task_file(t, task_data if task_data is not None else TASKS_DIR)
    out = Path(out_dir) if out_dir is not None else ckpt / "eval"
    cfg = EvalConfig(
        tasks=names, task_data=str(task_data) if task_data is not None else None, online=online, limit=limit,
        batch_size=batch_size, device=device, dtype=dtype, seed=seed, bootstrap_iters=bootstrap_iters,
        max_length=max_length,
    )
    t0 = time.perf_counter()
    model, tok = load_checkpoint(ckpt, dtype=dtype, device=device)
    t_load = time.perf_counter() - t0
    res = evaluate_model(
        model, tok, tasks=names, task_data=task_data, limit=limit, batch_size=batch_size, device=device, seed=seed,
        online=online, bootstrap_iters=bootstrap_iters, max_length=max_length,
    )
    res["timings"]["load_s"] = t_load
    res["checkpoint"] = str(ckpt.resolve())
    ckpt_manifest = ckpt / "manifest.json"
    res["model_manifest"] = read_json(ckpt_manifest) if ckpt_manifest.is_file() else None
    res["model"] = {"class": type(model).__name__, "dtype": str(next(model.parameters()).dtype),
                    "n_params": int(sum(p.numel() for p in model.parameters()))}

    with building(out) as d:
        atomic_write_json(d / RESULTS_FILE, res)
        save_config(cfg, d / "config.yaml")
        parents = []
        if ckpt_manifest.is_file():
            try:
                parents.append(parent_ref(ckpt))
            except LmselectError:
                pass  # an incomplete checkpoint manifest: still evaluable, just no lineage
        write_manifest(
            d,
            Manifest(
                kind="eval",
                config=_cfg_dict(cfg),
                seed=seed,
                parents=parents,
                counts={t: v["n"] for t, v in res["tasks"].items()},
                timings={k: float(v) for k, v in res["timings"].items()},
                extra={
                    "average": res["average"],
                    "average_stderr": res["average_stderr"],
                    "comparable": res["comparable"],
                    "data_source": res["data_source"],
                    "checkpoint": res["checkpoint"],
                    "harness_version": res["harness"]["version"],
                },
            ),
        )
    return res


def _cfg_dict(cfg: EvalConfig) -> dict[str, Any]:
    return to_dict(cfg)


def format_results(res: dict[str, Any]) -> str:
    """A small fixed-width table of per-task numbers and the headline average, for the CLI and logs."""
    lines = [f"{'task':<16}{'n':>6}  {'acc':>14}  {'acc_norm':>14}  {'P(correct)':>14}  {'bits/byte':>14}  headline"]

    def pm(v: float | None, se: float | None) -> str:
        if v is None:
            return f"{'-':>14}"
        return f"{v:.4f}±{se:.4f}" if se is not None else f"{v:.4f}"

    for t, d in res["tasks"].items():
        extra = ""
        if d.get("perplexity") is not None:
            extra = f"ppl={d['perplexity']:.4g}"
        elif d.get("headline_metric"):
            extra = d["headline_metric"]
        lines.append(
            f"{t:<16}{d['n']:>6}  {pm(d.get('acc'), d.get('acc_stderr')):>14}  "
            f"{pm(d.get('acc_norm'), d.get('acc_norm_stderr')):>14}  {pm(d.get('prob_correct'), d.get('prob_correct_stderr')):>14}  "
            f"{pm(d.get('bpb'), d.get('bpb_stderr')):>14}  {extra}"
        )
    avg = res["headline"]
    if avg["value"] is not None:
        tag = "" if avg["complete"] else f" (only {avg['n_tasks']} of {len(HEADLINE_TASKS)} tasks)"
        lines.append(f"average{tag}: {pm(avg['value'], avg['stderr']).strip()}")
    for key, label in (("prob_correct", "P(correct choice)"), ("bpb", "bits per byte of the correct continuation")):
        c = (res.get("continuous") or {}).get(key) or {}
        if c.get("value") is not None:
            lines.append(f"average {label} ({c['n_tasks']} tasks): {pm(c['value'], c['stderr']).strip()}")
    if not res["comparable"]:
        lines.append("not comparable: " + ", ".join(res["not_comparable_because"]))
    return "\n".join(lines)
