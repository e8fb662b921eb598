"""``lmselect score``: score every sequence of a pool (or every window of a .jsonl file) with a score model.

    lmselect score --model RUN/.../bilevel/score_model --pool POOL --pool-shard 1 --out scores/
    torchrun --nproc-per-node 8 -m lmselect.cli score --model M --pool POOL --out scores/   # one part per rank
    lmselect score --model M --pool POOL --shard 3/16 --out scores/                          # cluster array task 3
    lmselect score --model CKPT --lm-loss --jsonl docs.jsonl --tokenizer-from POOL --out scores/

Output: a scores sidecar (DESIGN "Scores sidecar"; :mod:`lmselect.score.sidecar`), written part by part and
resumable (:mod:`lmselect.score.job`). ``--jsonl`` input also gets ``documents.parquet`` (one score per document:
the mean over its windows, with min, max and n_windows) and a dolma attribute file per input file
(:mod:`lmselect.score.windows`, written by :mod:`lmselect.data.records`).
The model is a :class:`~lmselect.models.scorer.SequenceScorer` directory (``scorer.json``), or, with ``--lm-loss``,
any HF causal-LM checkpoint, which then scores a sequence by its negative mean next-token cross-entropy.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmselect.artifacts import LmselectError, is_complete, read_manifest
from lmselect.config import load_config, to_dict
from lmselect.data.pool import TokenPool
from lmselect.data.readers import resolve_jsonl_inputs
from lmselect.data.records import DEFAULT_ATTRIBUTE, check_attribute_name
from lmselect.score.job import score_pool
from lmselect.score.windows import score_jsonl
from lmselect.select.base import is_text_scorer
from lmselect.train.distributed import rank_world

# ----------------------------------------------------------------------------------------------------------------
# configuration


@dataclass
class ScoreConfig:
    """Resolved ``lmselect score`` configuration (saved as ``config.yaml`` and in the manifest)."""

    model: str = ""
    lm_loss: bool = False
    trust_tokenizer: bool = False  # score with a model whose tokenizer cannot be checked (none saved with it)
    pool: str | None = None
    pool_shard: str = "all"  # "all" (every training shard), "val", "1" or "0,2"
    jsonl: str | None = None
    tokenizer_from: str | None = None
    text_field: str = "text"  # jsonl: the field holding the text
    seq_len: int | None = None  # jsonl windows; default: the scorer's (scorer.json) or the tokenizer pool's
    batch_size: int = 64
    shard: str | None = None  # "i/n": compute only part i of n (cluster arrays); torchrun ranks split further
    num_parts: int | None = None  # without --shard: how many parts to split the work into (default: existing, or 1)
    device: str = "auto"
    dtype: str = "auto"  # auto = bf16 autocast on GPU, float32 on CPU
    checkpoint_every: int = 500
    attribute_name: str = DEFAULT_ATTRIBUTE  # jsonl: dolma attribute prefix, "<name>__score"
    out: str = ""


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"3/16"`` -> (3, 16); one-line error naming ``--shard`` otherwise."""
    if text is None or text == "":
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise LmselectError(f"--shard must look like i/n (e.g. 0/4), got {text!r}")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise LmselectError(f"--shard {text}: need 0 <= i < n")
    return i, n


