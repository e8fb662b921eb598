"""``lmselect check RECIPE``: a known-answer check — does a method pick planted target-like data and drop junk?

    lmselect check demo --method bliss --out runs/check-bliss
    lmselect check my.yaml --method reference --out runs/check-ref          # excess loss against a reference LM
    lmselect check my.yaml --prepare-only --out runs/check-x                # then score runs/check-x/pool yourself
    lmselect check my.yaml --scores runs/my-scores --out runs/check-x      # ... and judge those scores

What it does, and why: a selection method run on real data gives no ground truth to compare against. The check
manufactures one from the user's own corpus and selection set, so the answer is known:

1. **Planted sources** (each its own ``source`` label, so per-source selection rates measure them):
   ``planted_target`` — a seeded part (``--target-holdout``) of the selection set, held out from the validation
   set the method sees (the recipe's ``validation.selection`` is pointed at the other part) and planted into the
   pool as documents. Junk made from corpus documents: ``planted_shuffled`` (the document's words in random order:
   the same unigram statistics as prose), ``planted_repeated`` (one of its sentences repeated to the document's
   length) and ``planted_random`` (as many words drawn uniformly from the corpus vocabulary, i.e. the distinct
   whitespace-separated words of the sampled documents). Each junk document is made from at most
   ``--max-doc-chars`` characters of its corpus document, so that no single long document carries a large share of
   its kind's sequences (and so decides its rate). Each junk kind gets about ``--plant-fraction`` of the corpus
   characters; the target part is capped at the same budget. Everything is seeded (``--seed``).
2. The planted ``.jsonl`` files are written to ``OUT/inputs/`` and a pool is prepared with the recipe's own
   ``pool.prepare`` settings from the recipe's inputs plus those files (``OUT/pool``).
3. The method runs through the normal pipeline (:func:`lmselect.pipeline.run_recipe`, ``OUT/run``) on a recipe
   derived from the user's: that pool, that validation part, ``methods = [method]``, run seed 0 (``--method-seeds
   0,1,2``: several, on the same pool and warm-up; PASS then needs every seed), no downstream eval and no decay
   branch (neither feeds back into selection). Any ``--key=value`` recipe override applies, e.g. to
   shorten ``--round_steps``. ``--method reference`` (``select/reference.py``: excess loss against a reference
   trained on the visible selection set) is a method like any other; ``--reference.score=loss`` switches it to
   −CE(reference). With ``--scores DIR`` a precomputed scores sidecar of ``OUT/pool`` is judged instead, so any
   external scorer can be checked: each round r keeps the top ``select_fraction`` of shard r by score.
4. Per round, the rate of each planted source (selected / candidates) is compared with the base rate (the share of
   the shard selected): target-like must be picked at ≥ ``--target-ratio`` (2) × base, each junk kind at ≤
   ``--junk-ratio`` (0.5) × base. A PASS / FAIL table goes to stdout, ``OUT/check.md`` and ``OUT/check.json``; the
   exit code is 0 on PASS and 1 on FAIL.

The planted files pass through the recipe's heuristic prefilter (``pool.prepare.prefilter``, ``--prefilter``; see
:mod:`lmselect.data.prefilter`) like any input, so two tables are printed. The **pipeline** table counts every
planted document: per kind, documents planted, removed by each filter, reaching the method, selected, and rate = the
kind's tokens selected in the round / its input tokens before the prefilter, against the corpus's own sources' same
share (the round's share of the input cancels in the ratio); its verdict is the check's verdict and exit code. The
**method** table is step 4 on the candidates that reached the method; a kind of which fewer than ``--min-reached``
(10) documents are among a round's candidates is "not judged (n reached)" there, never a pass. ``--prefilter=none``
runs the method alone on everything. A recipe with ``pool.path`` is checked on the corpus that pool was prepared
from (inputs and settings from its manifest).

Token-level methods (rho1, blade) feed the whole shard and select tokens inside the loss, so there is no
per-source selection rate to judge; the check refuses them before any compute ("not applicable (token-level)").
Reruns resume: the planted inputs, pool and run are reused when complete; other check settings into the same
``--out`` are refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lmselect.artifacts import (
    LmselectError,
    atomic_write_json,
    atomic_write_text,
    is_complete,
    read_json,
    read_manifest,
)
from lmselect.config import ConfigError, deep_merge, from_dict, parse_overrides, replace, to_dict
from lmselect.data.planted import JUNK, PLANTED, TARGET  # the planted sources' names, one place
from lmselect.data.pool import TokenPool
from lmselect.data.prefilter import normalize_names
from lmselect.data.prepare import PrepareConfig, prepare
from lmselect.data.readers import iter_documents, resolve_inputs
from lmselect.data.valset import read_texts
from lmselect.layout import RunLayout
from lmselect.paths import portable
from lmselect.pipeline import run_recipe
from lmselect.recipe import Recipe, load_recipe, resolve_path
from lmselect.score import read_scores
from lmselect.select.base import method_class
from lmselect.select.diagnostics import diagnostics_verdict, selection_diagnostics
from lmselect.select.summary import build_summary
from lmselect.select.topk import top_fraction

log = logging.getLogger("lmselect.check")

RESERVOIR = 5000  # corpus documents kept (seeded reservoir sample) to make junk from
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


@dataclass
class CheckConfig:
    """Settings of one known-answer check (CLI flags of the same names)."""

    method: str = "bliss"  # a sequence-level method of the registry
    scores: str | None = None  # judge this precomputed scores sidecar of OUT/pool instead of running a method
    target_holdout: float = 0.5  # share of the selection set planted as target-like documents (hidden from the method)
    plant_fraction: float = 0.05  # characters of each junk kind, as a share of the corpus characters
    # each junk document is made from the first max_doc_chars characters of a corpus document (0 = whole): an
    # uncapped 40k-character source made one repeated-sentence document of 24 sequences, 14 % of its kind's
    # candidates in a demo shard, so that one document decided the kind's rate (measured, issue 12)
    max_doc_chars: int = 2000
    target_ratio: float = 2.0  # PASS needs target-like rate >= target_ratio x base rate ...
    junk_ratio: float = 0.5  # ... and every junk rate <= junk_ratio x base rate, in every round
    seed: int = 0
    method_seeds: tuple[int, ...] = (0,)  # the method's run seeds (recipe ``seeds``); PASS needs every seed to pass
    # the method table judges a kind in a round only when at least this many of its documents reached the method:
    # below 10, one document moves the kind's rate by more than a tenth of it (the prefilter can leave that few)
    min_reached: int = 10

    def validate(self) -> None:
        if not 0.0 < self.target_holdout < 1.0:
            raise ConfigError(f"check: --target-holdout must be in (0, 1), got {self.target_holdout}")
        if not 0.0 < self.plant_fraction < 1.0:
            raise ConfigError(f"check: --plant-fraction must be in (0, 1), got {self.plant_fraction}")
        if self.max_doc_chars < 0:
            raise ConfigError(f"check: --max-doc-chars must be >= 0 (0 = no cap), got {self.max_doc_chars}")
        if self.target_ratio <= 0 or self.junk_ratio < 0:
            raise ConfigError("check: --target-ratio must be > 0 and --junk-ratio >= 0")
        if self.min_reached < 1:
            raise ConfigError(f"check: --min-reached must be >= 1, got {self.min_reached}")
        if not self.method_seeds or len(set(self.method_seeds)) != len(self.method_seeds):
            raise ConfigError(f"check: --method-seeds must be distinct integers, got {list(self.method_seeds)}")
        if self.scores is not None:
            return
        level = method_class(self.method).level  # an unknown name: ConfigError with "did you mean"
        if level == "token":
            raise LmselectError(
                f"check: {self.method} is not applicable (token-level): it trains on the whole shard and selects tokens "
                "inside the loss, so there is no per-source selection rate to judge"
            )


# ------------------------------------------------------------------------------------------------------------------
# planted documents


def truncate_words(text: str, max_chars: int) -> str:
    """``text`` cut to at most ``max_chars`` characters at a whitespace boundary (``max_chars`` 0: unchanged)."""
    if max_chars <= 0 or len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return cut[:space] if space > 0 else cut


def shuffle_words(text: str, rng: np.random.Generator) -> str:
    """The document's whitespace-separated words in a random order (same words, same unigram statistics)."""
    words = text.split()
    return " ".join(words[i] for i in rng.permutation(len(words)))


