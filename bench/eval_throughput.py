#!/usr/bin/env python3
"""Downstream-eval throughput (items/s) of ``lmselect eval`` on the 9-task headline suite.

    python bench/eval_throughput.py                                 # CPU: pythia-14m, bundled slices (40/task)
    python bench/eval_throughput.py --device cuda --batch-size 64   # GPU
    python bench/eval_throughput.py --task-data /path/to/tasks --limit 200 --tasks all

Builds a fresh ``pythia-14m`` (random init) with a byte-level BPE trained in memory on the task text itself,
saves both as an HF checkpoint in a temp dir, loads it back the way ``lmselect eval`` does, and times
``evaluate_model`` (harness request building + HFLM loglikelihood scoring + metrics). Items are scored documents;
requests are the harness's loglikelihood calls (one per answer choice). A random-init model scores near chance; the
figure of interest is the speed, which depends on the tokenizer's tokens per item (printed) and the batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _task_texts(task_data: Path) -> Iterator[str]:
    """Every string in the local task files (questions, passages, choices), to train the benchmark tokenizer on."""
    from lmselect.eval.tasks import LOCAL_TASKS, read_local_records

    def strings(x: Any) -> Iterator[str]:
        if isinstance(x, str):
            yield x
        elif isinstance(x, dict):
            for v in x.values():
                yield from strings(v)
        elif isinstance(x, list):
            for v in x:
                yield from strings(v)

    for spec in LOCAL_TASKS.values():
        p = task_data / spec.file
        if p.is_file():
            for rec in read_local_records(p, limit=2000):
                yield from strings(rec)


def train_tokenizer(task_data: Path, vocab_size: int) -> Any:
    """A byte-level BPE (GPT-2 style) trained on the task text; eos = bos = pad = <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_task_texts(task_data), trainer)
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, pad_token=eos)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    ap.add_argument("--preset", default="pythia-14m")
    ap.add_argument("--tasks", default="headline", help="'headline' (9 tasks), 'all' (10) or a comma list")
    ap.add_argument("--task-data", default=None, help="full local task files (default: the bundled slices)")
    ap.add_argument("--limit", type=int, default=None, help="items per task (default: every item of the files)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 16 on CPU, 64 on GPU")
    ap.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary trained on the task text")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--dtype", default=None, help="weights dtype: float32 (CPU default) or bfloat16 (GPU default)")
    ap.add_argument("--json", action="store_true", help="print one JSON line with the figures")
    args = ap.parse_args(argv)

    import torch

    from lmselect.eval.harness import evaluate_model, load_checkpoint
    from lmselect.eval.tasks import resolve_task_names
    from lmselect.models import build_model
    from lmselect.paths import TASKS_DIR

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.startswith("cuda")
    batch_size = args.batch_size or (64 if gpu else 16)
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    task_data = Path(args.task_data) if args.task_data else TASKS_DIR
    names = resolve_task_names(args.tasks)

    t0 = time.perf_counter()
    tok = train_tokenizer(task_data, args.vocab_size)
    t_tok = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="lmselect-evalbench-") as tmp:
        ckpt = Path(tmp) / "ckpt"
        model = build_model(args.preset, len(tok), seed=0, eos_token_id=tok.eos_token_id)
        model.save_pretrained(ckpt)
        tok.save_pretrained(ckpt)
        del model
        t1 = time.perf_counter()
        model, tok = load_checkpoint(ckpt, dtype=dtype, device=device)
        t_load = time.perf_counter() - t1
        # process CPU time beside wall time: on a shared machine wall-clock items/s understates the code's speed
        c0 = time.process_time()
        res = evaluate_model(
            model, tok, tasks=names, task_data=args.task_data, limit=args.limit, batch_size=batch_size, device=device
        )
        cpu_s = time.process_time() - c0

    # tokens per item, to make CPU figures comparable across tokenizers
    from lmselect.eval.tasks import build_tasks

    n_req, n_tok = 0, 0
    for _t, task in build_tasks(names, task_data).items():
        task.set_config(key="num_fewshot", value=0)
        task.build_all_requests(limit=args.limit)
        for inst in task.instances:
            n_req += 1
            n_tok += sum(len(tok(s)["input_ids"]) for s in inst.arguments if isinstance(s, str))
    ev = res["timings"]["evaluate_s"]
    out = {
        "preset": args.preset,
        "device": res["device"],
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "tasks": names,
        "task_data": str(task_data),
        "items": res["n_items"],
        "requests": n_req,
        "tokens_per_request": n_tok / max(n_req, 1),
        "vocab_size": len(tok),
        "evaluate_s": ev,
        "process_cpu_s": cpu_s,
        "load_average_1min": os.getloadavg()[0],
        "items_per_s": res["n_items"] / ev,
        "requests_per_s": n_req / ev,
        "build_tasks_s": res["timings"]["build_tasks_s"],
        "tokenizer_train_s": t_tok,
        "load_s": t_load,
        "average": res["average"],
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"{args.preset} on {out['device']} ({dtype}, {out['threads']} threads, batch {batch_size}): "
            f"{out['items']} items / {n_req} requests ({out['tokens_per_request']:.0f} tokens each) in {ev:.1f} s "
            f"-> {out['items_per_s']:.1f} items/s, {out['requests_per_s']:.1f} requests/s "
            f"(task build {out['build_tasks_s']:.1f} s, load {t_load:.1f} s; process CPU {cpu_s:.1f} s, "
            f"load average {out['load_average_1min']:.1f}; avg acc {out['average']:.3f})"
        )
    return out


if __name__ == "__main__":
    main()
