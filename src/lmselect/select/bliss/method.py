"""The registered ``bliss`` selection method (METHODS §1.3): per round the bilevel solve (:mod:`.round`), the score
model's scores of every candidate, the top fraction, and the rank stability between rounds' score models."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lmselect.artifacts import LmselectError, parent_ref
from lmselect.config import replace
from lmselect.context import STREAM_METHOD, STREAM_SCORER_INIT, STREAM_SELECT, FlopContext, RoundContext
from lmselect.models.scorer import SequenceScorer
from lmselect.score import read_scores, score_pool
from lmselect.score.job import forward_scores, resolve_amp_dtype
from lmselect.select.base import Selection, SelectionMethod, register
from lmselect.select.bliss.config import BlissConfig, resolve_profile
from lmselect.select.bliss.round import SCORE_MODEL_DIR, solve_round
from lmselect.select.bliss.solver import init_score_model
from lmselect.select.topk import top_fraction
from lmselect.stats import spearman
from lmselect.train.checkpoint import load_checkpoint_model

STABILITY_SAMPLE = 1024  # candidates scored by both the previous and the current round's score model


@register
class Bliss(SelectionMethod):
    """BLISS in the multi-round runner (METHODS §1.3): per round (a) the proxy is reset to the warm-up proxy, the
    score model is inherited from round r-1 (round 1: the warm-up proxy's backbone + a fresh head) and the KL teacher
    is the target at the end of round r-1; the bilevel solve runs on the round's candidates; (b) the score model
    scores every candidate; (c) the top ``select_fraction`` is kept deterministically (ties by sequence id)."""

    name = "bliss"
    description = "bilevel influence scoring: a score model trained so that its reweighting lowers the proxy's validation loss"
    config_cls = BlissConfig
    needs = frozenset({"proxy", "selection_set"})
    stages = ("bilevel", "scores", "selection", "target", "eval")
    collective = True  # the solve and the scoring are distributed-aware (global-batch math, rank-sharded scoring)
    color = "#1f77b4"

    def resolved_config(self) -> BlissConfig:
        return resolve_profile(self.cfg)  # the profile's values count for stage identity

    def check_config(self) -> None:
        super().check_config()
        resolve_profile(self.cfg)  # profile, objective and option ranges, each error naming bliss.<key>
        for key in ("outer_steps", "batch_size", "inner_steps"):
            if getattr(self.cfg, key) < 1:
                raise LmselectError(f"recipe key 'bliss.{key}': must be >= 1, got {getattr(self.cfg, key)}")

    def select(self, ctx: RoundContext) -> Selection:
        bdir, sdir = ctx.stage_dir("bilevel"), ctx.stage_dir("scores")
        proxy = load_checkpoint_model(ctx.run.layout.warmup("proxy"), device=ctx.device)
        target = load_checkpoint_model(ctx.prev_target, device=ctx.device)
        prev = ctx.prev_stage_dir("bilevel")
        if prev is None:
            rcfg = resolve_profile(self.cfg)
            scorer = init_score_model(proxy, seed=ctx.derived_seed(STREAM_SCORER_INIT, per_round=False),
                                      activation=rcfg.score_activation, head_init=rcfg.score_head_init)
        else:
            scorer = SequenceScorer.load(prev / SCORE_MODEL_DIR, device=ctx.device)
        cfg = replace(self.cfg, seed=ctx.derived_seed(STREAM_METHOD))
        # rank stability: the inherited (previous round's) score model on a seeded sample of this round's
        # candidates, compared after the solve with this round's scores of the same sequences
        stab_ids = stab_prev = None
        if prev is not None:
            rng = np.random.default_rng(ctx.derived_seed(STREAM_SELECT))
            stab_ids = np.sort(rng.choice(ctx.candidates, min(STABILITY_SAMPLE, len(ctx.candidates)), replace=False))
            stab_prev = score_sequences(scorer, ctx.pool, stab_ids, ctx.recipe.score_batch_size, ctx.device)
        scorer = solve_round(cfg, proxy, target, scorer, ctx.candidates, ctx.pool, ctx.selection_set, bdir,
                             device=ctx.device)
        del proxy, target
        # under torchrun each rank scores its own part; the last part to finish writes the manifest, so wait for
        # every rank before reading
        score_pool(scorer, ctx.pool, ctx.candidates, sdir, batch_size=ctx.recipe.score_batch_size, device=ctx.device,
                   progress=ctx.run.is_main)
        ctx.run.sync()
        ids, scores = read_scores(sdir)
        diag: dict[str, Any] = {}
        if stab_ids is not None and stab_prev is not None:
            diag["rank_stability"] = {"spearman_prev_round": spearman(stab_prev, _aligned(stab_ids, ids, scores)),
                                      "n": int(len(stab_ids)), "scorers": f"round {ctx.round - 1} vs round {ctx.round}"}
        return Selection(top_fraction(ids, scores, ctx.fraction), scores=_aligned(ctx.candidates, ids, scores),
                         parents=[parent_ref(bdir), parent_ref(sdir)], diagnostics=diag)

    def selection_flops(self, f: FlopContext) -> float:
        b, T = resolve_profile(self.cfg), f.seq_len
        hb = int(b.hyper_batches)
        npx, nt = f.params(f.recipe.proxy.preset), f.params(f.recipe.target.preset)
        per_outer = (
            b.inner_steps * b.batch_size * T * (6 * npx + 2 * nt)  # inner AdamW steps on G (proxy fwd+bwd, teacher fwd)
            + b.val_batch_size * T * 6 * npx  # validation gradient
            + b.z_steps * b.batch_size * T * 12 * npx  # Hessian-vector products (double backward ≈ 2× fwd+bwd)
            + (1 + hb) * b.batch_size * T * 6 * npx  # c_i (one JVP / double-backward pass), also per hyper batch
            + (1 + hb) * b.batch_size * T * 6 * npx  # score model forward + backward, also per hyper batch
        )
        return float(b.outer_steps * per_outer + f.shard_size * T * 2 * npx)  # + scoring the shard


def score_sequences(scorer: SequenceScorer, pool: Any, ids: np.ndarray, batch_size: int, device: Any) -> np.ndarray:
    """The score model's scores of pool sequences ``ids`` in memory (for small samples), through the same forward
    (no grad, the device's autocast dtype) as ``score_pool`` uses for the sidecar they are compared with."""
    dev = torch.device(device) if device is not None else next(scorer.parameters()).device
    amp, was = resolve_amp_dtype(None, dev), scorer.training
    scorer.eval()
    out = [forward_scores(scorer, pool.batch(ids[i : i + batch_size]), None, dev, amp)
           for i in range(0, len(ids), batch_size)]
    scorer.train(was)
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def _aligned(cand: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``scores`` (keyed by ``ids``) in the order of ``cand``."""
    pos = {int(i): k for k, i in enumerate(ids)}
    return np.asarray([scores[pos[int(c)]] for c in cand], dtype=np.float64)
