"""Zero-shot downstream evaluation of a checkpoint with lm-evaluation-harness (``lmselect eval CHECKPOINT_DIR``).

Task data: by default the small bundled slices (a demo; results are marked not comparable); ``--task-data DIR``
reads full local files laid out like the staged benchmark folder (``DIR/sciq/sciq_validation.jsonl``, ...);
``--online`` lets the harness download its datasets as usual. ``--limit N`` scores the first N items of each task
(a smoke run, also marked not comparable). Results go to ``OUT/results.json`` with a manifest kind=eval.

``--export-tasks DIR`` writes the same local tasks as configs for plain lm-eval instead (no checkpoint needed)::

    lmselect eval --export-tasks tasks_local --tasks sciq,piqa
    HF_HUB_OFFLINE=1 lm_eval --model hf --model_args pretrained=CKPT --include_path tasks_local \
        --tasks lmselect_sciq,lmselect_piqa --device cpu

Settings can also be given as ``--key=value`` overrides of the eval config (e.g. ``--bootstrap_iters=10000``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmselect.artifacts import LmselectError
from lmselect.config import load_config, to_dict
from lmselect.eval.harness import EvalConfig, evaluate_checkpoint, format_results
from lmselect.eval.tasks import ALL_TASKS, export_task_configs, resolve_task_names
from lmselect.paths import TASKS_DIR


def export(args: argparse.Namespace) -> int:
    """``--export-tasks DIR``: write the task configs and print the lm_eval command that uses them."""
    if args.online:
        raise LmselectError("--export-tasks writes configs for local files; it cannot be combined with --online")
    names = export_task_configs(args.tasks, args.task_data or TASKS_DIR, args.export_tasks)
    ckpt = args.checkpoint or "CHECKPOINT_DIR"
    print(f"wrote {len(names)} task configs to {args.export_tasks}; run them offline with:")
    print(
        f"  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 lm_eval --model hf --model_args pretrained={ckpt} "
        f"--include_path {args.export_tasks} --tasks {','.join(names)} --device {args.device}"
        + (f" --limit {args.limit}" if args.limit is not None else "")
    )
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``lmselect eval``."""
    parser.add_argument(
        "checkpoint", metavar="CHECKPOINT_DIR", nargs="?", default=None,
        help="HF-format checkpoint (config.json + weights + tokenizer)",
    )
    parser.add_argument(
        "--export-tasks", metavar="DIR", default=None,
        help="write the local task configs for plain `lm_eval --include_path DIR` (offline) and exit",
    )
    parser.add_argument("--out", default=None, help="output directory (default: CHECKPOINT_DIR/eval)")
    parser.add_argument(
        "--tasks", default="all",
        help=f"comma-separated tasks, 'all' (default: {','.join(ALL_TASKS)}) or 'headline' (the 9 averaged tasks)",
    )
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--task-data", default=None, metavar="DIR", help="directory of full local task files")
    src.add_argument("--online", action="store_true", help="let the harness download its datasets")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N items per task (smoke run)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0 (default: cpu)")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | auto")
    parser.add_argument("--seed", type=int, default=None, help="harness seeds (python/numpy/torch/few-shot)")
    parser.add_argument("--max-length", type=int, default=None, help="context length (default: the model's)")


def run(args: argparse.Namespace) -> int:
    """Evaluate ``args.checkpoint`` and print the per-task table; raises LmselectError on bad input."""
    if args.export_tasks is not None:
        return export(args)
    if args.checkpoint is None:
        raise LmselectError("give a CHECKPOINT_DIR to evaluate (or --export-tasks DIR to write task configs)")

    base = {
        "tasks": resolve_task_names(args.tasks),
        "task_data": args.task_data,
        "online": bool(args.online),
        "limit": args.limit,
        "batch_size": args.batch_size,
        "device": args.device,
        "dtype": args.dtype,
        "max_length": args.max_length,
    }
    if args.seed is not None:
        base["seed"] = args.seed
    cfg = load_config(EvalConfig, None, getattr(args, "overrides", []) or [], base=base)
    kw = to_dict(cfg)
    res = evaluate_checkpoint(
        args.checkpoint,
        out_dir=args.out,
        tasks=kw["tasks"],
        task_data=kw["task_data"],
        limit=kw["limit"],
        batch_size=kw["batch_size"],
        device=kw["device"] or "cpu",
        seed=kw["seed"],
        online=kw["online"],
        bootstrap_iters=kw["bootstrap_iters"],
        max_length=kw["max_length"],
        dtype=kw["dtype"],
    )
    print(format_results(res))
    out = Path(args.out) if args.out else Path(args.checkpoint) / "eval"
    print(f"results: {out / 'results.json'}")
    return 0
