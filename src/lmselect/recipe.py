"""Recipes: the typed configuration of a whole multi-round data-selection experiment.

A recipe names the pool (an existing pool directory, or corpus files to prepare), the validation sets, the target
and proxy presets, the warm-up, the per-round training budget and schedule shared by **all** methods, the evaluation
branch, and the settings of every method. ``lmselect run RECIPE.yaml --key.sub=value`` resolves and validates it at
load time: an unknown preset or method, a fraction outside (0, 1], or a missing file fails before any compute, with
a message naming the key.

Paths may be absolute, relative to the working directory, relative to the recipe file, or ``bundled:REL`` for data
shipped in the repository's ``data/`` folder (the demo corpus, LAMBADA slice and eval-task slices).
"""

from __future__ import annotations

import glob
import hashlib
import json
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any

from lmselect.artifacts import is_complete, read_manifest
from lmselect.config import ConfigError, check_fraction, load_config, parse_overrides, read_yaml
from lmselect.data.prefilter import normalize_names, validate_names
from lmselect.data.prepare import PrepareConfig
from lmselect.data.valset import read_texts
from lmselect.errors import LmselectError
from lmselect.models.presets import get_preset
from lmselect.paths import DATA_DIR, RECIPES_DIR
from lmselect.select.base import method_class, method_names
from lmselect.train.loop import TrainConfig


@dataclass
class PoolSection:
    path: str | None = None  # an existing pool directory; when unset the run prepares RUN/pool from `prepare`
    prepare: PrepareConfig = field(default_factory=PrepareConfig)


@dataclass
class ValidationSection:
    """Two roles, disjoint by construction (checked by item content at load time).

    ``selection`` is everything any method may look at (BLISS's v, MATES's probe loss, RHO-1's default reference
    text, BLADE's L_val). ``lambada`` and ``clean`` are **report** sets: only ever evaluated, never seen by a method,
    a reference or a probe; every table, plot and results.json headline is computed on them."""

    selection: str | None = "bundled:demo/lambada_select.jsonl"
    selection_kind: str = "lambada"  # lambada: the loss counts the final word; text: every token
    lambada: str | None = "bundled:demo/lambada_report.jsonl"  # report: LAMBADA-style final-word loss
    clean: str | None = "bundled:demo/clean_val.jsonl"  # report: held-out clean text, all tokens
    max_items: int = 256
    seq_len: int = 128
    batch_size: int = 32


@dataclass
class ModelSection:
    preset: str = "debug"
    init_from: str | None = None  # optional HF checkpoint dir (must share the pool's tokenizer)


@dataclass
class WarmupSection:
    fraction: float = 0.2  # random fraction of shard 0 (METHODS §1.3 step 0)
    steps: int = 100


@dataclass
class DecaySection:
    """Evaluation branch (METHODS §1.3e): a short LR decay from the round's checkpoint; the main run continues undecayed."""

    steps: int = 20
    halve_every: int = 5


@dataclass
class EvalSection:
    downstream: bool = True
    tasks: list[str] = field(
        default_factory=lambda: [
            "sciq", "arc_easy", "arc_challenge", "logiqa", "openbookqa", "boolq", "hellaswag", "piqa", "winogrande",
            "lambada_openai",
        ]
    )
    task_data: str | None = None  # None = bundled slices; a directory of full task files (the layout data/tasks/ uses) for full runs
    limit: int | None = None
    batch_size: int = 16