def repeat_sentence(text: str, rng: np.random.Generator) -> str:
    """One sentence of the document (5-60 words where there is one) repeated to at least the document's length."""
    sents = [s.strip() for s in _SENTENCE.split(text) if s.strip()]
    good = [s for s in sents if 5 <= len(s.split()) <= 60]
    sent = good[int(rng.integers(len(good)))] if good else " ".join(text.split()[:20])
    n = max(2, math.ceil(len(text) / (len(sent) + 1)))
    return " ".join([sent] * n)


def random_words(n_words: int, vocab: list[str], rng: np.random.Generator) -> str:
    """``n_words`` words drawn uniformly (with replacement) from ``vocab``."""
    return " ".join(vocab[i] for i in rng.integers(0, len(vocab), size=max(1, n_words)))


def _read_corpus_sample(prep: Any, seed: int) -> tuple[list[str], int, int]:
    """(seeded reservoir sample of up to RESERVOIR document texts, documents read, characters read)."""
    rng = np.random.default_rng(seed + 1)  # offset 1: the reservoir
    sample: list[str] = []
    n = chars = 0
    for d in iter_documents(resolve_inputs(prep.inputs), prep.text_field, prep.id_field, prep.source_field,
                            False, prep.max_docs):
        n += 1
        chars += len(d.text)
        if len(sample) < RESERVOIR:
            sample.append(d.text)
        else:  # Algorithm R: every document read so far is in the sample with probability RESERVOIR / n
            j = int(rng.integers(n))
            if j < RESERVOIR:
                sample[j] = d.text
    if n == 0:
        raise LmselectError(f"check: the recipe's corpus ({', '.join(prep.inputs)}) has no documents")
    return sample, n, chars


