"""``lmselect run RECIPE``: the multi-round data-selection pipeline (METHODS §1.3), resumable stage by stage.

    prepare pool (if needed)
    warm-up: target and proxy trained from scratch on a random fraction of shard 0
    for each method, seed and round r = 1..R (round r draws candidates from shard r):
        select      bliss: bilevel solve -> score shard r -> top fraction
                    mates: oracle probes from the target + its optimizer -> influence model -> Gumbel-top-k
                    random: a seeded random fraction
                    rho1 / blade: token-level, online -- the whole shard is fed, the loss keeps top tokens
        train       continue the target (weights + optimizer) for `round_steps` on the selected data
        evaluate    a decay branch (LR halved every `decay.halve_every` steps) -> validation losses (+ lm-eval)
    results.json / results.md / report.html

Every method gets the same warm-up, the same number of target steps per round (equal trained tokens) and the same
learning-rate schedule. Each stage writes an artifact directory whose manifest is written last; rerunning the same
command skips complete stages and resumes partial ones (training and the bilevel solve checkpoint themselves), so an
interrupted run ends with the same selections as an uninterrupted one.

Data parallel: ``torchrun --nproc_per_node N -m lmselect.cli run RECIPE``. The runner joins the process group once
(``train.distributed.init_distributed``; ``train()`` reuses it) and every rank walks the same stages in the same
order. Distributed-aware stages run on every rank and write their own artifacts from rank 0: training (DDP), the
BLISS solve (global-batch math, see ``select/bliss.py``) and scoring (one part per rank). Everything else — pool
preparation, selections, MATES / RHO-1 artifacts (single-process code), validation loss and lm-eval, eval / round /
run manifests, results — runs on rank 0 alone while the other ranks wait, then read what rank 0 wrote, so all ranks
continue from the same files. A failure on rank 0 in such a step is re-raised on every rank (no rank hangs).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np

from lmselect.artifacts import (
    LmselectError,
    Manifest,
    atomic_write_json,
    is_complete,
    parent_ref,
    read_json,
    read_manifest,
    write_manifest,
)
from lmselect.config import replace, save_config, to_dict
from lmselect.report import results_markdown
from lmselect.recipe import TOKEN_LEVEL, Recipe, load_recipe, recipe_summary

log = logging.getLogger("lmselect.pipeline")
T = TypeVar("T")
# Non-zero ranks wait for rank-0-only work (lm-eval on a large model takes hours) on a gloo group with this timeout;
# the default collective timeout (10 min for NCCL) would kill them. torchrun tears the peers down if a rank dies.
RANK0_WAIT = datetime.timedelta(hours=24)


# ------------------------------------------------------------------------------------------------------------------
# helpers


class Runner:
    """Runs one recipe into one run directory. Each ``stage_*`` method is idempotent.

    Under torchrun it joins the process group (``close()`` leaves it again if the runner created it)."""

    def __init__(self, recipe: Recipe, run_dir: str | Path):
        import torch.distributed as dist

        from lmselect.train.distributed import init_distributed

        self.r = recipe
        self.run_dir = Path(run_dir)
        self._owns_group = not (dist.is_available() and dist.is_initialized())
        self.dist = init_distributed(recipe.train.device)  # no-op without torchrun's env; this rank's device
        self._owns_group = self._owns_group and self.dist.enabled
        self.device = self.dist.device
        # a CPU (gloo) group for waiting on rank 0: long timeout, and no NCCL watchdog while the GPU ranks idle
        self._wait_group = dist.new_group(backend="gloo", timeout=RANK0_WAIT) if self.dist.enabled else None
        self.timings: dict[str, float] = {}
        self._pool = None
        self._valsets: dict[str, Any] = {}

    # ---- rank coordination ------------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def _main_only(self, fn: Callable[[], T]) -> T | None:
        """Run ``fn`` on rank 0 alone while the other ranks wait (they get None); a failure on rank 0 is raised on
        every rank instead of leaving them blocked. Single process: just ``fn()``."""
        if not self.dist.enabled:
            return fn()
        import torch.distributed as dist

        out: T | None = None
        err: BaseException | None = None
        if self.is_main:
            try:
                out = fn()
            except BaseException as e:  # noqa: BLE001 - re-raised below after telling the other ranks
                err = e
        box: list[Any] = [None if err is None else f"{type(err).__name__}: {err}"]
        dist.broadcast_object_list(box, src=0, group=self._wait_group)
        if err is not None:
            raise err
        if box[0] is not None:
            raise LmselectError(f"rank 0 failed: {box[0]}")
        return out

    def _main_first(self, fn: Callable[[], T]) -> T:
        """For an idempotent stage that is not distributed-aware (it writes an artifact and returns early when the
        artifact is complete): rank 0 computes and writes, then every other rank runs ``fn`` too and only reads."""
        out = self._main_only(fn)
        return out if self.is_main else fn()  # type: ignore[return-value]

    def _sync(self) -> None:
        """Barrier: every rank sees the artifacts written before it (on the long-timeout wait group)."""
        if self.dist.enabled:
            import torch.distributed as dist

            dist.barrier(group=self._wait_group)

    def close(self) -> None:
        """Leave the process group if this runner joined it (clean torchrun shutdown)."""
        if self._owns_group:
            from lmselect.train.distributed import cleanup

            cleanup()
            self._owns_group = False

    # ---- shared inputs ----------------------------------------------------------------------------------------
    @property
    def pool(self) -> Any:
        from lmselect.data.pool import TokenPool

        if self._pool is None:
            self._pool = TokenPool(self.pool_dir)
        return self._pool

    @property
    def pool_dir(self) -> Path:
        return Path(self.r.pool.path) if self.r.pool.path else self.run_dir / "pool"

    def valset(self, which: str) -> Any:
        from lmselect.data.valset import load_validation

        if which not in self._valsets:
            path = getattr(self.r.validation, which)
            if path is None:
                return None
            kind = "lambada" if which == "lambada" else "text"
            self._valsets[which] = load_validation(
                path, self.pool.load_tokenizer(), kind=kind, seq_len=self.r.validation.seq_len,
                max_items=self.r.validation.max_items,
            )
        return self._valsets[which]

    @property
    def select_valset(self) -> Any:
        return self.valset(self.r.validation.select_on)

    def train_cfg(
        self, steps: int, lr_scale: float = 1.0, seed_offset: int = 0, preset: str | None = None, warmup: bool = False
    ) -> Any:
        """The recipe's training config for one stage. Only the warm-up stage warms the LR up; rounds continue the
        target's weights *and* AdamW moments with the schedule's steady LR (× 0.5^r with ``lr_per_round: halving``)."""
        changes: dict[str, Any] = {
            "preset": preset or self.r.target.preset, "steps": int(steps), "seed": self.r.seed + seed_offset,
            "optim.lr": self.r.train.optim.lr * lr_scale, "continue_optimizer": not warmup,
        }
        if not warmup:
            changes.update({"optim.warmup_steps": 0, "optim.schedule": "constant"})
        return replace(self.r.train, **changes)

    def lr_scale(self, rnd: int) -> float:
        return 0.5**rnd if self.r.lr_per_round == "halving" else 1.0

    # ---- stages -----------------------------------------------------------------------------------------------
    def stage_pool(self) -> None:
        self._main_first(self._stage_pool)

    def _stage_pool(self) -> None:
        if self.r.pool.path is not None:
            read_manifest(self.pool_dir, kind="pool")
            return
        if is_complete(self.pool_dir, kind="pool"):
            return
        from lmselect.data.prepare import prepare

        t0 = time.perf_counter()
        log.info("preparing pool -> %s", self.pool_dir)
        prepare(self.r.pool.prepare, self.pool_dir)
        self.timings["prepare"] = time.perf_counter() - t0

    def check_tokenizers(self) -> None:
        """Proxy, target and pool must share one tokenizer (KL distillation and selection transfer need it)."""
        from lmselect.data.tokenizer import check_same_tokenizer

        for key in ("target", "proxy"):
            init = getattr(self.r, key).init_from
            if init:
                check_same_tokenizer(init, self.pool.tokenizer_dir, f"{key}.init_from", "pool")

    def warmup_ids(self) -> np.ndarray:
        from lmselect.select.topk import random_fraction

        return random_fraction(self.pool.ids(0), self.r.warmup.fraction, seed=self.r.seed)

    def stage_warmup(self, which: str) -> Path:
        from lmselect.train.loop import train

        out = self.run_dir / "warmup" / which
        if is_complete(out, kind="checkpoint"):
            return out
        sec = getattr(self.r, which)
        cfg = self.train_cfg(self.r.warmup.steps, preset=sec.preset, seed_offset=0 if which == "target" else 1, warmup=True)
        t0 = time.perf_counter()
        log.info("warm-up %s (%s) for %d steps", which, sec.preset, cfg.steps)
        train(cfg, self.pool, self.warmup_ids(), out, init_from=sec.init_from)
        self.timings[f"warmup_{which}"] = time.perf_counter() - t0
        return out

    def round_dir(self, method: str, seed: int, rnd: int) -> Path:
        return self.run_dir / method / f"seed{seed}" / f"round{rnd}"

    def prev_target(self, method: str, seed: int, rnd: int) -> Path:
        return self.run_dir / "warmup" / "target" if rnd == 1 else self.round_dir(method, seed, rnd - 1) / "target"

    def stage_select(self, method: str, seed: int, rnd: int) -> tuple[np.ndarray, float]:
        """Selected sequence ids of shard ``rnd`` and the seconds the selection took (0 when reused)."""
        from lmselect.select.cli import write_selection

        rdir = self.round_dir(method, seed, rnd)
        sel_dir = rdir / "selection"
        cand = self.pool.ids(rnd)
        if is_complete(sel_dir, kind="selection"):
            return np.load(sel_dir / "selected.npy"), 0.0
        t0 = time.perf_counter()
        # random / token-level selections are seed-determined and cheap: every rank computes them; BLISS is a
        # collective; MATES is single-process code (rank 0 first, see _select_mates)
        parents = [parent_ref(self.prev_target(method, seed, rnd))]
        sel_seed = self.r.seed * 1000 + seed * 100 + rnd  # distinct per (run seed, method seed, round)
        scores = None
        if method == "random":
            from lmselect.select.topk import random_fraction

            selected = random_fraction(cand, self.r.select_fraction, seed=sel_seed)
        elif method in TOKEN_LEVEL:
            selected = cand  # token-level methods see the whole shard; the loss mask does the selecting
        elif method == "bliss":
            selected, scores, more = self._select_bliss(seed, rnd, cand)
            parents += more
        elif method == "mates":
            selected, scores, more = self._main_first(lambda: self._select_mates(seed, rnd, cand, sel_seed))
            parents += more
        else:  # pragma: no cover - validated at load time
            raise LmselectError(f"unknown method {method}")
        seconds = time.perf_counter() - t0
        frac = 1.0 if method in TOKEN_LEVEL else self.r.select_fraction
        self._main_only(lambda: write_selection(
            sel_dir, self.pool, cand, scores, selected, method=method, fraction=frac,
            extra={"round": rnd, "seed": seed, "selection_seconds": seconds}, parents=parents,
        ))
        if not self.is_main:  # train on exactly the artifact rank 0 wrote
            selected = np.load(sel_dir / "selected.npy")
        return selected, seconds

    def _select_bliss(self, seed: int, rnd: int, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray, list]:
        from lmselect.score import read_scores, score_pool
        from lmselect.select.bliss import init_score_model, solve_round
        from lmselect.models.scorer import SequenceScorer
        from lmselect.select.topk import top_fraction
        from lmselect.train.checkpoint import load_checkpoint_model

        rdir = self.round_dir("bliss", seed, rnd)
        proxy_dir = self.stage_warmup("proxy")
        # (a) proxy reset to the warm-up proxy every round; score model inherited from round r-1 (round 1: the
        #     warm-up proxy's backbone + a fresh head); KL teacher = the target at the end of round r-1.
        proxy = load_checkpoint_model(proxy_dir, device=self.device)
        target = load_checkpoint_model(self.prev_target("bliss", seed, rnd), device=self.device)
        if rnd == 1:
            scorer = init_score_model(proxy, seed=self.r.seed + seed)
        else:
            scorer = SequenceScorer.load(self.round_dir("bliss", seed, rnd - 1) / "bilevel" / "score_model", device=self.device)
        bcfg = replace(self.r.bliss, seed=self.r.seed * 1000 + seed * 100 + rnd)
        scorer = solve_round(bcfg, proxy, target, scorer, cand, self.pool, self.select_valset, rdir / "bilevel", device=self.device)
        del proxy, target
        # (b) score every sequence of the shard, (c) keep the top fraction deterministically
        # under torchrun each rank scores its own part (rank r of W); the last part to finish writes the manifest,
        # so wait for every rank before reading
        score_pool(scorer, self.pool, cand, rdir / "scores", batch_size=self.r.score_batch_size, device=self.device,
                   progress=self.is_main)
        self._sync()
        ids, scores = read_scores(rdir / "scores")
        selected = top_fraction(ids, scores, self.r.select_fraction)
        return selected, scores, [parent_ref(rdir / "bilevel"), parent_ref(rdir / "scores")]

    def _select_mates(self, seed: int, rnd: int, cand: np.ndarray, sel_seed: int) -> tuple[np.ndarray, np.ndarray, list]:
        from lmselect.score import write_scores
        from lmselect.select.mates import probe_candidates, run_mates_round
        from lmselect.select.topk import random_fraction
        from lmselect.train.checkpoint import load_checkpoint_model, load_training_state

        rdir = self.round_dir("mates", seed, rnd)
        prev = self.prev_target("mates", seed, rnd)
        # Oracle probes start from the current target *with its optimizer state* (METHODS §2 step 1), and a probe
        # step is the first step stage_train takes in this round: its config (lr × lr_scale(rnd), clipping, AdamW).
        model = load_checkpoint_model(prev, device=self.device)
        optimizer_state = load_training_state(prev)["optimizer"]
        round_cfg = self.train_cfg(self.r.round_steps, self.lr_scale(rnd), seed_offset=100 * seed + rnd)
        mcfg = replace(self.r.mates, seed=sel_seed, fraction=self.r.select_fraction)
        # Probe sequences: a seeded sample of held-out shard-0 sequences (default) or of the round's own candidate
        # shard; the influence model then predicts every candidate.
        source = probe_candidates(self.pool, self.warmup_ids()) if mcfg.probe_from == "holdout" else cand
        probe = random_fraction(source, min(1.0, mcfg.n_probe / max(1, len(source))), seed=sel_seed + 7)
        selected = run_mates_round(mcfg, model, optimizer_state, self.pool, probe, cand, self.select_valset,
                                   rdir / "influence", device=self.device, train_cfg=round_cfg)
        del model, optimizer_state
        import pyarrow.parquet as pq

        preds = pq.read_table(rdir / "influence" / "predictions.parquet").to_pydict()
        if not is_complete(rdir / "scores", kind="scores"):
            # MATES keeps the *lowest* predicted post-step loss; the sidecar stores the negated prediction so that
            # "higher score = preferred" holds for every method's scores.
            write_scores(rdir / "scores", np.asarray(preds["seq_id"]), -np.asarray(preds["pred"], dtype=np.float64),
                         parents=[parent_ref(rdir / "influence")], extra={"score": "-predicted_val_loss"})
        return selected, -np.asarray(preds["pred"], dtype=np.float64), [parent_ref(rdir / "influence")]

    def token_selector(self, method: str, seed: int, rnd: int) -> Any:
        if method == "rho1":
            from lmselect.select.rho1 import Rho1Selector, train_reference
            from lmselect.train.checkpoint import load_checkpoint_model

            # The reference starts where the target started (the warm-up checkpoint) and is trained once per
            # method seed on the high-quality set; it stays frozen.
            ref_dir = self.run_dir / "rho1" / f"seed{seed}" / "reference"
            init = load_checkpoint_model(self.run_dir / "warmup" / "target", device=self.device)
            # single-process code: rank 0 trains and saves it, the other ranks then load the saved reference
            ref = self._main_first(lambda: train_reference(
                replace(self.r.rho1, seed=self.r.seed + seed), init, self.select_valset, self.pool.load_tokenizer(), ref_dir,
                device=self.device,
            ))
            return Rho1Selector(ref, self.r.rho1.keep_fraction)
        if method == "blade":
            from lmselect.select.blade import BladeSelector

            return BladeSelector(replace(self.r.blade, seed=self.r.seed + seed), self.select_valset)
        return None

    def stage_train(self, method: str, seed: int, rnd: int, selected: np.ndarray) -> Path:
        from lmselect.train.loop import train

        out = self.round_dir(method, seed, rnd) / "target"
        if is_complete(out, kind="checkpoint"):
            return out
        cfg = self.train_cfg(self.r.round_steps, self.lr_scale(rnd), seed_offset=100 * seed + rnd)
        log.info("[%s seed%d round%d] training target %d steps on %d sequences", method, seed, rnd, cfg.steps, len(selected))
        train(
            cfg, self.pool, selected, out, init_from=self.prev_target(method, seed, rnd),
            token_selector=self.token_selector(method, seed, rnd),
        )
        return out

    def stage_eval(self, method: str, seed: int, rnd: int, selected: np.ndarray) -> dict[str, Any]:
        from lmselect.train.loop import train

        rdir = self.round_dir(method, seed, rnd)
        edir = rdir / "eval"
        if is_complete(edir, kind="eval"):
            return read_json(edir / "results.json")
        # Decay branch: continue from the round's checkpoint with the LR halved every `halve_every` steps; the main
        # run continues from the undecayed checkpoint, so this branch never feeds back into training.
        bdir = rdir / "decay_branch"
        if self.r.decay.steps > 0:
            cfg = self.train_cfg(self.r.decay.steps, self.lr_scale(rnd), seed_offset=100 * seed + rnd + 50)
            cfg = replace(cfg, **{"optim.schedule": "wsd", "optim.decay_steps": self.r.decay.steps,
                                  "optim.decay_halving_every": self.r.decay.halve_every})
            train(cfg, self.pool, selected, bdir, init_from=rdir / "target")
            model_dir = bdir
        else:
            model_dir = rdir / "target"
        # the decay branch above is training (every rank); the evaluation itself runs on rank 0 and the other
        # ranks read its results.json
        return self._main_first(lambda: self._evaluate(method, seed, rnd, model_dir))

    def _evaluate(self, method: str, seed: int, rnd: int, model_dir: Path) -> dict[str, Any]:
        """Validation losses (+ lm-eval) of ``model_dir`` -> ``eval/`` (results.json, manifest kind=eval)."""
        from lmselect.data.valset import validation_loss
        from lmselect.train.checkpoint import load_checkpoint_model

        edir = self.round_dir(method, seed, rnd) / "eval"
        if is_complete(edir, kind="eval"):
            return read_json(edir / "results.json")
        model = load_checkpoint_model(model_dir, device=self.device)
        t0 = time.perf_counter()
        res: dict[str, Any] = {"method": method, "seed": seed, "round": rnd}
        # Cumulative target tokens (warm-up + rounds 1..r): the x-axis of every "metric vs tokens" comparison.
        chain = [self.run_dir / "warmup" / "target"] + [self.round_dir(method, seed, k) / "target" for k in range(1, rnd + 1)]
        res["tokens"] = int(sum(read_manifest(d)["extra"].get("tokens_seen", 0) for d in chain))
        res["val_loss"] = {
            k: validation_loss(model, self.valset(k), self.r.validation.batch_size, self.device)
            for k in ("lambada", "clean") if self.valset(k) is not None
        }
        res["downstream"] = None
        if self.r.eval.downstream:
            from lmselect.eval import evaluate_model

            res["downstream"] = evaluate_model(
                model, self.pool.load_tokenizer(), tasks=self.r.eval.tasks, task_data=self.r.eval.task_data,
                limit=self.r.eval.limit, batch_size=self.r.eval.batch_size, device=str(self.device), seed=self.r.seed,
            )
        res["eval_seconds"] = time.perf_counter() - t0
        edir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(edir / "results.json", res)
        write_manifest(edir, Manifest(kind="eval", config=to_dict(self.r.eval), seed=self.r.seed,
                                      parents=[parent_ref(model_dir)], counts={"tokens": res["tokens"]},
                                      timings={"eval": res["eval_seconds"]}))
        return res

    def run_round(self, method: str, seed: int, rnd: int) -> dict[str, Any]:
        rdir = self.round_dir(method, seed, rnd)
        if is_complete(rdir, kind="round"):
            return read_json(rdir / "eval" / "results.json")
        selected, sel_seconds = self.stage_select(method, seed, rnd)
        self.stage_train(method, seed, rnd, selected)
        res = self.stage_eval(method, seed, rnd, selected)
        summary = read_json(rdir / "selection" / "summary.json")
        self._main_only(lambda: write_manifest(rdir, Manifest(
            kind="round", config=recipe_summary(self.r), seed=seed,
            parents=[parent_ref(rdir / s) for s in ("selection", "target", "eval")],
            counts={"selected": int(len(selected)), "tokens": res.get("tokens", 0)},
            timings={"selection": float(summary.get("selection_seconds", sel_seconds))},
        )))
        return res

    def run(self) -> dict[str, Any]:
        t0 = time.perf_counter()

        def start() -> None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.r, self.run_dir / "config.yaml")

        self._main_only(start)
        self.stage_pool()
        self.check_tokenizers()
        if self.pool.n_shards < self.r.rounds + 1:
            raise LmselectError(f"{self.pool_dir}: pool has {self.pool.n_shards} shards; {self.r.rounds} rounds need {self.r.rounds + 1}")
        self.stage_warmup("target")
        if "bliss" in self.r.methods:
            self.stage_warmup("proxy")
        for method in self.r.methods:
            for seed in self.r.seeds:
                for rnd in range(1, self.r.rounds + 1):
                    self.run_round(method, seed, rnd)
        from lmselect.report import collect, results, write_results

        def finish() -> None:
            write_manifest(self.run_dir, Manifest(
                kind="run", config=to_dict(self.r), seed=self.r.seed,
                parents=[parent_ref(self.pool_dir)] + [parent_ref(self.run_dir / "warmup" / "target")],
                extra={"methods": self.r.methods, "seeds": self.r.seeds, "rounds": self.r.rounds,
                       "world_size": self.dist.world_size},
                timings={"total": time.perf_counter() - t0},
            ))
            write_results(self.run_dir)

        self._main_only(finish)
        return results(collect(self.run_dir))  # read-only: every rank returns the same numbers


# ------------------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML (or 'demo' for the embedded demo recipe)")
    p.add_argument("--out", help="run directory (default: the recipe's `out`, else runs/<name>)")
    p.add_argument("--no-report", action="store_true", help="skip writing report.html at the end")
    p.epilog = "Override any recipe key with --key.sub=value, e.g. --rounds=3 --bliss.outer_steps=50."


def run_recipe(recipe: Recipe, out: str | Path | None = None, report: bool = True) -> tuple[Path, dict[str, Any]]:
    run_dir = Path(out or recipe.out or Path("runs") / recipe.name)
    runner = Runner(recipe, run_dir)
    try:
        res = runner.run()
        if report:
            from lmselect.report import write_report

            path = runner._main_only(lambda: write_report(run_dir))
            if runner.is_main:
                log.info("report: %s", path)
    finally:
        runner.close()
    return run_dir, res


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    # the runner leaves the process group at the end, so read the rank from torchrun's environment
    from lmselect.score import dist_rank_world

    run_dir, results = run_recipe(recipe, args.out, report=not args.no_report)
    if dist_rank_world()[0] == 0:
        print(results_markdown(results))
        print(f"run directory: {run_dir}")
    return 0