# ----------------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``lmselect score`` flags."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", required=True, help="score model dir (scorer.json), or an HF checkpoint with --lm-loss")
    g.add_argument("--lm-loss", action="store_true", help="score = -(mean next-token cross-entropy) of a causal LM")
    g.add_argument("--trust-tokenizer", action="store_true",
                   help="score even when the model carries no tokenizer to check against the text's (refused otherwise)")
    g = parser.add_argument_group("input (one of)")
    g.add_argument("--pool", help="token pool directory")
    g.add_argument("--pool-shard", default="all", help="pool shard(s) to score: all (training shards), val, 1, 0,2")
    g.add_argument("--jsonl", help="raw .jsonl[.gz|.zst] file, folder of them, or glob (quote it); a text field per "
                   "record, optional 'id'")
    g.add_argument("--text-field", default="text", help="--jsonl: the record field holding the text")
    g.add_argument("--tokenizer-from", help="pool or model dir whose tokenizer encodes the --jsonl text")
    g.add_argument("--seq-len", type=int, help="--jsonl window length in tokens (default: scorer's / pool's)")
    g.add_argument("--attribute-name", default=DEFAULT_ATTRIBUTE,
                   help="--jsonl: dolma attribute name; writes attributes/NAME/<each input's relative name> (same "
                   "name and compression as the input, one line per input line) with NAME__score")
    g = parser.add_argument_group("execution")
    g.add_argument("--out", required=True, help="output sidecar directory")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--shard", help="i/n: compute only part i of n (cluster arrays; --jsonl: shard i's files, the last "
                   "shard to finish merges); torchrun ranks split it further")
    g.add_argument("--num-parts", type=int, help="split into this many parts (default: existing split, or 1)")
    g.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda:0")
    g.add_argument("--dtype", default="auto", help="autocast dtype: auto (bf16 on GPU), float32, bfloat16, float16")
    g.add_argument("--checkpoint-every", type=int, default=500, help="save in-part progress every M batches (0: off)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def pool_ids(pool: Any, spec: str) -> np.ndarray:
    """Sequence ids named by ``--pool-shard``: ``all`` (training shards), ``val``, or shard numbers like ``0,2``."""
    spec = str(spec).strip()
    if spec in ("", "all"):
        return pool.ids(None)
    out = []
    for s in spec.split(","):
        s = s.strip()
        if s == "val":
            out.append(pool.ids("val"))
            continue
        try:
            k = int(s)
        except ValueError:
            raise LmselectError(f"--pool-shard: expected all, val or shard numbers like 0,2; got {spec!r}") from None
        if not (k == -1 or 0 <= k < pool.n_shards):
            raise LmselectError(f"--pool-shard {k}: {pool.path} has shards 0..{pool.n_shards - 1} (and val)")
        out.append(pool.ids(k))
    ids = np.unique(np.concatenate(out)) if out else np.zeros(0, np.int64)
    if len(ids) == 0:
        raise LmselectError(f"--pool-shard {spec}: no sequences in {pool.path}")
    return ids


def preflight(args: argparse.Namespace) -> ScoreConfig:
    """What ``lmselect score`` checks before loading anything heavy: the settings, that the model and the input
    exist (a pool's manifest, the --jsonl files); ``lmselect slurm score`` calls it before writing a script."""
    base = {f.name: getattr(args, f.name) for f in dataclasses.fields(ScoreConfig) if hasattr(args, f.name)}
    cfg = load_config(ScoreConfig, None, getattr(args, "overrides", []) or [], base=base)
    if (cfg.pool is None) == (cfg.jsonl is None):
        raise LmselectError("give exactly one input: --pool POOL or --jsonl FILE")
    if not Path(cfg.model).exists():
        raise LmselectError(f"--model {cfg.model}: not found")
    if cfg.pool is not None:
        read_manifest(cfg.pool, kind="pool")
    else:
        resolve_jsonl_inputs(cfg.jsonl)
    parse_shard(cfg.shard)
    check_attribute_name(cfg.attribute_name)
    return cfg


def run(args: argparse.Namespace) -> int:
    """Run ``lmselect score``; prints where the sidecar is and how fast it was computed."""
    cfg = preflight(args)
    if (cfg.pool is None) == (cfg.jsonl is None):
        raise LmselectError("give exactly one input: --pool POOL or --jsonl FILE")
    text = not cfg.lm_loss and is_text_scorer(cfg.model)
    if text and cfg.pool is not None:
        raise LmselectError(f"{cfg.model}: a text scorer (fasttext / dsir) scores documents of --jsonl files; the "
                            "round's own scores of its candidates are in that scores directory already")
    if cfg.jsonl is not None and cfg.tokenizer_from is None and not text:
        raise LmselectError("--jsonl needs --tokenizer-from POOL_OR_MODEL_DIR")
    check_attribute_name(cfg.attribute_name)
    shard = parse_shard(cfg.shard)
    if cfg.num_parts is not None and cfg.num_parts < 1:
        raise LmselectError(f"--num-parts must be >= 1, got {cfg.num_parts}")
    progress = not args.no_progress and rank_world()[0] == 0
    common = dict(batch_size=cfg.batch_size, shard=shard, num_parts=cfg.num_parts, device=cfg.device,
                  dtype=cfg.dtype, progress=progress, lm_loss=cfg.lm_loss, checkpoint_every=cfg.checkpoint_every,
                  config=to_dict(cfg), trust_tokenizer=cfg.trust_tokenizer)
    if cfg.pool is not None:
        pool = TokenPool(cfg.pool)
        out = score_pool(cfg.model, pool, pool_ids(pool, cfg.pool_shard), cfg.out, **common)
    else:
        out = score_jsonl(cfg.model, cfg.jsonl, cfg.tokenizer_from, cfg.out, seq_len=cfg.seq_len,
                          attribute_name=cfg.attribute_name, text_field=cfg.text_field, **common)
    if is_complete(out, "scores"):
        m = read_manifest(out)
        print(f"scores: {out} ({m['counts']['sequences']} sequences, "
              f"{m['timings'].get('sequences_per_s', 0):.1f} sequences/s per process)")
    else:
        print(f"scores: {out} (this process's part(s) done; the manifest follows when every part exists)")
    return 0