def _jsonl(path: Path, texts: list[str], prep: Any, source: str | None) -> None:
    rows = []
    for i, t in enumerate(texts):
        rec = {prep.text_field: t}
        if source is not None:
            if prep.source_field:
                rec[prep.source_field] = source
            if prep.id_field:
                rec[prep.id_field] = f"{source}:{i}"
        rows.append(json.dumps(rec) + "\n")
    atomic_write_text(path, "".join(rows))


def build_planted_inputs(recipe: Recipe, out_dir: str | Path, cfg: CheckConfig) -> dict[str, Any]:
    """Write ``OUT/inputs/``: ``selection_visible.jsonl`` (what the method sees) and one ``planted_*.jsonl`` per
    planted source, plus ``plant.json`` (written last: settings, counts). Reused when ``plant.json`` matches."""
    prep = recipe.pool.prepare
    sel_path = recipe.validation.selection
    inp = Path(out_dir) / "inputs"

    key = {"seed": cfg.seed, "target_holdout": cfg.target_holdout, "plant_fraction": cfg.plant_fraction,
           "max_doc_chars": cfg.max_doc_chars,
           "corpus": portable(list(prep.inputs)), "selection_set": portable(str(sel_path)),
           "max_docs": prep.max_docs, "text_field": prep.text_field, "source_field": prep.source_field}
    if (inp / "plant.json").is_file():
        old = read_json(inp / "plant.json")
        if old.get("key") == key:
            return old
        raise LmselectError(f"{inp / 'plant.json'}: this output directory was planted with other settings; use another --out")
    inp.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)  # offset 0: the selection-set split and the junk
    texts = read_texts(Path(sel_path))
    if len(texts) < 2:
        raise LmselectError(f"{sel_path}: the selection set needs at least 2 records to split (has {len(texts)})")
    perm = rng.permutation(len(texts))
    n_hold = min(len(texts) - 1, max(1, int(round(cfg.target_holdout * len(texts)))))
    hold = [texts[i] for i in sorted(perm[:n_hold])]
    visible = [texts[i] for i in sorted(perm[n_hold:])]

    sample, n_docs, n_chars = _read_corpus_sample(prep, cfg.seed)
    budget = cfg.plant_fraction * n_chars
    target, c = [], 0
    for t in hold:  # the target part is capped at the junk budget so it stays a small share of the pool
        if c >= budget:
            break
        target.append(t)
        c += len(t)
    vocab = sorted({w for t in sample for w in t.split()})
    planted: dict[str, list[str]] = {TARGET: target}
    for kind in JUNK:
        docs, c = [], 0
        order = rng.permutation(len(sample))
        i = 0
        while c < budget:
            src = truncate_words(sample[order[i % len(order)]], cfg.max_doc_chars)
            i += 1
            if kind == "planted_shuffled":
                doc = shuffle_words(src, rng)
            elif kind == "planted_repeated":
                doc = repeat_sentence(src, rng)
            else:
                doc = random_words(len(src.split()), vocab, rng)
            docs.append(doc)
            c += len(doc)
        planted[kind] = docs

    _jsonl(inp / "selection_visible.jsonl", visible, prep, None)
    files = {}
    for name, docs in planted.items():
        _jsonl(inp / f"{name}.jsonl", docs, prep, name)
        files[name] = str((inp / f"{name}.jsonl").resolve())
    info = {
        "key": key, "files": files, "selection_visible": str((inp / "selection_visible.jsonl").resolve()),
        "counts": {"selection_set": len(texts), "visible": len(visible), "held_out": len(hold),
                   "corpus_documents": n_docs, "corpus_chars": n_chars,
                   **{name: {"documents": len(d), "chars": int(sum(map(len, d)))} for name, d in planted.items()}},
    }
    atomic_write_json(inp / "plant.json", info)
    return info


def prepare_from_pool(recipe: Recipe, overrides: Sequence[str] = ()) -> Recipe:
    """A recipe that points at a prepared pool (``pool.path``) -> the same recipe preparing from that pool's inputs
    with its settings (the pool manifest's config), so that documents can be planted among them. ``overrides``
    (``--key=value``, ``--prefilter`` as ``--pool.prepare.prefilter=...``) that set ``pool.prepare.*`` keys apply on
    top of the pool's settings: ``check R --prefilter=none`` with ``pool.path`` checks the method alone."""
    if recipe.pool.path is None:
        return recipe

    path = recipe.pool.path
    mine = (parse_overrides(list(overrides)).get("pool") or {}).get("prepare") or {}
    try:
        prep = from_dict(PrepareConfig, deep_merge(dict(read_manifest(path, kind="pool")["config"]), mine))
    except ConfigError as e:
        raise ConfigError(f"command line: {e}") from None
    try:
        resolve_inputs(prep.inputs)
    except LmselectError as e:
        raise ConfigError(
            f"check: pool.path {path} was prepared from inputs that cannot be read now ({str(e).splitlines()[0]}); "
            "set pool.prepare.inputs (and no pool.path) to the corpus files to plant documents among"
        ) from None
    data = replace(recipe, **{"pool.path": None})
    return replace(data, **{"pool.prepare": to_dict(prep)})


