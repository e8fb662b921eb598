"""Perplexity filtering with the warm-up proxy (Ankner et al. 2024, "Perplexed by Perplexity: Perplexity-Based Data
Pruning With Small Reference Models", arXiv 2405.20541).

Objective: keep the ``select_fraction`` of candidates whose mean next-token cross-entropy under a small reference LM
lies in a chosen band of the candidate distribution::

    ℓ(x) = (1 / (L−1)) Σ_t CE(x_{t+1} | x_{≤t}; θ_proxy)          (METHODS "perplexity filter")
    low:    keep the k smallest ℓ        (classic "keep fluent text" filtering)
    middle: keep the k with ℓ closest to the median of the candidates' ℓ
    high:   keep the k largest ℓ         (Ankner et al. find high/medium bands best on some corpora)

The reference is the run's warm-up **proxy**, trained from scratch on the warm-up fraction of shard 0: nothing
external, nothing seen from the selection or report sets. It is a cheap, widely used baseline: one forward pass of
the proxy per candidate per round. The scores sidecar keeps −ℓ (higher = more likely under the proxy); the
selection's scores are oriented so that higher = preferred by the chosen band (−ℓ, −|ℓ − median| or ℓ), so the
deterministic top fraction (ties by sequence id) is the band.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from lmselect.artifacts import parent_ref
from lmselect.context import FlopContext, RoundContext
from lmselect.errors import ConfigError
from lmselect.select.base import Selection, SelectionMethod, register
from lmselect.select.topk import top_fraction


@dataclass
class PerplexityConfig:
    band: Literal["low", "middle", "high"] = "low"
    batch_size: int = 64  # scoring batch (sequences)


def band_scores(loss: np.ndarray, band: str) -> np.ndarray:
    """Scores whose top fraction is the requested band of ``loss`` (higher = preferred)."""
    loss = np.asarray(loss, dtype=np.float64)
    if band == "low":
        return -loss
    if band == "high":
        return loss
    if band == "middle":
        return -np.abs(loss - np.median(loss))
    raise ConfigError(f"recipe key 'perplexity.band': must be low, middle or high, got {band!r}")


@register
class Perplexity(SelectionMethod):
    name = "perplexity"
    description = "perplexity filter: keep the candidates whose warm-up-proxy loss lies in a band (low/middle/high)"
    config_cls = PerplexityConfig
    needs = frozenset({"proxy"})
    stages = ("scores", "selection", "target", "eval")
    collective = True  # scoring is rank-sharded; every rank then reads the same sidecar
    color = "#9467bd"

    def check_config(self) -> None:
        super().check_config()
        band_scores(np.zeros(1), self.cfg.band)  # an unknown band names perplexity.band

    def select(self, ctx: RoundContext) -> Selection:
        from lmselect.score import read_scores, score_pool  # torch: discovery imports every method; keep this light

        sdir = ctx.stage_dir("scores")
        proxy = ctx.run.layout.warmup("proxy")
        score_pool(proxy, ctx.pool, ctx.candidates, sdir, batch_size=self.cfg.batch_size, device=ctx.device,
                   lm_loss=True, progress=ctx.run.is_main)
        ctx.run.sync()
        ids, neg_loss = read_scores(sdir)  # sorted by seq id, like ctx.candidates
        scores = band_scores(-neg_loss, self.cfg.band)
        return Selection(top_fraction(ids, scores, ctx.fraction), scores=scores,
                         parents=[parent_ref(proxy), parent_ref(sdir)],
                         extra={"score": f"perplexity band '{self.cfg.band}'", "proxy_loss_median": float(np.median(-neg_loss))})

    def selection_flops(self, f: FlopContext) -> float:
        return float(f.shard_size * f.seq_len * 2 * f.params(f.recipe.proxy.preset))
