"""``lmselect run RECIPE``: the multi-round data-selection pipeline (METHODS §1.3), resumable stage by stage.

    prepare pool (if needed)
    warm-up: target (and, when a method needs one, the proxy) trained from scratch on a random fraction of shard 0
    for each method, seed and round r = 1..R (round r draws candidates from shard r):
        select      sequence-level methods: method.select(ctx) -> the ids to train on (+ scores)
                    token-level methods: the whole shard; method.token_selector(ctx) masks the loss
        train       continue the target (weights + optimizer) for `round_steps` on the selection
        evaluate    a decay branch (LR halved every `decay.halve_every` steps, the method's own token selector)
                    -> report-set losses (+ lm-eval); the exposure ledger of the round
    results.json / results.md / report.html

The runner is generic: it reads the selection-method registry (``lmselect.select.base``) and never branches on a
method's name. Every method gets the same warm-up, the same number of target steps per round (equal fed tokens), the
same learning-rate schedule and, for seed k, the same data-order seeds (``context.derived_seed``), so comparisons are
paired by seed.

Stages and reuse. Each stage writes an artifact directory whose manifest is written last; before any compute the
runner checks every stage already on disk against what the current recipe would produce (``RUN/stages.json``
records the recipe slice each stage was made from; parents' uuids are checked too). A stage made by another
configuration stops the run with a message naming the stage and the changed keys, unless ``--recompute`` is given,
which deletes that stage and everything downstream of it. Matching stages are reused; partial ones resume (training
and the bilevel solve checkpoint themselves), so an interrupted run ends with the same selections as an
uninterrupted one. The run directory is locked for the duration (``lmselect.runlock``).

Data parallel: ``torchrun --nproc_per_node N -m lmselect.cli run RECIPE``. Every rank walks the same stages in the
same order. Training (DDP), collective methods (``SelectionMethod.collective``) and scoring run on every rank and write
from rank 0; single-process work (non-collective methods, validation losses, lm-eval, manifests, results) runs on
rank 0 while the other ranks wait, then read what rank 0 wrote (``RunContext.main_only`` / ``main_first``).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from lmselect.artifacts import (
    Manifest,
    atomic_write_json,
    is_complete,
    parent_ref,
    read_json,
    read_manifest,
    save_config,
    write_manifest,
)
from lmselect.config import replace, to_dict
from lmselect.context import (
    STREAM_DECAY,
    STREAM_DIAGNOSTICS,
    STREAM_SELECT,
    STREAM_TRAIN,
    STREAM_WARMUP_PROXY,
    STREAM_WARMUP_TARGET,
    FlopContext,
    RoundContext,
    RunContext,
    derived_seed,
)
from lmselect.data.prepare import prepare
from lmselect.data.tokenizer import check_same_tokenizer
from lmselect.data.valset import bits_per_byte, validation_loss
from lmselect.errors import LmselectError, StaleStageError
from lmselect.eval import evaluate_model
from lmselect.layout import EVAL_RESULTS_FILE, SELECTED_FILE, SUMMARY_FILE, RunPath
from lmselect.log import read_jsonl
from lmselect.models.losses import mean_token_ce
from lmselect.recipe import load_recipe, recipe_summary
from lmselect.report.html import write_report
from lmselect.report.results import collect, results_markdown, write_results
from lmselect.report.results import results as run_results
from lmselect.runlock import run_lock
from lmselect.select import selection as selection_format  # write_selection looked up per call: tests replace it
from lmselect.select.base import SelectionMethod, get_method
from lmselect.select.diagnostics import diagnostics_verdict
from lmselect.select.diagnostics import selection_diagnostics as scorer_diagnostics
from lmselect.stages import downstream, find_stale, forget_specs, record_spec, stage_specs
from lmselect.train.checkpoint import load_checkpoint_model
from lmselect.train.distributed import rank_world
from lmselect.train.loop import train

log = logging.getLogger("lmselect.pipeline")
# Candidates whose proxy loss the selection diagnostics correlate with a scorer's ranking: a seeded sample, since
# Spearman's rho over 1,024 pairs has a standard error of about 1/sqrt(1024) = 0.03, and a forward pass over a whole
# shard costs more than the rest of the diagnostics together (8 s of the demo's 2-core CPU time per round).
PROXY_LOSS_SAMPLE = 1024


# ------------------------------------------------------------------------------------------------------------------
# the runner


class Runner:
    """Runs one recipe into one run directory. Each ``stage_*`` method is idempotent."""

    def __init__(self, recipe: Any, run_dir: str | Path, *, recompute: bool = False):
        self.r = recipe
        self.ctx = RunContext(recipe, run_dir)
        self.layout = self.ctx.layout
        self.run_dir = self.layout.root
        self.methods: dict[str, SelectionMethod] = {m: get_method(m, getattr(recipe, m, None)) for m in recipe.methods}
        self.recompute = recompute
        self.timings: dict[str, float] = {}
        self._specs = stage_specs(recipe)
        self._ref_loss: dict[int, tuple[str, np.ndarray]] = {}

    # ---- shared ------------------------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    @property
    def pool(self) -> Any:
        return self.ctx.pool

    @property
    def needs_proxy(self) -> bool:
        return any("proxy" in m.needs for m in self.methods.values())

    def close(self) -> None:
        self.ctx.close()

    # ---- stale stages ------------------------------------------------------------------------------------------
    def check_stages(self) -> None:
        """Before any compute: refuse (or, with ``recompute``, delete) stages made by another configuration."""
        stale = find_stale(self.run_dir, self.r)
        if not stale:
            return
        rel, why = stale[0]
        if not self.recompute:
            more = f" (and {len(stale) - 1} more stage(s))" if len(stale) > 1 else ""
            raise StaleStageError(
                f"{self.run_dir / rel}: made with a different configuration{more}: {'; '.join(why[:4])}"
                f"{' ...' if len(why) > 4 else ''}. Use a new --out for a fresh run, or rerun with --recompute to "
                "redo the changed stages and everything after them"
            )
        planned = list(self._specs)
        doomed: list[str] = []
        for rel, _ in stale:
            doomed += [p for p in downstream(rel, planned) if p not in doomed]
        for rel in doomed:
            d = self.run_dir / rel
            if d.exists():
                log.warning("recompute: removing %s", d)
                shutil.rmtree(d)
            if "/round" in rel:  # the round is no longer complete
                (d.parent / "manifest.json").unlink(missing_ok=True)
                if rel.endswith("/eval"):
                    shutil.rmtree(d.parent / "decay_branch", ignore_errors=True)
        (self.run_dir / "manifest.json").unlink(missing_ok=True)
        self._forget(doomed)

    def _forget(self, rels: list[str]) -> None:
        forget_specs(self.run_dir, rels)

    def _record(self, rel: str) -> None:
        """Record the recipe slice a stage is being made from (before computing it)."""
        self.ctx.main_only(lambda: record_spec(self.run_dir, rel, self._specs[rel]))

    # ---- stages ------------------------------------------------------------------------------------------------
    def stage_pool(self) -> None:
        def make() -> None:
            if self.r.pool.path is not None:
                read_manifest(self.layout.pool, kind="pool")
                return
            if is_complete(self.layout.pool, kind="pool"):
                return

            self._record(self.layout.key(RunPath(pool=True)))
            t0 = time.perf_counter()
            log.info("preparing pool -> %s", self.layout.pool)
            prepare(self.r.pool.prepare, self.layout.pool)
            self.timings["prepare"] = time.perf_counter() - t0

        self.ctx.main_first(make)

    def check_tokenizers(self) -> None:
        """Proxy, target and pool must share one tokenizer (KL distillation and selection transfer need it)."""
        for key in ("target", "proxy"):
            init = getattr(self.r, key).init_from
            if init:
                check_same_tokenizer(init, self.pool.tokenizer_dir, f"{key}.init_from", "pool")

    def warmup_ids(self) -> np.ndarray:
        return self.ctx.warmup_ids()

    def stage_warmup(self, which: str) -> Path:
        out = self.layout.warmup(which)
        if is_complete(out, kind="checkpoint"):
            return out
        self._record(self.layout.key(RunPath(warmup=which)))
        sec = getattr(self.r, which)
        stream = STREAM_WARMUP_TARGET if which == "target" else STREAM_WARMUP_PROXY
        cfg = self.ctx.train_cfg(self.r.warmup.steps, preset=sec.preset, warmup=True, stream=stream)
        t0 = time.perf_counter()
        log.info("warm-up %s (%s) for %d steps", which, sec.preset, cfg.steps)
        train(cfg, self.pool, self.warmup_ids(), out, init_from=sec.init_from)
        self.timings[f"warmup_{which}"] = time.perf_counter() - t0
        return out

    def round_ctx(self, method: str, seed: int, rnd: int) -> RoundContext:
        return RoundContext(self.ctx, method, seed, rnd, self.pool.ids(rnd))

    def stage_select(self, m: SelectionMethod, rc: RoundContext) -> tuple[np.ndarray, float]:
        """Selected sequence ids of the round's shard and the seconds the selection took (0 when reused)."""
        sel_dir = rc.stage_dir("selection")
        if is_complete(sel_dir, kind="selection"):
            return np.load(sel_dir / SELECTED_FILE), 0.0
        for st in m.seed_stages:
            self._record(self.layout.key(RunPath(m.name, rc.seed, stage=st)))
        for st in m.stages:
            if st in ("selection", "target", "eval") or not is_complete(rc.stage_dir(st)):
                self._record(self._rel(rc, st))
        t0 = time.perf_counter()
        parents = [parent_ref(rc.prev_target)]
        if m.level == "token":
            # token-level methods see the whole shard; the loss mask does the selecting
            sel, frac, extra = rc.candidates, 1.0, {}
            scores, method_diag = None, {}
        else:
            out = m.select(rc) if m.collective else self.ctx.main_first(lambda: m.select(rc))
            if out.scores is not None and len(out.scores) != len(rc.candidates):
                raise LmselectError(f"{m.name}: select() returned {len(out.scores)} scores for {len(rc.candidates)} candidates")
            sel, frac, extra, scores, method_diag = out.ids, rc.fraction, dict(out.extra), out.scores, out.diagnostics
            parents += out.parents
        seconds = time.perf_counter() - t0

        def write() -> None:
            diag = self.selection_diagnostics(rc, scores, sel) if scores is not None else None
            if diag is not None:
                extra["diagnostics_verdict"] = diag["verdict"]
                diag.update(method_diag)
            selection_format.write_selection(
                sel_dir, self.pool, rc.candidates, scores, sel, method=m.name, fraction=frac,
                extra={**extra, "round": rc.round, "seed": rc.seed, "selection_seconds": seconds, "level": m.level},
                parents=parents,
                extra_files=(lambda tmp: atomic_write_json(tmp / "diagnostics.json", diag)) if diag else None,
            )

        self.ctx.main_only(write)
        return np.load(sel_dir / SELECTED_FILE), seconds  # every rank trains on exactly the artifact rank 0 wrote

    def reference_loss(self, rnd: int) -> tuple[str, np.ndarray]:
        """Mean next-token CE under the warm-up proxy (else the warm-up target) of a seeded sample of at most
        ``PROXY_LOSS_SAMPLE`` candidates of shard ``rnd``, NaN for the others (the Spearman drops them): the "proxy
        loss" a scorer's ranking is correlated with in the selection diagnostics. Cached per shard: the same sample
        for every method of the run."""
        if rnd not in self._ref_loss:
            which = "proxy" if is_complete(self.layout.warmup("proxy"), kind="checkpoint") else "target"
            model = load_checkpoint_model(self.layout.warmup(which), device=self.ctx.device)
            ids = self.pool.ids(rnd)
            pick = np.arange(len(ids))
            if len(ids) > PROXY_LOSS_SAMPLE:
                rng = np.random.default_rng(derived_seed(self.r.seed, 0, rnd, STREAM_DIAGNOSTICS))
                pick = np.sort(rng.choice(len(ids), PROXY_LOSS_SAMPLE, replace=False))
            loss = np.full(len(ids), np.nan)
            loss[pick] = mean_token_ce(model, self.pool, ids[pick], self.r.score_batch_size, self.ctx.device)
            self._ref_loss[rnd] = (f"warm-up {which}", loss)
        return self._ref_loss[rnd]

    def selection_diagnostics(self, rc: RoundContext, scores: np.ndarray, selected: np.ndarray) -> dict[str, Any]:
        """What a scorer sorts by (``select/diagnostics.py``): per-source score distributions, Spearman with length,
        documents per sequence, proxy loss and near-duplication, ties, and a one-line verdict."""
        log.info("%s: selection diagnostics (per-source scores, length, proxy loss, near-duplicates) ...",
                 self._rel(rc, "selection"))
        t0 = time.perf_counter()
        model, loss = self.reference_loss(rc.round)
        d = scorer_diagnostics(self.pool, rc.candidates, scores, selected, proxy_loss=loss,
                                  seed=rc.derived_seed(STREAM_SELECT))
        d["proxy_loss_model"] = model
        d["verdict"] = diagnostics_verdict(d)
        log.info("%s: selection diagnostics done in %.1fs: %s", self._rel(rc, "selection"), time.perf_counter() - t0,
                 d["verdict"])
        return d

    def _rel(self, rc: RoundContext, stage: str) -> str:
        return self.layout.key(RunPath(rc.method, rc.seed, rc.round, stage))

    def token_selector(self, m: SelectionMethod, rc: RoundContext) -> Any:
        return m.token_selector(rc) if m.level == "token" else None

    def stage_train(self, m: SelectionMethod, rc: RoundContext, selected: np.ndarray) -> Path:
        out = rc.stage_dir("target")
        if is_complete(out, kind="checkpoint"):
            return out
        self._record(self._rel(rc, "target"))
        cfg = self.ctx.train_cfg(self.r.round_steps, rnd=rc.round, seed=rc.seed, stream=STREAM_TRAIN)
        log.info("[%s seed%d round%d] training target %d steps on %d sequences", m.name, rc.seed, rc.round, cfg.steps,
                 len(selected))
        train(cfg, self.pool, selected, out, init_from=rc.prev_target, token_selector=self.token_selector(m, rc))
        return out

    def stage_eval(self, m: SelectionMethod, rc: RoundContext, selected: np.ndarray) -> dict[str, Any]:
        edir = rc.stage_dir("eval")
        if is_complete(edir, kind="eval"):
            return read_json(edir / EVAL_RESULTS_FILE)
        self._record(self._rel(rc, "eval"))
        # Decay branch: continue from the round's checkpoint with the LR halved every `halve_every` steps, on the
        # round's selection *with the method's own token selector* (a token-level method is evaluated as trained);
        # the main run continues from the undecayed checkpoint, so this branch never feeds back into training.
        bdir = rc.dir / "decay_branch"
        if self.r.decay.steps > 0:
            cfg = self.ctx.train_cfg(self.r.decay.steps, rnd=rc.round, seed=rc.seed, stream=STREAM_DECAY)
            cfg = replace(cfg, **{"optim.schedule": "wsd", "optim.decay_steps": self.r.decay.steps,
                                  "optim.decay_halving_every": self.r.decay.halve_every})
            train(cfg, self.pool, selected, bdir, init_from=rc.stage_dir("target"), token_selector=self.token_selector(m, rc))
            model_dir = bdir
        else:
            model_dir = rc.stage_dir("target")
        # the decay branch above is training (every rank); the evaluation itself runs on rank 0
        return self.ctx.main_first(lambda: self._evaluate(m, rc, model_dir, selected))

    def exposure(self, m: SelectionMethod, rc: RoundContext, selected: np.ndarray) -> dict[str, Any]:
        """What the method was given this round: tokens fed / backpropagated, distinct sequences, epochs, cost."""
        tdir = rc.stage_dir("target")
        extra = read_manifest(tdir)["extra"]
        steps, gb, L = self.r.round_steps, self.r.train.global_batch, self.pool.seq_len
        fed_seqs = steps * gb
        kept = 1.0
        if m.level == "token":
            # the selector's running total when it keeps one, else the mean of the logged per-step fractions
            recs = read_jsonl(tdir / "train_log.jsonl")
            total = [x["sel_kept_fraction_total"] for x in recs if "sel_kept_fraction_total" in x]
            per_step = [x["sel_kept_fraction"] for x in recs if "sel_kept_fraction" in x]
            kept = float(total[-1]) if total else (float(np.mean(per_step)) if per_step else float("nan"))
        summary = read_json(rc.stage_dir("selection") / SUMMARY_FILE)
        f = FlopContext(self.r, self.pool.vocab_size, L, len(rc.candidates))
        fed = int(extra.get("tokens_seen", fed_seqs * L))
        n_t = f.params(self.r.target.preset)
        # a token selector with several micro-batches per rank and step costs the loop one extra no-grad forward
        # (the scoring pass, train/hooks.py); with one micro-batch the grad forward doubles as it, and a selector
        # that does not read the CE (the random mask) has none. The loop records which (checkpoint extra); older
        # checkpoints without the key fall back to the rule without the last case.
        accum = max(1, gb // max(1, self.r.train.micro_batch * self.ctx.dist.world_size))
        scoring = extra.get("scoring_forward", m.level == "token" and accum > 1)
        return {
            "tokens_fed": fed,
            "target_flops": 6.0 * n_t * fed,  # plain training of the target on the tokens fed
            "scoring_flops": 2.0 * n_t * fed if scoring else 0.0,
            "tokens_backprop": int(round(fed_seqs * (L - 1) * kept)) if kept == kept else None,
            "kept_token_fraction": kept,
            "selected_sequences": int(len(selected)),
            "distinct_sequences": int(min(len(selected), fed_seqs)),
            "epochs": fed_seqs / max(1, len(selected)),
            "candidates": int(len(rc.candidates)),
            "selection_flops": float(m.selection_flops(f)),
            "selection_seconds": float(summary.get("selection_seconds", 0.0)),
            "train_seconds": extra.get("train_seconds"),
        }

    def _evaluate(self, m: SelectionMethod, rc: RoundContext, model_dir: Path, selected: np.ndarray) -> dict[str, Any]:
        """Report-set losses (+ lm-eval) of ``model_dir`` and the exposure ledger -> ``eval/``."""
        edir = rc.stage_dir("eval")
        if is_complete(edir, kind="eval"):
            return read_json(edir / EVAL_RESULTS_FILE)
        model = load_checkpoint_model(model_dir, device=self.ctx.device)
        t0 = time.perf_counter()
        res: dict[str, Any] = {"method": m.name, "seed": rc.seed, "round": rc.round}
        # Cumulative target tokens (warm-up + rounds 1..r): the x-axis of every "metric vs tokens" comparison.
        chain = [self.layout.target(m.name, rc.seed, k) for k in range(0, rc.round + 1)]
        res["tokens"] = int(sum(read_manifest(d)["extra"].get("tokens_seen", 0) for d in chain))
        # Report sets only: no method, reference or probe has seen them (checked at recipe load).
        res["val_loss"] = {k: validation_loss(model, vs, self.r.validation.batch_size, self.ctx.device)
                           for k, vs in self.ctx.report_sets().items()}
        res["val_split"] = "report"
        # bits per byte: tokenizer-independent, comparable across vocabularies and with other work
        res["val_bpb"] = {k: bits_per_byte(res["val_loss"][k], vs, self.pool.load_tokenizer())
                          for k, vs in self.ctx.report_sets().items()}
        res["exposure"] = self.exposure(m, rc, selected)
        res["downstream"] = None
        if self.r.eval.downstream:
            res["downstream"] = evaluate_model(
                model, self.pool.load_tokenizer(), tasks=self.r.eval.tasks, task_data=self.r.eval.task_data,
                limit=self.r.eval.limit, batch_size=self.r.eval.batch_size, device=str(self.ctx.device), seed=self.r.seed,
            )
        res["eval_seconds"] = time.perf_counter() - t0
        edir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(edir / EVAL_RESULTS_FILE, res)
        write_manifest(edir, Manifest(kind="eval", config=to_dict(self.r.eval), seed=self.r.seed,
                                      parents=[parent_ref(model_dir)], counts={"tokens": res["tokens"]},
                                      timings={"eval": res["eval_seconds"]}, extra={"exposure": res["exposure"]}))
        return res

    def run_round(self, method: str, seed: int, rnd: int) -> dict[str, Any]:
        m = self.methods[method]
        rc = self.round_ctx(method, seed, rnd)
        if is_complete(rc.dir, kind="round"):
            return read_json(rc.stage_dir("eval") / EVAL_RESULTS_FILE)
        selected, sel_seconds = self.stage_select(m, rc)
        self.stage_train(m, rc, selected)
        res = self.stage_eval(m, rc, selected)
        summary = read_json(rc.stage_dir("selection") / SUMMARY_FILE)
        self.ctx.main_only(lambda: write_manifest(rc.dir, Manifest(
            kind="round", config=recipe_summary(self.r), seed=seed,
            parents=[parent_ref(rc.stage_dir(s)) for s in ("selection", "target", "eval")],
            counts={"selected": int(len(selected)), "tokens": res.get("tokens", 0)},
            timings={"selection": float(summary.get("selection_seconds", sel_seconds))},
            extra={"stages": list(m.stages), "level": m.level, "exposure": res.get("exposure")},
        )))
        return res

    def run(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.ctx.main_only(self.check_stages)  # before any compute

        def start() -> None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.r, self.run_dir / "config.yaml")

        self.ctx.main_only(start)
        self.stage_pool()
        self.check_tokenizers()
        if self.pool.n_shards < self.r.rounds + 1:
            raise LmselectError(f"{self.layout.pool}: pool has {self.pool.n_shards} shards; {self.r.rounds} rounds need "
                                f"{self.r.rounds + 1}")
        self.stage_warmup("target")
        if self.needs_proxy:
            self.stage_warmup("proxy")
        for method in self.r.methods:
            for seed in self.r.seeds:
                for rnd in range(1, self.r.rounds + 1):
                    self.run_round(method, seed, rnd)

        def finish() -> None:
            write_manifest(self.run_dir, Manifest(
                kind="run", config=to_dict(self.r), seed=self.r.seed,
                parents=[parent_ref(self.layout.pool)] + [parent_ref(self.layout.warmup("target"))],
                extra={"methods": self.r.methods, "seeds": self.r.seeds, "rounds": self.r.rounds,
                       "world_size": self.ctx.dist.world_size},
                timings={"total": time.perf_counter() - t0},
            ))
            write_results(self.run_dir)

        self.ctx.main_only(finish)
        return run_results(collect(self.run_dir))  # read-only: every rank returns the same numbers


# ------------------------------------------------------------------------------------------------------------------
# CLI


def add_run_arguments(p: argparse.ArgumentParser, default_out: str | None = None) -> None:
    """The flags every verb that runs a recipe shares (run, demo, compare)."""
    p.add_argument("--out", default=default_out, help="run directory (default: the recipe's `out`, else runs/<name>)")
    p.add_argument("--no-report", action="store_true", help="skip writing report.html at the end")
    p.add_argument("--recompute", action="store_true",
                   help="redo stages whose configuration changed (and everything after them) instead of refusing")
    p.add_argument("--take-over-lock", action="store_true",
                   help="take over the run directory's lock from a process that is gone (e.g. on a dead node)")
    p.epilog = ("Override any recipe key with --key.sub=value, e.g. --rounds=3 --bliss.outer_steps=50. Precedence: "
                "the recipe's defaults, then the YAML file, then --key=value overrides.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML (or 'demo' for the embedded demo recipe)")
    add_run_arguments(p)


def run_recipe(recipe: Any, out: str | Path | None = None, report: bool = True, *, recompute: bool = False) -> tuple[Path, dict[str, Any]]:
    """Run ``recipe`` into ``out`` (locked while it runs); returns the run directory and its headline results."""
    import contextlib


    run_dir = Path(out or recipe.out or Path("runs") / recipe.name)
    runner = Runner(recipe, run_dir, recompute=recompute)
    try:
        # rank 0 holds the lock for all ranks (they share the directory and coordinate through it)
        with run_lock(run_dir) if runner.is_main else contextlib.nullcontext():
            res = runner.run()
            if report:
                path = runner.ctx.main_only(lambda: write_report(run_dir))
                if runner.is_main:
                    log.info("report: %s", path)
    finally:
        runner.close()
    return run_dir, res


def preflight(args: argparse.Namespace) -> Any:
    """What ``lmselect run`` checks before any compute: the recipe file and its overrides (load_recipe's validation);
    ``lmselect slurm run`` calls it before writing a script. Returns the recipe."""
    return load_recipe(args.recipe, args.overrides)


def run(args: argparse.Namespace) -> int:
    recipe = preflight(args)
    run_dir, results = run_recipe(recipe, args.out, report=not args.no_report, recompute=args.recompute)
    if rank_world()[0] == 0:  # the runner has left the process group: torchrun's environment tells the rank
        print(results_markdown(results))
        print(f"run directory: {run_dir}")
    return 0