def _same_prefilter(recipe: Recipe, out_dir: Path) -> None:
    """Refuse, in one line, a check into an output directory whose pool was prepared with another prefilter."""
    m = out_dir / "pool" / "manifest.json"
    if not m.is_file():
        return
    old = normalize_names(read_json(m).get("config", {}).get("prefilter"))
    new = normalize_names(recipe.pool.prepare.prefilter)
    if old != new:
        raise LmselectError(f"{out_dir}: its pool was prepared with prefilter {','.join(old) or 'none'}; this check "
                            f"asks for {','.join(new) or 'none'}: use another --out")


def planted_recipe(recipe: Recipe, planted: dict[str, Any], out_dir: str | Path, method: str,
                   seeds: tuple[int, ...] = (0,)) -> Recipe:
    """The user's recipe pointed at the planted pool and the visible part of the selection set, ``method`` only,
    run seeds ``seeds``, no downstream evaluation and no decay branch (the eval branch never feeds back into
    selection)."""
    sel_key = "validation.selection"
    return replace(recipe, **{
        "pool.path": str((Path(out_dir) / "pool").resolve()), sel_key: planted["selection_visible"],
        "methods": [method], "seeds": list(seeds),
        "eval.downstream": False, "decay.steps": 0,
    })


def controlled_recipe(recipe: Recipe, planted: dict[str, Any]) -> Recipe:
    """The recipe of a controlled comparison (``compare --controls``): the same pool preparation with the planted files
    (target-like and junk) added to its inputs, and the methods' selection set cut to its visible part (the planted
    target-like passages are the other part). Decontamination keeps protecting the report sets and task files; of the
    selection set it protects the visible part, so that the planted passages are not dropped as overlaps of the
    file they were cut from (and a planted passage that shares an n-gram with a report item is still dropped)."""
    recipe = prepare_from_pool(recipe)
    prep = recipe.pool.prepare
    n_planted = sum(planted["counts"][n]["documents"] for n in PLANTED)
    sel = resolve_path(recipe.validation.selection)
    protected = [planted["selection_visible"] if resolve_path(p) == sel else p for p in prep.decontaminate.protected]
    return replace(recipe, **{
        "pool.prepare.inputs": list(prep.inputs) + [planted["files"][n] for n in PLANTED],
        "pool.prepare.max_docs": None if prep.max_docs is None else prep.max_docs + n_planted,
        "pool.prepare.decontaminate.protected": protected,
        "validation.selection": planted["selection_visible"],
    })


def prepare_planted_pool(recipe: Recipe, planted: dict[str, Any], out_dir: str | Path) -> Path:
    """Prepare ``OUT/pool`` with the recipe's pool.prepare settings from its inputs plus the planted files."""
    prep = recipe.pool.prepare
    n_planted = sum(planted["counts"][n]["documents"] for n in PLANTED)
    cfg = replace(prep, inputs=list(prep.inputs) + [planted["files"][n] for n in PLANTED],
                  max_docs=None if prep.max_docs is None else prep.max_docs + n_planted)
    # the pool's decontamination applies to the corpus as it did to the pool (drop mode drops); the planted
    # target-like documents *are* selection-set items, so the planted sources are flagged, never dropped
    return prepare(cfg, Path(out_dir) / "pool", progress=False, decontam_keep=PLANTED)


def describe_pool(recipe: Recipe, prepared: Recipe) -> str:
    """One line saying what the check's pool is: its inputs and settings, where they came from, plus the plants."""
    p = prepared.pool.prepare
    dec = p.decontaminate
    origin = (f"the inputs and settings of pool.path {recipe.pool.path}" if recipe.pool.path is not None
              else "the recipe's pool.prepare")
    return (f"check pool: prepared from {origin} ({len(p.inputs)} input(s), seq_len {p.seq_len}, prefilter "
            f"{','.join(normalize_names(p.prefilter)) or 'none'}, decontamination "
            f"{f'{dec.mode} against {len(dec.protected)} protected set(s)' if dec.enabled else 'off'}) "
            f"plus the planted documents ({', '.join(PLANTED)})")


# ------------------------------------------------------------------------------------------------------------------
# scores -> per-round selections


