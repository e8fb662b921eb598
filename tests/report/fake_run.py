"""A realistic synthetic run directory, laid out exactly as DESIGN.md "Run directory" documents, for report and
provenance tests. Nothing is trained: logs, scores, selections and eval results are made up but consistent (the
score model prefers the 'wiki' source, token-level methods log kept_fraction, every artifact records its parents
with ``lmselect.artifacts.parent_ref`` and a manifest written last with ``write_manifest``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from lmselect.artifacts import Manifest, atomic_save_npy, atomic_write_json, parent_ref, write_manifest
from lmselect.layout import RunLayout

TEXTS = {
    "wiki": [
        "The committee met on Tuesday to discuss the budget for the coming year.",
        "Rain is expected in the north, with sunshine in the south later today.",
        "A language model predicts the next token from the tokens before it.",
    ],
    "web": [
        "She opened the door and saw the garden covered in snow.",
        "The quick brown fox jumps over the lazy dog.",
    ],
    "spam": [
        "Buy cheap pills now!!! Click <b>here</b> & win a free offer.",
        "Subscribe to our mailing list to win a prize of one million dollars.",
    ],
}
TASKS = ("sciq", "arc_easy", "arc_challenge", "logiqa", "openbookqa", "boolq", "hellaswag", "piqa", "winogrande")
SEQ_LEN = 32
N_PER_SHARD = 40
STEPS = 30
TOKENS_PER_STEP = 4 * SEQ_LEN
VERSIONS = {"lmselect": "0.1.0"}  # skips importlib.metadata lookups: keeps the fixture fast


def _manifest(d: Path, kind: str, parents: Sequence[Path], *, seed: int | None = None, config: dict | None = None,
              counts: dict | None = None, timings: dict | None = None, extra: dict | None = None) -> dict[str, Any]:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.yaml").write_text(yaml.safe_dump(config or {"kind": kind}, sort_keys=False))
    return write_manifest(
        d,
        Manifest(kind=kind, config=config or {"kind": kind}, seed=seed, parents=[parent_ref(p) for p in parents],
                 counts=counts or {}, timings=timings or {}, extra=extra or {}, versions=VERSIONS),
    )


def _jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def make_pool(path: Path, tokenizer, n_shards: int, seed: int = 0) -> tuple[Path, np.ndarray]:
    """Pool with sources wiki/web/spam; shard 0 = warm-up, shards 1..n_shards-1 = rounds, plus a val hold-out."""
    from lmselect.data.pool import write_pool

    rng = np.random.default_rng(seed)
    names = list(TEXTS)
    n = N_PER_SHARD * n_shards + 8
    rows, sources = [], []
    eos = tokenizer.eos_token_id
    for i in range(n):
        src = names[i % 3]
        ids: list[int] = []
        while len(ids) < SEQ_LEN:
            ids += tokenizer.encode(TEXTS[src][rng.integers(len(TEXTS[src]))]) + [eos]
        rows.append(ids[:SEQ_LEN])
        sources.append(src)
    shard = np.concatenate([np.repeat(np.arange(n_shards), N_PER_SHARD), np.full(8, -1)]).astype(np.int32)
    write_pool(path, np.array(rows), shard, sources, tokenizer, seed=seed, config={"synthetic": True})
    return path, np.array(sources)


def _train_log(d: Path, start_tokens: int, start_loss: float, token_level: bool, rng: np.random.Generator,
               loop_format: bool = False) -> int:
    """Documented format (tokens, kept_fraction) or, with ``loop_format``, what train/loop.py writes: a start
    event record without a loss, ``tokens_seen`` and selector stats prefixed ``sel_``."""
    recs: list[dict[str, Any]] = []
    if loop_format:
        recs.append({"step": 0, "time": 1000.0, "event": "start", "tokens_per_step": TOKENS_PER_STEP})
    for s in range(1, STEPS + 1):
        rec = {
            "step": s,
            "time": 1000.0 + s,
            "loss": float(start_loss * np.exp(-0.02 * s) + 0.05 * rng.standard_normal()),
            "lr": 1e-3,
            "tokens_seen" if loop_format else "tokens": start_tokens + s * TOKENS_PER_STEP,
            "tokens_per_s": 5000.0,
        }
        if token_level:
            rec["sel_kept_fraction" if loop_format else "kept_fraction"] = float(0.6 + 0.02 * rng.standard_normal())
        recs.append(rec)
    _jsonl(d / "train_log.jsonl", recs)
    return start_tokens + STEPS * TOKENS_PER_STEP


def _checkpoint(d: Path, parents: list[Path], seed: int, tokens_seen: int, pool: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    (d / "model.safetensors").write_bytes(b"\0" * 16)
    _manifest(d, "checkpoint", parents, seed=seed, config={"preset": "debug", "seed": seed},
              extra={"preset": "debug", "step": STEPS, "tokens_seen": tokens_seen, "pool": str(pool)},
              counts={"steps": STEPS}, timings={"total": 12.5})


def make_fake_run(
    root: Path,
    tokenizer,
    *,
    methods: Sequence[str] = ("random", "bliss", "mates", "rho1", "blade"),
    seeds: Sequence[int] = (0, 1),
    rounds: int = 2,
    pool_in_run: bool = True,
) -> Path:
    """Write a complete run directory at ``root`` and return it (the pool under ``RUN/pool`` or, when
    ``pool_in_run`` is False, beside it and referenced by ``config.yaml`` ``pool.path``)."""
    run = Path(root)
    run.mkdir(parents=True, exist_ok=True)
    pool_path = run / "pool" if pool_in_run else run.parent / f"{run.name}-pool"
    pool, sources = make_pool(pool_path, tokenizer, n_shards=rounds + 1)
    shard_of = np.repeat(np.arange(rounds + 1), N_PER_SHARD)
    cfg = {
        "name": "fake",
        "seed": int(seeds[0]),
        "methods": list(methods),
        "seeds": list(seeds),
        "rounds": rounds,
        "fraction": 0.25,
        "pool": {"path": str(pool) if not pool_in_run else "pool"},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    rng = np.random.default_rng(123)

    warm_t, warm_p = run / "warmup" / "target", run / "warmup" / "proxy"
    warm_tokens = _train_log(warm_t, 0, 6.0, False, rng)
    _checkpoint(warm_t, [pool], int(seeds[0]), warm_tokens, pool)
    _train_log(warm_p, 0, 6.2, False, rng)
    _checkpoint(warm_p, [pool], int(seeds[0]), warm_tokens, pool)

    # per-method quality knobs so the results differ in a visible, checkable way
    quality = {"random": 0.0, "bliss": 0.30, "mates": 0.20, "rho1": 0.10, "blade": 0.15}
    round_dirs = []
    for _mi, method in enumerate(methods):
        q = quality.get(method, 0.05)
        for seed in seeds:
            prev_target = warm_t
            tokens = warm_tokens
            prev_score_model: Path | None = None
            for r in range(1, rounds + 1):
                rd = RunLayout(run).round(method, seed, r)
                ids = np.flatnonzero(shard_of == r).astype(np.int64)
                stage_dirs: list[Path] = []
                upstream: Path | None = None
                if method == "bliss":
                    b = rd / "bilevel"
                    recs = [
                        {"step": s, "upper_loss": 4.0 - 0.05 * s, "lower_loss": 4.5 - 0.04 * s,
                         "kl": 0.5 * np.exp(-0.1 * s), "hypergrad_norm": 1.0 / (1 + s), "score_mean": 0.1 * s,
                         "score_std": 1.0, "time": 1000.0 + s}
                        for s in range(1, 21)
                    ]
                    _jsonl(b / "bilevel_log.jsonl", recs)
                    (b / "score_model").mkdir(parents=True, exist_ok=True)
                    (b / "score_model" / "config.json").write_text("{}")
                    parents = [warm_p, prev_target] + ([prev_score_model] if prev_score_model else [])
                    _manifest(b, "bilevel", parents, seed=seed, timings={"total": 40.0 + r},
                              counts={"outer_steps": 20})
                    prev_score_model, upstream = b, b
                    stage_dirs.append(b)
                if method == "mates":
                    inf = rd / "influence"
                    inf.mkdir(parents=True, exist_ok=True)
                    import pyarrow as pa
                    import pyarrow.parquet as pq

                    pq.write_table(pa.table({"seq_id": ids[:10], "loss": rng.random(10)}), inf / "oracle.parquet")
                    _manifest(inf, "influence", [prev_target, pool], seed=seed, timings={"total": 90.0 + r})
                    upstream = inf
                    stage_dirs.append(inf)
                selected = None
                if method in ("bliss", "mates"):
                    sc = rd / "scores"
                    sc.mkdir(parents=True, exist_ok=True)
                    import pyarrow as pa
                    import pyarrow.parquet as pq

                    pref = {"wiki": 2.0, "web": 0.5, "spam": -2.0}
                    sign = 1.0 if method == "bliss" else -1.0  # MATES keeps the lowest predicted loss
                    score = np.array([sign * pref[s] for s in sources[ids]]) + 0.3 * rng.standard_normal(len(ids))
                    half = len(ids) // 2
                    for k, sl in enumerate((slice(0, half), slice(half, None))):
                        pq.write_table(
                            pa.table({"seq_id": ids[sl], "score": score[sl].astype(np.float32)}),
                            sc / f"part-{k:05d}-of-00002.parquet",
                        )
                    _manifest(sc, "scores", [upstream, pool], seed=seed, counts={"sequences": len(ids), "parts": 2},
                              timings={"total": 5.0})
                    stage_dirs.append(sc)
                    k_sel = int(round(0.25 * len(ids)))
                    order = np.argsort(-sign * score, kind="stable")
                    selected = np.sort(ids[order[:k_sel]])
                    thr = float(score[order[k_sel - 1]])
                    upstream = sc
                elif method == "random":
                    selected = np.sort(rng.choice(ids, size=int(round(0.25 * len(ids))), replace=False))
                    score, thr = None, None
                elif method in ("rho1", "blade"):  # token-level: the runner records the whole shard as selected
                    selected, score, thr = ids.copy(), None, None
                if selected is not None:
                    sel = rd / "selection"
                    sel.mkdir(parents=True, exist_ok=True)
                    atomic_save_npy(sel / "selected.npy", selected)
                    per_source = {}
                    for src in TEXTS:
                        cand = int((sources[ids] == src).sum())
                        got = int((sources[selected] == src).sum())
                        per_source[src] = {"candidates": cand, "selected": got, "rate": got / cand if cand else 0.0}
                    summary: dict[str, Any] = {
                        "method": method, "fraction": 1.0 if method in ("rho1", "blade") else 0.25, "k": int(len(selected)), "n_candidates": int(len(ids)),
                        "threshold": thr, "per_source": per_source, "histogram": None,
                    }
                    if score is not None:
                        edges = np.linspace(score.min(), score.max(), 11)
                        counts, _ = np.histogram(score, edges)
                        sel_counts, _ = np.histogram(score[np.isin(ids, selected)], edges)
                        if method == "bliss":  # the layout select/summary.py writes
                            summary["largest"] = True
                            summary["histogram"] = {"bins": 10, "edges": edges.tolist(), "all": counts.tolist(),
                                                    "selected": sel_counts.tolist()}
                        else:  # the layout documented in the brief
                            summary["histogram"] = {"edges": edges.tolist(), "counts": counts.tolist(),
                                                    "selected_counts": sel_counts.tolist()}
                    atomic_write_json(sel / "summary.json", summary)
                    _manifest(sel, "selection", [upstream or pool], seed=seed, counts={"selected": len(selected)},
                              timings={"total": 0.5})
                    stage_dirs.append(sel)
                    upstream = sel
                tgt = rd / "target"
                new_tokens = _train_log(tgt, tokens, 4.0 - 0.3 * r - q, method in ("rho1", "blade"), rng,
                                        loop_format=method in ("random", "mates", "rho1"))
                _checkpoint(tgt, [prev_target] + ([upstream] if upstream else [pool]), seed, new_tokens, pool)
                stage_dirs.append(tgt)
                ev = rd / "eval"
                ev.mkdir(parents=True, exist_ok=True)
                # every metric's Δ to random varies a little by seed (* q terms): a Δ equal at every seed is no
                # evidence (stats.paired_interval)
                tasks = {}
                for ti, t in enumerate(TASKS):
                    acc = 0.40 + q / 5 + 0.01 * r + 0.005 * ti + 0.003 * seed * (1 + q)
                    tasks[t] = {"acc": acc, "acc_stderr": 0.02, "acc_norm": acc + 0.01, "acc_norm_stderr": 0.02,
                                "n": 500}
                avg = float(np.mean([v["acc_norm"] for v in tasks.values()]))
                res = {
                    "tokens": new_tokens,
                    "val_loss": {"lambada": 5.0 - 0.4 * r - q - 0.01 * seed * (1 + q),
                                 "clean": 4.0 - 0.3 * r - q - 0.005 * seed * q},
                    "downstream": {"average": avg, "average_stderr": 0.0067, "tasks": tasks,
                                   "average_prob_correct": 0.30 + q / 10 + 0.01 * r + 0.002 * seed * (1 + q),
                                   "average_prob_correct_stderr": 0.01,
                                   "average_bpb": 2.0 - q / 10 - 0.01 * r - 0.002 * seed * q, "average_bpb_stderr": 0.02},
                }
                atomic_write_json(ev / "results.json", res)
                _manifest(ev, "eval", [tgt], seed=seed, timings={"total": 3.0})
                stage_dirs.append(ev)
                _manifest(rd, "round", stage_dirs, seed=seed, config={"method": method, "seed": seed, "round": r,
                                                                        "fraction": 0.25})
                round_dirs.append(rd)
                prev_target, tokens = tgt, new_tokens
    _manifest(run, "run", [pool, warm_t, warm_p] + round_dirs, seed=int(seeds[0]), config=cfg,
              extra={"methods": list(methods), "seeds": list(seeds), "rounds": rounds})
    return run