@dataclass
class RecipeBase:
    name: str = "run"
    seed: int = 0
    out: str | None = None  # default run directory (the CLI's --out wins)
    pool: PoolSection = field(default_factory=PoolSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    target: ModelSection = field(default_factory=ModelSection)
    proxy: ModelSection = field(default_factory=ModelSection)
    warmup: WarmupSection = field(default_factory=WarmupSection)
    rounds: int = 2
    select_fraction: float = 0.2
    round_steps: int = 100  # target optimizer steps per round, the same for every method (equal token budget)
    lr_per_round: str = "constant"  # "constant" (MATES) or "halving" (BLISS code: lr · 0.5^r)
    methods: list[str] = field(default_factory=lambda: ["random", "bliss"])
    seeds: list[int] = field(default_factory=lambda: [0])
    train: TrainConfig = field(default_factory=TrainConfig)
    decay: DecaySection = field(default_factory=DecaySection)
    eval: EvalSection = field(default_factory=EvalSection)
    score_batch_size: int = 64


def _method_sections() -> list[tuple[str, type, Any]]:
    """One recipe section per registered method that has settings: ``<name>: <its config class>``."""
    out = []
    for name in method_names():
        cls = method_class(name).config_cls
        if cls is not None:
            out.append((name, cls, field(default_factory=cls)))
    return out


#: The recipe: the fixed sections above plus one section per registered selection method (``bliss:``, ``mates:``,
#: ...), so a new method file brings its recipe section with it.
Recipe = make_dataclass("Recipe", _method_sections(), bases=(RecipeBase,))
Recipe.__module__ = __name__
Recipe.__doc__ = "A whole multi-round data-selection experiment (see the module docstring)."


def resolve_path(value: str | None, base: Path | None = None) -> str | None:
    """``bundled:rel`` -> repository data folder; relative paths: cwd first, then the recipe's folder."""
    if value is None:
        return None
    if value.startswith("bundled:"):
        return str(DATA_DIR / value[len("bundled:") :])
    p = Path(value).expanduser()
    if p.is_absolute() or base is None or glob.glob(str(p)) or p.exists():
        return str(p)
    alt = base / p
    return str(alt) if glob.glob(str(alt)) or alt.exists() else str(p)


def _check_exists(key: str, value: str | None, glob_ok: bool = False, origin: str = "") -> None:
    if value is None:
        return
    if glob_ok and glob.glob(value):
        return
    if not Path(value).exists():
        raise ConfigError(f"recipe key '{key}'{origin}: file not found: {value}")


def item_digests(path: str) -> dict[str, int]:
    """Content hash of every item of a validation / text file -> its 1-based line number (normalised whitespace)."""
    out: dict[str, int] = {}
    for n, text in enumerate(read_texts(Path(path)), start=1):
        out.setdefault(hashlib.sha1(" ".join(text.split()).encode()).hexdigest(), n)
    return out


def check_disjoint(seen: dict[str, str], report: dict[str, str]) -> None:
    """Refuse any item shared by a set a method sees (``seen``: key -> file) and a report set (key -> file)."""
    digests = {k: item_digests(p) for k, p in {**seen, **report}.items()}
    for sk, sp in seen.items():
        for rk, rp in report.items():
            common = digests[sk].keys() & digests[rk].keys()
            if common:
                first = min(common, key=lambda h: digests[sk][h])
                raise ConfigError(
                    f"recipe keys '{sk}' and '{rk}' share {len(common)} item(s) (first: line {digests[sk][first]} of "
                    f"{sp} = line {digests[rk][first]} of {rp}); a report set must be disjoint from everything a "
                    "method, reference or probe sees"
                )


class _Origins:
    """Where a recipe key's value came from: the command line (an override) or the recipe file."""

    def __init__(self, path: Path | None, overrides: list[str] | tuple[str, ...]):
        self.path = path
        self.flat = json.loads(json.dumps(_flatten(parse_overrides(overrides)), default=str))

    def __call__(self, key: str) -> str:
        for k, v in self.flat.items():
            if k == key or key.startswith(k + ".") or k.startswith(key + "."):
                return f" (from the command line: --{k}={v})"
        return f" (from {self.path})" if self.path else ""


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def validate(r: Any, base: Path | None = None, origin: Any = None) -> Any:
    """Resolve paths and check everything that can be checked before compute; errors name the key and its origin."""
    where = origin or (lambda key: "")

    def need(ok: bool, key: str, what: str, value: Any) -> None:
        if not ok:
            raise ConfigError(f"recipe key '{key}'{where(key)}: {what}, got {value!r}")

    for key in ("target", "proxy"):
        sec: ModelSection = getattr(r, key)
        try:
            get_preset(sec.preset)
        except Exception as e:
            raise ConfigError(f"recipe key '{key}.preset'{where(key + '.preset')}: {e}") from None
        sec.init_from = resolve_path(sec.init_from, base)
        _check_exists(f"{key}.init_from", sec.init_from, origin=where(f"{key}.init_from"))
    need(bool(r.methods), "methods", "at least one method is needed", r.methods)
    for m in r.methods:
        try:
            method_class(m)
        except ConfigError as e:
            raise ConfigError(f"recipe key 'methods'{where('methods')}: {e}") from None
    need(len(set(r.methods)) == len(r.methods), "methods", "each method at most once", r.methods)
    need(bool(r.seeds) and all(0 <= s < 1000 for s in r.seeds) and len(set(r.seeds)) == len(r.seeds), "seeds",
         "distinct method seeds in 0..999", r.seeds)
    for key in ("select_fraction", "warmup.fraction", *(f"{m}.keep_fraction" for m in r.methods
                                                        if hasattr(getattr(r, m, None), "keep_fraction"))):
        sec, _, leaf = key.rpartition(".")
        check_fraction(getattr(getattr(r, sec) if sec else r, leaf), f"recipe key '{key}'", where(key))
    for key, val, lo in (("rounds", r.rounds, 1), ("round_steps", r.round_steps, 1), ("warmup.steps", r.warmup.steps, 1),
                         ("decay.steps", r.decay.steps, 0), ("decay.halve_every", r.decay.halve_every, 1),
                         ("train.global_batch", r.train.global_batch, 1), ("score_batch_size", r.score_batch_size, 1),
                         ("validation.max_items", r.validation.max_items, 1), ("validation.seq_len", r.validation.seq_len, 2),
                         ("validation.batch_size", r.validation.batch_size, 1), ("eval.batch_size", r.eval.batch_size, 1)):
        need(val >= lo, key, f"must be >= {lo}", val)
    need(r.rounds < 100, "rounds", "must be < 100", r.rounds)
    need(r.train.optim.lr > 0, "train.optim.lr", "must be > 0", r.train.optim.lr)
    need(r.eval.limit is None or r.eval.limit > 0, "eval.limit", "must be > 0 or null", r.eval.limit)
    need(r.lr_per_round in ("constant", "halving"), "lr_per_round", "must be 'constant' or 'halving'", r.lr_per_round)
    v = r.validation
    need(v.selection_kind in ("lambada", "text"), "validation.selection_kind", "must be 'lambada' or 'text'",
         v.selection_kind)
    for key in ("selection", "lambada", "clean"):
        setattr(v, key, resolve_path(getattr(v, key), base))
        _check_exists(f"validation.{key}", getattr(v, key), origin=where(f"validation.{key}"))
    methods = [method_class(m) for m in r.methods]
    if v.selection is None and any("selection_set" in m.needs for m in methods):
        users = ", ".join(m.name for m in methods if "selection_set" in m.needs)
        raise ConfigError(f"recipe key 'validation.selection'{where('validation.selection')}: unset, but {users} "
                          "need a selection set")
    need(v.lambada is not None or v.clean is not None, "validation", "at least one report set (lambada or clean)",
         None)
    # each method checks its own settings (ranges, profiles) before any compute; every section, used or not, like
    # unknown keys: a broken section in a shipped recipe must not wait for the day someone enables the method
    for m in (method_class(n) for n in method_names()):
        sec = getattr(r, m.name, None)
        try:
            m(sec).check_config()
        except LmselectError as e:
            key = getattr(e, "key", None) or m.name
            raise ConfigError(f"{str(e).rstrip('.')}{where(key if '.' in key else m.name)}") from None
    # Everything a method sees must be disjoint from the report sets (by item content).
    seen = {"validation.selection": v.selection} if v.selection else {}
    for m in methods:
        sec = getattr(r, m.name, None)
        files = m(sec).data_files() if sec is not None else []
        for i, f in enumerate(files):
            path = resolve_path(f, base)
            _check_exists(f"{m.name}.data_files[{i}]", path, origin=where(m.name))
            seen[f"{m.name} data file {f}"] = path
    check_disjoint(seen, {f"validation.{k}": getattr(v, k) for k in ("lambada", "clean") if getattr(v, k)})
    r.eval.task_data = resolve_path(r.eval.task_data, base)
    _check_exists("eval.task_data", r.eval.task_data, origin=where("eval.task_data"))
    if r.pool.path is not None:
        r.pool.path = resolve_path(r.pool.path, base)
        _check_exists("pool.path", r.pool.path, origin=where("pool.path"))
    else:
        inputs = [resolve_path(i, base) or i for i in r.pool.prepare.inputs]
        if not inputs:
            raise ConfigError("recipe key 'pool': set pool.path or pool.prepare.inputs")
        for i, val in enumerate(inputs):
            _check_exists(f"pool.prepare.inputs[{i}]", val, glob_ok=True, origin=where("pool.prepare.inputs"))
        r.pool.prepare.inputs = inputs
        if r.pool.prepare.tokenizer:
            r.pool.prepare.tokenizer = resolve_path(r.pool.prepare.tokenizer, base)
            _check_exists("pool.prepare.tokenizer", r.pool.prepare.tokenizer, origin=where("pool.prepare.tokenizer"))
        dec = r.pool.prepare.decontaminate  # bundled: paths stay as written: they label the protected sets
        dec.protected = [p if p.startswith("bundled:") else (resolve_path(p, base) or p) for p in dec.protected]
        dec.validate("pool.prepare.decontaminate.")
        r.pool.prepare.prefilter = normalize_names(r.pool.prepare.prefilter)
        validate_names(r.pool.prepare.prefilter, "pool.prepare.prefilter")
        need(r.pool.prepare.n_shards >= r.rounds + 1, "pool.prepare.n_shards",
             f"need rounds + 1 = {r.rounds + 1} shards (shard 0 is the warm-up)", r.pool.prepare.n_shards)
    check_context_lengths(r, where)
    return r


def _pool_seq_len(r: Any) -> tuple[int | None, str]:
    """The pool's sequence length and the key it comes from: an existing pool's manifest, else ``pool.prepare``."""
    if r.pool.path is not None:
        if not is_complete(r.pool.path, "pool"):
            return None, "pool.path"  # prepared elsewhere later, or not a pool: the pipeline says so
        return int(read_manifest(r.pool.path, kind="pool")["extra"]["seq_len"]), "pool.path"
    return int(r.pool.prepare.seq_len), "pool.prepare.seq_len"


def _checkpoint_context(path: str) -> int | None:
    """``max_position_embeddings`` of an HF checkpoint directory's config.json (None when it has none)."""
    cfg = Path(path) / "config.json"
    try:
        v = json.loads(cfg.read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        return None
    return int(v) if isinstance(v, int) else None


def check_context_lengths(r: Any, where: Any = None) -> None:
    """Every model must hold the sequences it is given, checked when the recipe loads rather than after hours of
    warm-up: the pool's ``seq_len`` against the target, the proxy (the score-model backbone), an ``init_from``
    checkpoint and a method's own model (MATES ``influence_preset``); ``validation.seq_len`` and a method's
    ``seq_len`` (RHO-1's / the reference's text packing) against the models that read them."""
    where = where or (lambda key: "")
    models: list[tuple[str, str, int]] = []  # (key, description, context)
    for key in ("target", "proxy"):
        sec = getattr(r, key)
        models.append((f"{key}.preset", f"{key} preset '{sec.preset}'", get_preset(sec.preset).max_position_embeddings))
        if sec.init_from:
            ctx = _checkpoint_context(sec.init_from)
            if ctx is not None:
                models.append((f"{key}.init_from", f"{key}.init_from checkpoint {sec.init_from}", ctx))
    for name in r.methods:  # the models a method builds of its own (MATES: a fresh influence_preset)
        try:
            models += method_class(name)(getattr(r, name, None)).model_contexts()
        except ConfigError as e:
            key = e.key or name
            raise ConfigError(f"recipe key '{key}'{where(key)}: {e}", key=key) from None

    def fits(length: int, length_key: str, src: str, targets: list[tuple[str, str, int]]) -> None:
        for key, what, ctx in targets:
            if length > ctx:  # blame the model for the pool's length, the length key for the others
                blame = key if length_key.startswith("pool") else length_key
                raise ConfigError(
                    f"recipe key '{blame}'{where(blame)}: the {what} holds {ctx} tokens, but {src} is {length}; "
                    "choose a preset with a longer context or a shorter sequence length")

    seq_len, key = _pool_seq_len(r)
    if seq_len is not None:
        src = f"the sequence length of the pool at {r.pool.path}" if key == "pool.path" else "pool.prepare.seq_len"
        fits(seq_len, key, src, models)
    fits(r.validation.seq_len, "validation.seq_len", "validation.seq_len", models[:2])
    for m in r.methods:
        sec = getattr(r, m, None)
        if isinstance(getattr(sec, "seq_len", None), int):
            fits(sec.seq_len, f"{m}.seq_len", f"{m}.seq_len", [x for x in models if x[0].startswith("target")])


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Load a recipe file (or the embedded demo when ``path`` is None or ``"demo"``) with overrides, validated."""
    if path is None or str(path) in ("demo", "demo.yaml"):
        path = RECIPES_DIR / "demo.yaml"
    p = Path(path)
    if not p.is_file() and (RECIPES_DIR / p.name).is_file() and not p.parent.name:
        p = RECIPES_DIR / p.name
    read_yaml(p)  # clear error for a missing / malformed file
    r = load_config(Recipe, p, overrides)
    return validate(r, base=p.resolve().parent, origin=_Origins(p, overrides))


def recipe_summary(r: Recipe) -> dict[str, Any]:
    return {
        "name": r.name, "methods": r.methods, "seeds": r.seeds, "rounds": r.rounds,
        "target": r.target.preset, "proxy": r.proxy.preset, "select_fraction": r.select_fraction,
    }