def scores_by_round(pool: Any, seq_ids: np.ndarray, scores: np.ndarray, fraction: float, rounds: int,
                    where: str = "scores") -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per round r = 1..rounds: (candidates = shard r, their scores, the top ``fraction`` of them by score).

    Every candidate needs a score; a sidecar that lacks some is refused with the command that makes a full one."""
    seq_ids = np.asarray(seq_ids, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(seq_ids)
    sid, sc = seq_ids[order], scores[order]
    out = {}
    for r in range(1, rounds + 1):
        cand = pool.ids(r)
        pos = np.clip(np.searchsorted(sid, cand), 0, max(len(sid) - 1, 0))
        found = sid[pos] == cand if len(sid) else np.zeros(len(cand), bool)
        if not np.all(found):
            raise LmselectError(
                f"{where}: no score for {int((~found).sum())} of the {len(cand)} sequences of shard {r} of {pool.path}; "
                f"score it with: lmselect score --pool {pool.path} --pool-shard {','.join(map(str, range(1, rounds + 1)))}"
            )
        out[r] = (cand, sc[pos], top_fraction(cand, sc[pos], fraction))
    return out


# ------------------------------------------------------------------------------------------------------------------
# judging


def planted_documents(pool: Any, cand: np.ndarray, sel: np.ndarray) -> dict[str, dict[str, int]]:
    """Per planted source: distinct planted documents with a sequence among the candidates / among the selected.

    A long planted document spans several sequences, so a kind's rate can hinge on a few documents; the count says
    how many independent documents a rate is made of."""
    import pandas as pd

    path = Path(pool.path) / "docs.parquet"
    if not path.is_file():
        return {}
    d = pd.read_parquet(path, columns=["seq_id", "doc_id", "source"])
    d = d[d["source"].isin(PLANTED)]
    out = {}
    for name, g in d.groupby("source"):
        out[str(name)] = {"documents": int(g.loc[g["seq_id"].isin(cand), "doc_id"].nunique()),
                          "selected_documents": int(g.loc[g["seq_id"].isin(sel), "doc_id"].nunique())}
    return out


def judge(summaries: list[dict[str, Any]], cfg: CheckConfig,
          documents: dict[tuple[int, int], dict[str, dict[str, int]]] | None = None) -> dict[str, Any]:
    """PASS / FAIL rows (one per seed, round and planted source) from per-round selection summaries (each with its
    ``round`` and ``seed``, default 0); ``documents``: :func:`planted_documents` per (seed, round), reported beside the
    rates, not judged. PASS needs every row of every seed."""
    rows, others = [], []
    for i, s in enumerate(summaries, start=1):
        rnd, seed = int(s.get("round", i)), int(s.get("seed", 0))
        base = float(s["selected_rate"])
        per = s.get("per_source") or {}
        docs = (documents or {}).get((seed, rnd), {})
        for name in PLANTED:
            p = per.get(name, {"candidates": 0, "selected": 0, "rate": 0.0})
            is_target = name == TARGET
            ratio = p["rate"] / base if base > 0 else float("nan")
            reached = docs.get(name, {}).get("documents", int(p["candidates"]))
            judged = reached >= cfg.min_reached
            ok = judged and (ratio >= cfg.target_ratio if is_target else ratio <= cfg.junk_ratio)
            note = "" if judged else f"not judged ({reached} reached)"
            rows.append({"seed": seed, "round": rnd, "source": name, "kind": "target" if is_target else "junk",
                         "candidates": int(p["candidates"]), "selected": int(p["selected"]), "rate": float(p["rate"]),
                         "base": base, "ratio": ratio,
                         "criterion": f">= {cfg.target_ratio:g}x" if is_target else f"<= {cfg.junk_ratio:g}x",
                         "judged": judged, "pass": bool(ok), "note": note, **docs.get(name, {})})
        for name, p in per.items():
            if name not in PLANTED:
                others.append({"seed": seed, "round": rnd, "source": name, "candidates": int(p["candidates"]),
                               "rate": float(p["rate"]), "ratio": p["rate"] / base if base > 0 else float("nan")})
    judged = [r for r in rows if r["judged"]]
    n_pass = sum(r["pass"] for r in judged)
    seeds = sorted({r["seed"] for r in rows})
    by_seed = {sd: any(r["seed"] == sd for r in judged) and all(r["pass"] for r in judged if r["seed"] == sd)
               for sd in seeds}
    verdict = "NOT JUDGED" if not judged else "PASS" if n_pass == len(judged) else "FAIL"
    return {"verdict": verdict, "passed": n_pass, "criteria": len(judged), "not_judged": len(rows) - len(judged),
            "seeds": seeds, "seeds_passed": [sd for sd in seeds if by_seed[sd]], "rows": rows, "other_sources": others}


def pipeline_rows(pool: Any, rounds_selected: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]],
                  planted_counts: dict[str, Any], cfg: CheckConfig) -> dict[str, Any]:
    """The pipeline table: per seed, round and planted kind, what became of every planted document.

    Rate = tokens of the kind selected in the round / the kind's input tokens (before the prefilter: removed
    documents and lines count, from the pool manifest's ``extra.prefilter``; without a prefilter, the pool's tokens);
    base = the same share for the corpus's own sources together. The shard's share of the input cancels in the ratio,
    so it needs no per-round input count. Same thresholds as the method table; every row is judged."""
    import pandas as pd

    m = pool.manifest
    pre = (m.get("extra") or {}).get("prefilter") or {}
    pre_src = pre.get("per_source") or {}
    per = m["counts"]["per_source"]

    def input_tokens(src: str) -> int:
        if src in pre_src and pre.get("tokens_counted"):
            return int(pre_src[src]["input_tokens"])
        return int(per.get(src, {}).get("tokens", 0))

    corpus = sorted(s for s in set(per) | set(pre_src) if s not in PLANTED)
    in_corpus = sum(input_tokens(s) for s in corpus)
    d = pd.read_parquet(Path(pool.path) / "docs.parquet", columns=["seq_id", "doc_id", "source", "length"])
    rows = []
    for (seed, rnd), (cand, sel) in sorted(rounds_selected.items()):
        ds = d[d["seq_id"].isin(sel)]
        dc = d[d["seq_id"].isin(cand)]
        tok = ds.groupby("source")["length"].sum()
        base = float(sum(tok.get(s, 0) for s in corpus)) / max(in_corpus, 1)
        for name in PLANTED:
            is_target = name == TARGET
            in_k = input_tokens(name)
            rate = float(tok.get(name, 0)) / in_k if in_k else 0.0
            ratio = rate / base if base > 0 else float("nan")
            ok = ratio >= cfg.target_ratio if is_target else ratio <= cfg.junk_ratio
            removed = (pre_src.get(name) or {}).get("by_filter") or {}
            rows.append({
                "seed": seed, "round": rnd, "source": name, "kind": "target" if is_target else "junk",
                "planted": int((planted_counts.get(name) or {}).get("documents", 0)),
                "removed": int(sum(removed.values())), "removed_by_filter": dict(removed),
                "reached": int(dc.loc[dc["source"] == name, "doc_id"].nunique()),
                "selected_documents": int(ds.loc[ds["source"] == name, "doc_id"].nunique()),
                "input_tokens": in_k, "selected_tokens": int(tok.get(name, 0)), "rate": rate, "base": base,
                "ratio": ratio, "criterion": f">= {cfg.target_ratio:g}x" if is_target else f"<= {cfg.junk_ratio:g}x",
                "pass": bool(ok),
            })
    n_pass = sum(r["pass"] for r in rows)
    seeds = sorted({r["seed"] for r in rows})
    return {"verdict": "PASS" if rows and n_pass == len(rows) else "FAIL", "passed": n_pass, "criteria": len(rows),
            "seeds_passed": [sd for sd in seeds if all(r["pass"] for r in rows if r["seed"] == sd)],
            "filters": list(pre.get("filters") or []), "rows": rows}


def check_markdown(result: dict[str, Any]) -> str:
    """The PASS / FAIL table as Markdown (what ``check.md`` holds and the CLI prints)."""
    c = result["config"]
    multi = len(result.get("seeds") or [0]) > 1
    pipe = result.get("pipeline")
    lines = [f"# Known-answer check: {result['method']} — {result['verdict']}"
             + (f" (pipeline {pipe['verdict']}, method {result['method_verdict']})" if pipe else ""), ""]
    if result.get("pool_description"):
        lines += [result["pool_description"] + ".", ""]
    if pipe:
        filters = ", ".join(pipe["filters"]) or "none"
        lines += [
            f"## Pipeline: prefilter ({filters}) + {result['method']}", "",
            "Every planted document counts. Rate = the kind's tokens selected / its input tokens (before the "
            "prefilter); base = the same for the corpus's own sources; criteria: target-like "
            f">= {c['target_ratio']:g}x base, each junk kind <= {c['junk_ratio']:g}x base, every round.", "",
            ("| seed " if multi else "") + "| round | planted source | planted | removed by prefilter | reached the "
            "method | selected (docs) | rate | base | x base | criterion | result |",
            ("|---" if multi else "") + "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in pipe["rows"]:
            rem = (f"{r['removed']} (" + ", ".join(f"{k} {v}" for k, v in r["removed_by_filter"].items()) + ")"
                   if r["removed"] else "0")
            lines.append(("| " + str(r["seed"]) + " " if multi else "")
                         + f"| {r['round']} | {r['source']} | {r['planted']} | {rem} | {r['reached']} | "
                         f"{r['selected_documents']} | {r['rate']:.4f} | {r['base']:.4f} | {r['ratio']:.2f} | "
                         f"{r['criterion']} | {'PASS' if r['pass'] else 'FAIL'} |")
        lines += ["", f"**Pipeline: {pipe['verdict']}** ({pipe['passed']}/{pipe['criteria']} criteria met)"]
        if multi:
            lines.append(f"Seeds passing every criterion: {len(pipe['seeds_passed'])} of {len(result['seeds'])} "
                         f"({', '.join(map(str, pipe['seeds_passed'])) or 'none'})")
        lines += ["", f"## Method alone: {result['method']} on the candidates that reached it", "",
                  f"Rate = selected / candidates (sequences) of the kind in the round's shard; base = share of the "
                  f"shard selected. A kind with fewer than {c.get('min_reached', 1)} documents among the candidates "
                  "is not judged.", ""]
    else:
        lines += [f"Pool `{result['pool']}`; base rate = share of each round's shard selected; criteria: target-like "
                  f">= {c['target_ratio']:g}x base, each junk kind <= {c['junk_ratio']:g}x base, every round.", ""]
    lines += [
        "| round | planted source | candidates | selected | documents (selected) | rate | base | x base | criterion "
        "| result |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    if multi:
        lines[-2], lines[-1] = "| seed " + lines[-2], "|---" + lines[-1]
    for r in result["rows"]:
        res = ("PASS" if r["pass"] else "FAIL") if r.get("judged", True) else r["note"]
        docs = f"{r['documents']} ({r['selected_documents']})" if "documents" in r else "–"
        lines.append(("| " + str(r.get("seed", 0)) + " " if multi else "")
                     + f"| {r['round']} | {r['source']} | {r['candidates']} | {r['selected']} | {docs} | {r['rate']:.2f} | "
                     f"{r['base']:.2f} | {r['ratio']:.2f} | {r['criterion']} | {res} |")
    label = "Method" if pipe else "Overall"
    verdict = result.get("method_verdict", result["verdict"])
    lines += ["", f"**{label}: {verdict}** ({result['passed']}/{result['criteria']} criteria met"
              + (f"; {result['not_judged']} not judged" if result.get("not_judged") else "") + ")"]
    if multi:
        lines.append(f"Seeds passing every criterion: {len(result['seeds_passed'])} of {len(result['seeds'])} "
                     f"({', '.join(map(str, result['seeds_passed'])) or 'none'})")
    if result.get("other_sources"):
        by_round: dict[tuple[int, int], list[str]] = {}
        for o in result["other_sources"]:
            by_round.setdefault((o.get("seed", 0), o["round"]), []).append(
                f"{o['source']} {o['rate']:.2f} ({o['ratio']:.1f}x)")
        lines += ["", "Corpus sources (not judged): " + "; ".join(
            (f"seed {sd} " if multi else "") + f"round {k}: " + ", ".join(v) for (sd, k), v in sorted(by_round.items()))]
    for r, v in sorted((result.get("diagnostics") or {}).items()):
        lines.append(f"Round {r} {v['verdict']}")
    return "\n".join(lines) + "\n"


def _diagnostics(pool: Any, by_round: dict[int, tuple]) -> dict[int, Any]:
    """Per round with scores: the selection-diagnostics verdict line and its headline numbers."""
    out = {}
    for r, (cand, s, sel) in by_round.items():
        d = selection_diagnostics(pool, cand, s, sel)
        out[r] = {"verdict": diagnostics_verdict(d), "source_variance_share": d["source_variance_share"],
                  "spearman": d["spearman"], "tie_fraction": d["tie_fraction"]}
    return out


# ------------------------------------------------------------------------------------------------------------------
# the check


def run_check(recipe: Recipe, out_dir: str | Path, cfg: CheckConfig, *, prepare_only: bool = False,
              overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Plant, prepare, run (or score / read scores), judge; writes ``check.md`` then ``check.json`` into ``out_dir``.

    Returns the result dict (``verdict`` "PASS" / "FAIL", ``rows``, ...); with ``prepare_only`` stops after the pool.
    """
    cfg.validate()
    given = recipe
    recipe = prepare_from_pool(recipe, overrides)
    pool_line = describe_pool(given, recipe)
    log.info("%s", pool_line)
    out_dir = Path(out_dir)
    _same_prefilter(recipe, out_dir)
    planted = build_planted_inputs(recipe, out_dir, cfg)
    pool_dir = prepare_planted_pool(recipe, planted, out_dir)
    r = planted_recipe(recipe, planted, out_dir, cfg.method, tuple(cfg.method_seeds))
    pool = TokenPool(pool_dir)
    if prepare_only:
        return {"pool": str(pool_dir), "planted": planted, "pool_description": pool_line}
    by_round: dict[int, tuple] = {}
    if cfg.scores is not None:
        sdir, label = Path(cfg.scores), f"scores {cfg.scores}"

        m = read_manifest(sdir, kind="scores")
        other = [p for p in m.get("parents", []) if p.get("kind") == "pool" and p.get("uuid") != pool.manifest["uuid"]]
        if other:
            raise LmselectError(f"{sdir}: these scores are of another pool ({other[0].get('path')}), not {pool_dir}")
        ids, s = read_scores(sdir)

        by_round = scores_by_round(pool, ids, s, r.select_fraction, r.rounds, where=str(sdir))
        summaries = [build_summary(pool, cand, sc, sel, "top", r.select_fraction, extra={"round": k})
                     for k, (cand, sc, sel) in by_round.items()]
        rounds_selected = {(0, k): (cand, sel) for k, (cand, _, sel) in by_round.items()}
    else:
        label = cfg.method
        run_dir, _ = run_recipe(r, out_dir / "run", report=False)
        summaries, rounds_selected = [], {}
        layout = RunLayout(run_dir)
        for sd in cfg.method_seeds:
            for k in range(1, r.rounds + 1):
                summaries.append({**read_json(layout.selection_summary(cfg.method, sd, k)), "seed": sd})
                selected = np.load(layout.selected(cfg.method, sd, k))
                rounds_selected[(sd, k)] = (pool.ids(k), selected)
                sdir = layout.stage(cfg.method, sd, k, "scores")
                if sd == cfg.method_seeds[0] and is_complete(sdir, kind="scores"):
                    ids, s = read_scores(sdir)
                    by_round[k] = (ids, s, selected)
    docs = {key: planted_documents(pool, *selected) for key, selected in rounds_selected.items()}
    method = judge(summaries, cfg, docs)
    pipe = pipeline_rows(pool, rounds_selected, planted["counts"], cfg)
    result = {"method": label, "pool": str(pool_dir), "config": asdict(cfg), "planted": planted["counts"],
              **method, "verdict": pipe["verdict"], "method_verdict": method["verdict"], "pipeline": pipe,
              "diagnostics": _diagnostics(pool, by_round), "pool_description": pool_line}
    md = check_markdown(result)
    atomic_write_text(out_dir / "check.md", md)
    atomic_write_json(out_dir / "check.json", result)  # last: its presence means the check finished
    result["markdown"] = md
    return result


