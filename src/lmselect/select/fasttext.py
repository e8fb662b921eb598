"""fastText target classifier: the DCLM quality filter (Li et al. 2024, "DataComp-LM", arXiv 2406.11794, §4.4).

Objective. A linear bag-of-n-grams classifier (fastText, Joulin et al. 2017) is trained to tell target-like text
(label ``target``) from pool text (label ``pool``); each candidate is scored by the classifier's probability of the
target label and the top ``select_fraction`` is kept::

    h(x)     = (1/|F(x)|) Σ_{f ∈ F(x)} A_f               F(x): the words and word bigrams of x (wordNgrams = 2)
    P(y | x) = softmax(B h(x))_y                          (fastText supervised, softmax loss)
    score(x) = P(target | x);   keep the k = fraction · |D| candidates of largest score (ties: lower sequence id)

DCLM trains this with positives from OpenHermes-2.5 + ELI5 and negatives from its raw pool (RefinedWeb) and keeps
the top 10 % (their ``fasttext_filter``; training script baselines/train_fasttext_classifier.py: lr 0.1, dim 100,
5 epochs, minCount 1, wordNgrams set to 2 for the bigram classifier). In DCLM's 1B ladder it scores 0.3099 CORE
against MATES's 0.3122 at a tiny fraction of the cost, which is why it is the cheap baseline here.

Choices and why.
* Positives = the selection set only (``RunContext.selection_set``, decoded text of its items); never a report set.
* Negatives (``negatives``): ``holdout`` (default) = a seeded sample of the part of shard 0 the warm-up did not
  train on. It comes from the same pool distribution as the candidates (shards are a random split) but is in no
  candidate shard, so no candidate is scored by a classifier that was trained on it as a negative: with
  ``candidates`` (the round's own shard, the other option) the sampled candidates are memorised as "pool" and scored
  lower than unseen ones (an in-sample bias of the ranking). The hold-out is also where MATES draws its probes.
* Balanced classes by default (``negatives_per_positive = 1``), as DCLM's classifier training data is roughly
  balanced; the prior shifts P(target) by a constant and does not change the ranking.
* Text = the decoded pool sequence (what the target trains on), lines joined by spaces (fastText reads one example
  per line; DCLM joins lines the same way before predicting). No lower-casing (DCLM's classifier does none).
* Determinism: ``thread = 1`` (fastText's Hogwild SGD is only reproducible single-threaded) and ``seed`` = the
  round's derived seed, so the same command gives the same selection; the bindings' ``train_supervised`` takes the
  seed since fastText 0.9.2.
* A candidate with no word left (empty after decoding) scores 0: there is no evidence it is target-like.
* Binding: ``fasttext-numpy2-wheel`` (import name ``fasttext``), a maintained wheel of the official bindings whose
  ``predict`` works under NumPy 2 (``fasttext`` 0.9.3's does not); datatrove depends on it too.

Each round keeps its classifier as a text scorer (``scores/text_scorer/``: its training data and settings, see
:class:`FastTextTextScorer`), which ``lmselect score --jsonl`` and the datatrove step load to score whole documents;
:func:`classify` trains and scores texts outside a run.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

import lmselect
from lmselect.artifacts import is_complete, parent_ref, read_manifest
from lmselect.context import STREAM_METHOD, FlopContext, RoundContext
from lmselect.errors import ConfigError, LmselectError
from lmselect.select.base import TEXT_SCORER_FILE, Selection, SelectionMethod, register
from lmselect.select.texts import one_line, pool_texts, selection_texts
from lmselect.select.topk import top_fraction

TARGET, POOL = "__label__target", "__label__pool"


@dataclass
class FastTextConfig:
    negatives: Literal["holdout", "candidates"] = "holdout"  # see the module docstring
    negatives_per_positive: float = 1.0  # negatives drawn per positive (capped by what the source holds)
    min_target_items: int = 4  # fewer selection-set items with words than this: an error, not a meaningless model
    # fastText supervised settings (DCLM's training script defaults, wordNgrams = 2: the bigram classifier)
    word_ngrams: int = 2
    dim: int = 100
    lr: float = 0.1
    epoch: int = 5
    min_count: int = 1
    bucket: int = 2_000_000  # hashed n-gram buckets (fastText's default); memory = (vocab + bucket) · dim · 4 bytes


def import_fasttext() -> Any:
    """The fastText bindings, or a one-line error saying which package to install."""
    try:
        import fasttext
    except Exception as e:  # noqa: BLE001 - a missing or broken binary wheel: one line, not a traceback
        raise LmselectError(f"fasttext: the fastText bindings do not import ({type(e).__name__}: {e}); install them "
                            "with `pip install fasttext-numpy2-wheel==0.9.2`") from None
    if not hasattr(fasttext, "train_supervised"):
        raise LmselectError(f"fasttext: {getattr(fasttext, '__file__', 'fasttext')} is not the fastText bindings "
                            "(no train_supervised); install fasttext-numpy2-wheel==0.9.2")
    return fasttext


def _clean(texts: list[str]) -> list[str]:
    return [one_line(t) for t in texts]


# Why a child process. fastText 0.9.2 initialises the input matrix in 10 blocks of which ``thread`` are filled
# (fastText src/densematrix.cc, DenseMatrix::uniformThread: ``blockSize = (m_ * n_) / 10``, one block per thread);
# with thread = 1 the other 90 % are whatever the allocation held, and the wheel does not zero them. A fresh mmap
# (the kernel's zero pages) makes them 0; a reused heap chunk makes them garbage: the same call then gives other
# numbers or "Encountered NaN" (measured: repeated identical trainings in one process differ; MALLOC_PERTURB_=42
# breaks every one). A child process with glibc's mmap threshold fixed at 128 KiB (no dynamic raise) always maps
# the matrix fresh, so training with thread = 1 is deterministic, and the parent's allocator is left alone.
_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
#: the matrix (bucket · dim floats) must exceed the fixed threshold to be mapped fresh
MIN_MATRIX_FLOATS = 131072 // 4


def _child(work: str) -> None:
    """Child-process entry: train on ``work/train.txt`` with ``work/args.json``, write P(target) of each line of
    ``work/predict.txt`` to ``work/p.npy``."""
    import json

    ft = import_fasttext()
    args = json.loads(open(os.path.join(work, "args.json")).read())
    model = ft.train_supervised(input=os.path.join(work, "train.txt"), **args)
    with open(os.path.join(work, "predict.txt"), encoding="utf-8") as f:
        texts = f.read().split("\n")[:-1]
    out = np.zeros(len(texts), dtype=np.float64)
    idx = [i for i, t in enumerate(texts) if t.split()]
    if idx:
        labels, probs = model.predict([texts[i] for i in idx], k=-1)  # every label, sorted by probability
        for i, lab, p in zip(idx, labels, probs):
            d = dict(zip(lab, np.asarray(p, dtype=np.float64)))
            out[i] = min(1.0, max(0.0, d.get(TARGET, 0.0)))  # fastText's softmax can exceed 1 by a rounding ulp
    np.save(os.path.join(work, "p.npy"), out)
    with open(os.path.join(work, "info.json"), "w") as f:
        json.dump({"vocabulary": len(model.words)}, f)


def _write_training(d: str, positives: list[str], negatives: list[str], cfg: FastTextConfig, seed: int) -> None:
    """``d/train.txt`` (labelled examples in a seeded shuffled order: fastText's SGD sees them in file order) and
    ``d/args.json`` (the supervised settings, single-threaded, seeded)."""
    import json

    pos = [f"{TARGET} {t}" for t in _clean(positives) if t.split()]
    neg = [f"{POOL} {t}" for t in _clean(negatives) if t.split()]
    if not pos or not neg:
        raise LmselectError(f"fasttext: no {'positive' if not pos else 'negative'} example has any word after "
                            "normalisation; the classifier needs text on both sides (check the selection set / pool)")
    rows = pos + neg
    order = np.random.default_rng(seed).permutation(len(rows))
    args = {"wordNgrams": cfg.word_ngrams, "dim": cfg.dim, "lr": cfg.lr, "epoch": cfg.epoch, "minCount": cfg.min_count,
            "bucket": cfg.bucket, "loss": "softmax", "thread": 1, "seed": int(seed % (2**31 - 1)), "verbose": 0}
    with open(os.path.join(d, "train.txt"), "w", encoding="utf-8") as f:
        f.write("".join(rows[i] + "\n" for i in order))
    with open(os.path.join(d, "args.json"), "w") as f:
        json.dump(args, f)


def _train_and_predict(d: str, texts: list[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """Train on ``d/train.txt`` with ``d/args.json`` in a child process (see ``_CHILD_ENV``) and return
    P(target | t) of each of ``texts`` and facts about the model."""
    import json
    import subprocess
    import sys


    with open(os.path.join(d, "predict.txt"), "w", encoding="utf-8") as f:
        f.write("".join(t + "\n" for t in _clean(texts)))
    src = os.path.dirname(os.path.dirname(os.path.abspath(lmselect.__file__)))
    env = {**os.environ, **_CHILD_ENV, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    env.pop("MALLOC_PERTURB_", None)
    code = "import sys; from lmselect.select.fasttext import _child; _child(sys.argv[1])"
    r = subprocess.run([sys.executable, "-c", code, d], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no message"])[-1][:300]
        raise LmselectError(f"fasttext: training the classifier failed ({last}); lower fasttext.lr or check "
                            "that the selection set and the pool hold text")
    return np.load(os.path.join(d, "p.npy")), json.loads(open(os.path.join(d, "info.json")).read())


def classify(positives: list[str], negatives: list[str], texts: list[str], cfg: FastTextConfig,
             seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Train a fastText supervised model of ``positives`` (label target) against ``negatives`` (label pool)
    single-threaded with ``seed`` (deterministic), and return P(target | t) for each of ``texts`` (0 for a text
    with no word) and facts about the model. Runs in a child process (see ``_CHILD_ENV``)."""
    import_fasttext()  # a broken binding: one line, before the child starts
    with tempfile.TemporaryDirectory(prefix="lmselect-fasttext-") as d:
        _write_training(d, positives, negatives, cfg, seed)
        return _train_and_predict(d, texts)


#: candidates whose texts and scores a saved text scorer keeps to prove that its retrained classifier is the round's
N_PROBES = 4


class FastTextTextScorer:
    """The classifier of one round, for scoring raw text (``lmselect score --jsonl``, the datatrove step).

    Saved as its training data and settings (``train.txt``, ``args.json``), not as a model file: a bigram model with
    fastText's 2M hash buckets is 800 MB, and single-threaded training in a fresh child process is deterministic
    (see ``_CHILD_ENV``), so retraining gives the round's classifier bit for bit in about a second at demo size.
    Every :meth:`score_texts` call retrains once and also scores ``N_PROBES`` of the round's candidates, which must
    get exactly the round's scores (``text_scorer.json`` ``probe_p``); otherwise it refuses. Score large batches."""

    description = "fastText P(target)"

    def __init__(self, path: str | os.PathLike):
        import json


        self.path = os.fspath(path)
        for f in (TEXT_SCORER_FILE, "train.txt", "args.json"):
            if not os.path.isfile(os.path.join(self.path, f)):
                raise LmselectError(f"{self.path}: incomplete fastText text scorer (no {f})")
        self.meta = json.loads(open(os.path.join(self.path, TEXT_SCORER_FILE)).read())

    def score_texts(self, texts: Any) -> np.ndarray:
        import shutil

        import_fasttext()
        texts, probes = list(texts), list(self.meta.get("probe_texts", []))
        with tempfile.TemporaryDirectory(prefix="lmselect-fasttext-") as d:
            for f in ("train.txt", "args.json"):
                shutil.copyfile(os.path.join(self.path, f), os.path.join(d, f))
            p, _ = _train_and_predict(d, probes + texts)
        if not np.array_equal(p[: len(probes)], np.asarray(self.meta.get("probe_p", []), dtype=np.float64)):
            raise LmselectError(f"{self.path}: the retrained fastText classifier does not reproduce the round's scores "
                                "(a different fasttext binding or platform?); rescore inside the run instead")
        return p[len(probes):]


def _save_text_scorer(out: str | os.PathLike, train: str, args: str, probe_texts: list[str], probe_p: np.ndarray,
                      info: dict[str, Any]) -> None:
    import json


    os.makedirs(out, exist_ok=True)
    for name, text in (("train.txt", train), ("args.json", args)):
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            f.write(text)
    meta = {"method": "fasttext", "format": 1, "score": FastTextTextScorer.description, **info,
            "probe_texts": probe_texts, "probe_p": [float(x) for x in probe_p]}
    with open(os.path.join(out, TEXT_SCORER_FILE), "w") as f:
        json.dump(meta, f, indent=1)


def holdout_ids(ctx: RoundContext) -> np.ndarray:
    """Shard 0 minus the warm-up's sequences: pool text in no candidate shard."""
    return np.setdiff1d(np.asarray(ctx.pool.ids(0), dtype=np.int64), np.asarray(ctx.run.warmup_ids(), dtype=np.int64))


def negative_ids(ctx: RoundContext, cfg: FastTextConfig, n_pos: int, seed: int) -> np.ndarray:
    """The seeded sample of negatives (sorted ids)."""
    src = holdout_ids(ctx) if cfg.negatives == "holdout" else np.asarray(ctx.candidates, dtype=np.int64)
    if len(src) == 0:
        raise ConfigError("recipe key 'fasttext.negatives': 'holdout' needs part of shard 0 the warm-up did not train "
                          "on (warmup.fraction < 1); set warmup.fraction below 1 or fasttext.negatives: candidates",
                          key="fasttext.negatives")
    n = min(len(src), max(1, int(round(cfg.negatives_per_positive * n_pos))))
    return np.sort(np.random.default_rng(seed).choice(src, size=n, replace=False))


@register
class FastTextFilter(SelectionMethod):
    """DCLM's fastText quality filter: a bigram classifier of selection-set text against pool text; keep the top
    fraction of candidates by P(target)."""

    name = "fasttext"
    description = "fastText bigram classifier (DCLM): selection-set text vs pool text, keep the top P(target)"
    config_cls = FastTextConfig
    needs = frozenset({"selection_set"})
    stages = ("scores", "selection", "target", "eval")
    collective = True  # seed-determined, single-threaded and cheap: every rank computes the same scores
    color = "#17becf"
    baseline = True  # what a practitioner runs instead: the report pairs every method with the best one

    def check_config(self) -> None:
        super().check_config()
        c = self.cfg
        if c.negatives not in ("holdout", "candidates"):
            raise ConfigError(f"recipe key 'fasttext.negatives': must be holdout or candidates, got {c.negatives!r}",
                              key="fasttext.negatives")
        for key in ("word_ngrams", "dim", "epoch", "min_count", "bucket", "min_target_items"):
            v = getattr(c, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"recipe key 'fasttext.{key}': must be an integer >= 1, got {v!r}", key=f"fasttext.{key}")
        for key in ("lr", "negatives_per_positive"):
            if not float(getattr(c, key)) > 0:
                raise ConfigError(f"recipe key 'fasttext.{key}': must be > 0, got {getattr(c, key)!r}", key=f"fasttext.{key}")
        if c.bucket * c.dim < MIN_MATRIX_FLOATS:
            raise ConfigError(f"recipe key 'fasttext.bucket': bucket · dim must be >= {MIN_MATRIX_FLOATS} (the "
                              f"deterministic-initialisation guard, see select/fasttext.py), got {c.bucket} · {c.dim}",
                              key="fasttext.bucket")

    def select(self, ctx: RoundContext) -> Selection:
        from lmselect.score import read_scores  # torch: discovery imports every method module; keep this one light
        from lmselect.score.sidecar import write_scores

        sdir = ctx.stage_dir("scores")
        if not is_complete(sdir, kind="scores"):
            seed = ctx.derived_seed(STREAM_METHOD)
            pos = selection_texts(ctx, "fasttext", self.cfg.min_target_items)
            neg_ids = negative_ids(ctx, self.cfg, len(pos), seed)
            cand_texts = pool_texts(ctx.pool, ctx.candidates)
            import_fasttext()
            with tempfile.TemporaryDirectory(prefix="lmselect-fasttext-") as d:
                _write_training(d, pos, pool_texts(ctx.pool, neg_ids), self.cfg, seed)
                p, model_info = _train_and_predict(d, cand_texts)
                train, args = (open(os.path.join(d, f), encoding="utf-8").read() for f in ("train.txt", "args.json"))
            info = {"positives": len(pos), "negatives": int(len(neg_ids)), "negatives_from": self.cfg.negatives,
                    **model_info}
            probes = [i for i, t in enumerate(cand_texts) if t.split()][:N_PROBES]

            def write() -> None:
                if not is_complete(sdir, kind="scores"):
                    write_scores(sdir, ctx.candidates, p, config={"fasttext": vars(self.cfg), "seed": seed},
                                 parents=[parent_ref(ctx.pool.path)], extra={"score": "P(target) of a fastText "
                                 "classifier", **info},
                                 write_extra=lambda tmp: _save_text_scorer(
                                     tmp / "text_scorer", train, args, [cand_texts[i] for i in probes], p[probes], info))

            ctx.run.main_only(write)
            ctx.run.sync()
        info = {k: v for k, v in read_manifest(sdir, kind="scores")["extra"].items()
                if k in ("positives", "negatives", "negatives_from", "vocabulary")}
        ids, p = read_scores(sdir)  # sorted by seq id, like ctx.candidates
        if not np.array_equal(ids, np.asarray(ctx.candidates, dtype=np.int64)):
            raise LmselectError(f"{sdir}: scores of other sequences than this round's candidates; delete it and rerun")
        scores = p.astype(np.float64)
        return Selection(top_fraction(ids, scores, ctx.fraction), scores=scores, parents=[parent_ref(sdir)],
                         extra={"score": "fastText P(target)", "p_target_median": float(np.median(scores)), **info})

    @classmethod
    def load_text_scorer(cls, path: Any) -> FastTextTextScorer:
        return FastTextTextScorer(path)

    def selection_flops(self, f: FlopContext) -> float:
        # a linear model: ~2·dim FLOPs per n-gram feature per epoch (train) and per candidate feature (predict),
        # counted per token as an upper bound on features; negligible next to any transformer pass
        c = self.cfg
        return float(2 * c.dim * f.seq_len * c.word_ngrams * f.shard_size * (1 + 2 * c.epoch))
