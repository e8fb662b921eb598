"""Reference excess loss: keep the sequences a reference trained on the selection set likes better than the model
it started from (a sequence-level RHO-1 excess loss; Moore & Lewis 2010's cross-entropy difference).

Objective. θ_0 is the run's warm-up target; θ_ref is a copy of it trained briefly on the selection set (RHO-1's
reference, :func:`lmselect.select.rho1.train_reference`, METHODS §3; ``reference.files`` replaces the text, never a
report set). Each candidate x of the round gets, with CE the mean next-token cross-entropy of its row,

    excess:  s(x) = CE(x; θ_0) − CE(x; θ_ref)      RHO-1's excess loss L_Δ = L_θ − L_RM, per sequence; Moore & Lewis
                                                  (2010) H_N(s) − H_I(s) with N = general, I = in-domain
    loss:    s(x) = −CE(x; θ_ref)

and the top ``select_fraction`` by s is kept (ties by sequence id). Higher = preferred.

θ_0 is the warm-up target in every round (not the round's current target): the score is the reference's gain from
the selection set, fixed for the run, so a round's scores depend only on its shard. The reference is trained once
per method seed (``RUN/reference/seed<k>/reference``) with the seed of RHO-1's reference stream, so ``rho1`` and
``reference`` with the same training settings train the same reference. This is the known-answer check's reference
scorer (``lmselect check RECIPE --method reference``): what a plain "score by a reference LM trained on the
target" picks, beside the methods that learn a scorer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from lmselect.artifacts import is_complete, parent_ref
from lmselect.config import replace
from lmselect.context import STREAM_REFERENCE, FlopContext, RoundContext
from lmselect.errors import ConfigError
from lmselect.select.base import Selection, SelectionMethod, register
from lmselect.select.topk import top_fraction

SCORES = {"excess": "ce_general - ce_reference", "loss": "-ce_reference"}


@dataclass
class ReferenceConfig:
    score: Literal["excess", "loss"] = "excess"
    # reference training (as rho1's): AdamW on the selection set's text, starting from the warm-up target
    steps: int = 200
    lr: float = 1e-4
    batch_size: int = 8
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    files: list[str] = field(default_factory=list)  # reference corpus (.jsonl/.txt); empty = the selection set's text; never a report set
    seq_len: int = 256  # packing length for text read from ``files``
    seed: int = 0  # standalone use only: the runner derives the seed (reference stream of the method seed)


@register
class Reference(SelectionMethod):
    """Sequence-level excess loss against a reference trained on the selection set (see the module docstring)."""

    name = "reference"
    description = "sequence-level excess loss: warm-up target CE minus the CE of a reference trained on the selection set"
    config_cls = ReferenceConfig
    needs = frozenset({"selection_set"})
    stages = ("scores", "selection", "target", "eval")
    seed_stages = ("reference",)
    collective = False  # single-process code: rank 0 trains, scores and writes first, the other ranks then read
    color = "#8c564b"

    def check_config(self) -> None:
        super().check_config()
        if self.cfg.score not in SCORES:
            raise ConfigError(f"recipe key 'reference.score': must be excess or loss, got {self.cfg.score!r}")

    def data_files(self) -> list[str]:
        return list(self.cfg.files)

    def select(self, ctx: RoundContext) -> Selection:
        # torch: discovery imports every method module; keep this one light
        from lmselect.models.losses import mean_token_ce
        from lmselect.score import read_scores, write_scores
        from lmselect.select.rho1 import train_reference
        from lmselect.train.checkpoint import load_checkpoint_model

        sdir, ref_dir, general_dir = ctx.stage_dir("scores"), ctx.seed_dir / "reference", ctx.run.layout.warmup("target")
        if not is_complete(sdir, kind="scores"):
            general = load_checkpoint_model(general_dir, device=ctx.device)
            cfg = replace(self.cfg, seed=ctx.derived_seed(STREAM_REFERENCE, per_round=False))
            ref = train_reference(cfg, general, ctx.selection_set, ctx.pool.load_tokenizer(), ref_dir,
                                  device=ctx.device, method=self.name)
            bs = ctx.recipe.score_batch_size
            ce_ref = mean_token_ce(ref, ctx.pool, ctx.candidates, bs, ctx.device)
            if self.cfg.score == "excess":
                score = mean_token_ce(general, ctx.pool, ctx.candidates, bs, ctx.device) - ce_ref
            else:
                score = -ce_ref
            write_scores(sdir, ctx.candidates, score, parents=[parent_ref(general_dir), parent_ref(ref_dir)],
                         extra={"score": SCORES[self.cfg.score], "pool": str(ctx.pool.path)})
        ids, scores = read_scores(sdir)  # sorted by seq id, like ctx.candidates; float32 as stored
        scores = np.asarray(scores, dtype=np.float64)
        return Selection(top_fraction(ids, scores, ctx.fraction), scores=scores,
                         parents=[parent_ref(sdir), parent_ref(ref_dir)], extra={"score": SCORES[self.cfg.score]})

    def selection_flops(self, f: FlopContext) -> float:
        nt, c = f.params(f.recipe.target.preset), self.cfg
        forwards = 2 if c.score == "excess" else 1  # warm-up target and reference, or the reference alone
        # a forward of each scoring model per candidate token, plus the reference's training (amortised over rounds)
        return float(forwards * f.shard_size * f.seq_len * 2 * nt + c.steps * c.batch_size * f.seq_len * 6 * nt / f.recipe.rounds)