# ------------------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = CheckConfig()
    p.add_argument("recipe", help="recipe YAML (or 'demo'); its pool.prepare inputs and selection set are used")
    p.add_argument("--method", default=d.method, help="sequence-level method to check (bliss, mates, perplexity, "
                   "reference, random, ...); default bliss")
    p.add_argument("--scores", help="judge this scores sidecar of OUT/pool (see --prepare-only) instead of a method")
    p.add_argument("--out", help="output directory (default runs/<recipe name>-check-<method>)")
    p.add_argument("--prepare-only", action="store_true", help="stop after planting and preparing OUT/pool")
    p.add_argument("--target-holdout", type=float, default=d.target_holdout,
                   help="share of the selection set planted as target-like documents (default 0.5)")
    p.add_argument("--plant-fraction", type=float, default=d.plant_fraction,
                   help="characters of each junk kind as a share of the corpus (default 0.05)")
    p.add_argument("--max-doc-chars", type=int, default=d.max_doc_chars,
                   help="junk documents are made from at most this many characters of a corpus document, so no "
                   "single document carries many sequences of its kind (default 2000; 0 = no cap)")
    p.add_argument("--target-ratio", type=float, default=d.target_ratio, help="target-like rate >= this x base (2)")
    p.add_argument("--junk-ratio", type=float, default=d.junk_ratio, help="each junk rate <= this x base (0.5)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the split and the junk (default 0)")
    p.add_argument("--prefilter", default=None, metavar="NAME,...|none",
                   help="the prefilter the planted documents pass through with the corpus (default: the recipe's "
                   "pool.prepare.prefilter); none = the method alone on everything")
    p.add_argument("--min-reached", type=int, default=d.min_reached,
                   help="the method table judges a kind only when this many of its documents reach the method "
                   f"(default {d.min_reached})")
    p.add_argument("--method-seeds", default=",".join(map(str, d.method_seeds)),
                   help="comma-separated run seeds of the method (default 0); PASS needs every seed to pass")
    p.epilog = "Override any recipe key with --key.sub=value, e.g. --round_steps=10 --bliss.outer_steps=10."


