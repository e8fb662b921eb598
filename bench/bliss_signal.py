"""Does BLISS get a real signal at demo scale? Gradient alignment by source, v noise, and short solves with diagnostics.

The demo's setting (METHODS §1.3, ``recipes/demo.yaml``): a 2-layer ``debug`` proxy warmed up for 120 steps on half of
shard 0 of the demo pool, LAMBADA passages as the selection set. On top of the pool's eight sources the probe plants
``target_like`` sequences: LAMBADA passages the validation set does not contain (items 200–499, packed into pool-length
sequences), i.e. text from the validation set's own distribution, which a working selector should prefer.

Part A (no solve), per objective (final_word, all_tokens, mix 0.5), with v over all 200 validation items:
  * the mean cosine between per-sequence gradients ∇CE_i and v, by source (``--per-source`` sequences each);
  * the agreement of v between two disjoint 32-item batches (mean over pairs) and between two 100-item halves.
Part B, per variant (``--variants``): ``solve_round`` for ``--outer-steps`` outer steps with the demo's BLISS settings
on shard 1 + the planted sequences; prints the solver diagnostics (diagnostics.json) and the top-20 % selection rate
of each source under the learned score model (the base rate is 0.20).

    PYTHONPATH=src OMP_NUM_THREADS=2 python bench/bliss_signal.py --pool /tmp/bliss_sig/pool --part A
    PYTHONPATH=src OMP_NUM_THREADS=2 python bench/bliss_signal.py --pool /tmp/bliss_sig/pool --part B \\
        --variants paper,all_warm

Build the pool once with ``lmselect prepare data/demo/corpus/*.jsonl.gz -o POOL --vocab-size 4096 --seq-len 128
--n-shards 3 --seed 0``. The warm-up proxy is cached in ``--work``. To stay within a few CPU minutes the KL teacher is
a frozen copy of the warm-up proxy (the demo uses the warm-up pythia-14m target; γ = 1e-2 either way).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmselect.data.pool import TokenPool
from lmselect.data.valset import ValidationSet, load_validation
from lmselect.models.losses import token_ce
from lmselect.models.presets import build_model
from lmselect.select.bliss import BlissConfig, init_score_model, solve_round

LAMBADA = Path(__file__).resolve().parents[1] / "data" / "demo" / "lambada_val.jsonl"
N_VAL = 200  # the demo's validation.max_items
DEMO_BLISS = dict(outer_steps=30, batch_size=32, val_batch_size=32, proxy_lr=1e-4, score_lr=1e-3, log_every=5,
                  save_every=1000)
VARIANTS: dict[str, dict[str, Any]] = {
    "paper": dict(profile="paper"),
    "fw_warm": dict(profile="paper", z_warm_start=True),
    "all_paper": dict(profile="paper", objective="all_tokens"),
    "all_warm": dict(objective="all_tokens", z_warm_start=True),
    "mix_warm": dict(objective="mix", objective_mix=0.5, z_warm_start=True),
    "all_warm_full": dict(objective="all_tokens", z_warm_start=True, val_batch_size=0),
    "all_warm_zlr": dict(objective="all_tokens", z_warm_start=True, z_lr=1e-1),
}


class PlantedPool:
    """Duck-typed TokenPool over in-memory rows (what solve_round needs: batch, sources, sizes, fingerprint)."""

    def __init__(self, tokens: np.ndarray, sources: np.ndarray, base: TokenPool):
        self.tokens, self._sources = tokens, sources
        self.vocab_size, self.path = base.vocab_size, base.path
        self.tokenizer_fingerprint = base.tokenizer_fingerprint

    def batch(self, ids: Any) -> torch.Tensor:
        return torch.from_numpy(self.tokens[np.asarray(ids, dtype=np.int64)].astype(np.int64))

    def sources(self, ids: Any = None) -> np.ndarray:
        return self._sources if ids is None else self._sources[np.asarray(ids, dtype=np.int64)]


def planted_rows(tok: Any, seq_len: int, eos: int) -> np.ndarray:
    """LAMBADA items N_VAL.. (not in the validation set), EOS-joined and cut into seq_len rows."""
    texts = [json.loads(ln)["text"] for ln in LAMBADA.read_text().splitlines()[N_VAL:]]
    stream: list[int] = []
    for t in texts:
        stream += tok.encode(t, add_special_tokens=False) + [eos]
    n = len(stream) // seq_len
    return np.asarray(stream[: n * seq_len], dtype=np.int64).reshape(n, seq_len)


def warm_proxy(pool: TokenPool, work: Path, steps: int = 120) -> torch.nn.Module:
    """The demo's warm-up proxy: debug preset, 120 AdamW steps (lr 3e-3, 20 warm-up) on half of shard 0; cached."""
    path = work / "proxy_warm.pt"
    model = build_model("debug", pool.vocab_size, seed=0)
    if path.is_file():
        model.load_state_dict(torch.load(path))
        return model
    rng = np.random.default_rng(0)
    ids = rng.permutation(pool.ids(0))[: len(pool.ids(0)) // 2]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    model.train()
    for _ in range(steps):
        x = pool.batch(np.sort(rng.choice(ids, 32, replace=False)))
        loss = token_ce(model(input_ids=x).logits, x).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    work.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    print(f"warm-up proxy: {steps} steps, last train CE {float(loss):.3f}", flush=True)
    return model


def grad(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Flat ∇ of the token-weighted masked CE."""
    ce = token_ce(model(input_ids=ids).logits, ids)
    f = (ce * mask).sum() / mask.sum().clamp_min(1)
    g = torch.autograd.grad(f, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if gi is None else gi).reshape(-1)
                      for p, gi in zip([p for p in model.parameters() if p.requires_grad], g)])


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))


def part_a(model: torch.nn.Module, vs: ValidationSet, pool: PlantedPool, cand: np.ndarray, per_source: int) -> None:
    ids, fw, tok = vs.objective_masks()
    v = {"final_word": grad(model, ids, fw), "all_tokens": grad(model, ids, tok)}
    v["mix"] = 0.5 * v["final_word"] + 0.5 * v["all_tokens"]
    print(f"\nA. v over {len(vs)} items: cos(v_final_word, v_all_tokens) = {cos(v['final_word'], v['all_tokens']):.3f}")
    rng = np.random.default_rng(1)
    print("v agreement  (cos between gradients of disjoint validation batches)")
    for name, m in (("final_word", fw), ("all_tokens", tok)):
        pairs = []
        for _ in range(4):
            p = rng.permutation(len(vs))
            pairs.append(cos(grad(model, ids[p[:32]], m[p[:32]]), grad(model, ids[p[32:64]], m[p[32:64]])))
        p = rng.permutation(len(vs))
        h = len(vs) // 2
        halves = cos(grad(model, ids[p[:h]], m[p[:h]]), grad(model, ids[p[h:]], m[p[h:]]))
        print(f"  {name:11s} 32 vs 32: {np.mean(pairs):.3f} (pairs {', '.join(f'{x:.2f}' for x in pairs)});"
              f"  {h} vs {h}: {halves:.3f};  tokens per item {float(m.sum()) / len(vs):.1f}")
    src = pool.sources(cand)
    rows = np.concatenate([rng.choice(cand[src == s], min(per_source, int((src == s).sum())), replace=False)
                           for s in sorted(set(src))])
    out: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        x = pool.batch([r])
        g = grad(model, x, torch.ones(1, x.shape[1] - 1))
        for k, vk in v.items():
            out.setdefault(k, {}).setdefault(str(pool.sources([r])[0]), []).append(cos(g, vk))
    print(f"mean cos(grad CE_i, v) by source ({per_source} sequences each; ± = std error)")
    srcs = sorted(out["final_word"])
    print("  " + "source".ljust(12) + "".join(k.rjust(18) for k in v))
    for s in srcs:
        cells = [f"{np.mean(out[k][s]):+.3f} ±{np.std(out[k][s]) / math.sqrt(len(out[k][s])):.3f}" for k in v]
        print("  " + s.ljust(12) + "".join(c.rjust(18) for c in cells))


def part_b(model: torch.nn.Module, vs: ValidationSet, pool: PlantedPool, cand: np.ndarray, names: list[str],
           steps: int, work: Path) -> None:
    src = pool.sources(cand)
    for name in names:
        cfg = BlissConfig(**{**DEMO_BLISS, "outer_steps": steps, **VARIANTS[name]})
        proxy, target = copy.deepcopy(model), copy.deepcopy(model)
        scorer = init_score_model(proxy, seed=2)
        out = work / f"solve_{name}_{steps}"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        t0 = time.perf_counter()
        scorer = solve_round(cfg, proxy, target, scorer, cand, pool, vs, out, progress=False)
        secs = time.perf_counter() - t0
        d = json.loads((out / "diagnostics.json").read_text())
        with torch.no_grad():
            scorer.eval()
            s = torch.cat([scorer(pool.batch(cand[i : i + 512])) for i in range(0, len(cand), 512)]).double().numpy()
        top = np.zeros(len(cand), dtype=bool)
        top[np.argsort(-s, kind="stable")[: int(0.2 * len(cand))]] = True
        print(f"\nB. {name}: {VARIANTS[name]}  ({steps} outer steps, {secs:.0f} s)")
        sm = d["summary"]
        print("  " + "  ".join(f"{k}={sm[k]['mean']:.4g} (first {sm[k]['first']:.3g}, last {sm[k]['last']:.3g})"
                               for k in ("cos_zv", "hz_ratio", "z_residual", "v_agreement", "v_signal") if k in sm))
        print("  " + "  ".join(f"{k}={sm[k]['mean']:.4g}" for k in ("c_source_share", "c_source_share_null",
                                                                    "weight_ratio", "weight_max_b") if k in sm))
        for w in d["warnings"]:
            print("  WARNING:", w)
        print("  source        mean std. c   top-20% rate")
        for s_name in sorted(set(src)):
            cb = d["c_by_source"].get(s_name, {})
            print(f"  {s_name:12s} {cb.get('mean_c_std', float('nan')):+10.3f}   {top[src == s_name].mean():10.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", required=True)
    ap.add_argument("--work", default="/tmp/bliss_sig/work")
    ap.add_argument("--part", default="AB", help="A, B or AB")
    ap.add_argument("--variants", default="paper,all_warm", help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--outer-steps", type=int, default=30)
    ap.add_argument("--per-source", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    work = Path(a.work)
    base = TokenPool(a.pool)
    tok = base.load_tokenizer()
    vs = load_validation(LAMBADA, tok, kind="lambada", seq_len=base.seq_len, max_items=N_VAL)
    planted = planted_rows(tok, base.seq_len, base.eos_id)
    shard1 = base.ids(1)
    tokens = np.concatenate([np.asarray(base.tokens[shard1], dtype=np.int64), planted])
    sources = np.concatenate([base.sources(shard1).astype(object), np.array(["target_like"] * len(planted), dtype=object)])
    pool = PlantedPool(tokens, sources, base)
    cand = np.arange(len(tokens))
    print(f"pool: shard 1 ({len(shard1)} sequences) + {len(planted)} target_like; validation {len(vs)} LAMBADA items")
    model = warm_proxy(base, work)
    if "A" in a.part:
        part_a(model, vs, pool, cand, a.per_source)
    if "B" in a.part:
        part_b(model, vs, pool, cand, a.variants.split(","), a.outer_steps, work)


if __name__ == "__main__":
    main()