def _seed_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"check: --method-seeds must be comma-separated integers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides or [])
    if args.prefilter is not None:
        overrides.append(f"--pool.prepare.prefilter={args.prefilter}")
    recipe = load_recipe(args.recipe, overrides)
    cfg = CheckConfig(method=args.method, scores=args.scores, target_holdout=args.target_holdout,
                      plant_fraction=args.plant_fraction, max_doc_chars=args.max_doc_chars, target_ratio=args.target_ratio, junk_ratio=args.junk_ratio,
                      seed=args.seed, min_reached=args.min_reached,
                      method_seeds=_seed_list(args.method_seeds))
    out = Path(args.out or Path("runs") / f"{recipe.name}-check-{'scores' if args.scores else args.method}")
    res = run_check(recipe, out, cfg, prepare_only=args.prepare_only, overrides=overrides)
    if args.prepare_only:
        print(res["pool_description"])
        print(f"planted pool: {res['pool']}")
        print(f"next: lmselect score --model MODEL --pool {res['pool']} --pool-shard "
              f"{','.join(map(str, range(1, recipe.rounds + 1)))} --out SCORES; then lmselect check {args.recipe} "
              f"--out {out} --scores SCORES")
        return 0
    print(res["markdown"], end="")
    print(f"written: {out / 'check.md'}, {out / 'check.json'}")
    return 0 if res["verdict"] == "PASS" else 1
