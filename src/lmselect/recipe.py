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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmselect.config import ConfigError, load_config, read_yaml
from lmselect.data.prepare import PrepareConfig
from lmselect.paths import DATA_DIR, RECIPES_DIR
from lmselect.select.blade import BladeConfig
from lmselect.select.bliss import BlissConfig
from lmselect.select.mates import MatesConfig
from lmselect.select.rho1 import Rho1Config
from lmselect.train.loop import TrainConfig

METHODS = ("random", "bliss", "mates", "rho1", "blade")
TOKEN_LEVEL = ("rho1", "blade")


@dataclass
class PoolSection:
    path: str | None = None  # an existing pool directory; when unset the run prepares RUN/pool from `prepare`
    prepare: PrepareConfig = field(default_factory=PrepareConfig)


@dataclass
class ValidationSection:
    lambada: str | None = "bundled:demo/lambada_val.jsonl"  # LAMBADA-style: loss on the final word only
    clean: str | None = "bundled:demo/clean_val.jsonl"  # held-out clean text: loss on all tokens
    select_on: str = "lambada"  # which set defines "good data" for BLISS / MATES / BLADE / RHO-1
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
class Recipe:
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
    bliss: BlissConfig = field(default_factory=BlissConfig)
    mates: MatesConfig = field(default_factory=MatesConfig)
    rho1: Rho1Config = field(default_factory=Rho1Config)
    blade: BladeConfig = field(default_factory=BladeConfig)
    score_batch_size: int = 64


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


def _check_exists(key: str, value: str | None, glob_ok: bool = False) -> None:
    if value is None:
        return
    if glob_ok and glob.glob(value):
        return
    if not Path(value).exists():
        raise ConfigError(f"recipe key '{key}': file not found: {value}")


def validate(r: Recipe, base: Path | None = None) -> Recipe:
    """Resolve paths and check everything that can be checked before compute; errors name the key."""
    from lmselect.models.presets import get_preset

    for key in ("target", "proxy"):
        sec: ModelSection = getattr(r, key)
        try:
            get_preset(sec.preset)
        except Exception as e:
            raise ConfigError(f"recipe key '{key}.preset': {e}") from None
        sec.init_from = resolve_path(sec.init_from, base)
        _check_exists(f"{key}.init_from", sec.init_from)
    try:
        get_preset(r.train.preset)
    except Exception:
        pass  # the train section's preset is ignored: target.preset wins
    bad = [m for m in r.methods if m not in METHODS]
    if bad:
        raise ConfigError(f"recipe key 'methods': unknown method '{bad[0]}' (known: {', '.join(METHODS)})")
    if not r.methods:
        raise ConfigError("recipe key 'methods': at least one method is needed")
    for key, frac in (("select_fraction", r.select_fraction), ("warmup.fraction", r.warmup.fraction)):
        if not 0.0 < frac <= 1.0:
            raise ConfigError(f"recipe key '{key}': fraction must be in (0, 1], got {frac}")
    for key, frac in (("rho1.keep_fraction", r.rho1.keep_fraction), ("blade.keep_fraction", r.blade.keep_fraction)):
        if not 0.0 < frac <= 1.0:
            raise ConfigError(f"recipe key '{key}': fraction must be in (0, 1], got {frac}")
    if r.rounds < 1:
        raise ConfigError(f"recipe key 'rounds': must be >= 1, got {r.rounds}")
    if r.lr_per_round not in ("constant", "halving"):
        raise ConfigError(f"recipe key 'lr_per_round': must be 'constant' or 'halving', got {r.lr_per_round!r}")
    if r.validation.select_on not in ("lambada", "clean"):
        raise ConfigError("recipe key 'validation.select_on': must be 'lambada' or 'clean'")
    r.validation.lambada = resolve_path(r.validation.lambada, base)
    r.validation.clean = resolve_path(r.validation.clean, base)
    _check_exists("validation.lambada", r.validation.lambada)
    _check_exists("validation.clean", r.validation.clean)
    if getattr(r.validation, r.validation.select_on) is None:
        raise ConfigError(f"recipe key 'validation.{r.validation.select_on}': the selection target set is unset")
    r.eval.task_data = resolve_path(r.eval.task_data, base)
    _check_exists("eval.task_data", r.eval.task_data)
    if r.pool.path is not None:
        r.pool.path = resolve_path(r.pool.path, base)
        _check_exists("pool.path", r.pool.path)
    else:
        inputs = [resolve_path(i, base) or i for i in r.pool.prepare.inputs]
        if not inputs:
            raise ConfigError("recipe key 'pool': set pool.path or pool.prepare.inputs")
        for i, v in enumerate(inputs):
            _check_exists(f"pool.prepare.inputs[{i}]", v, glob_ok=True)
        r.pool.prepare.inputs = inputs
        dec = r.pool.prepare.decontaminate  # bundled: paths stay as written: they label the protected sets
        dec.protected = [p if p.startswith("bundled:") else (resolve_path(p, base) or p) for p in dec.protected]
        dec.validate("pool.prepare.decontaminate.")
        if r.pool.prepare.n_shards < r.rounds + 1:
            raise ConfigError(
                f"recipe key 'pool.prepare.n_shards': need rounds + 1 = {r.rounds + 1} shards (shard 0 is the warm-up)"
            )
    return r


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load a recipe file (or the embedded demo when ``path`` is None or ``"demo"``) with overrides, validated."""
    if path is None or str(path) in ("demo", "demo.yaml"):
        path = RECIPES_DIR / "demo.yaml"
    p = Path(path)
    if not p.is_file() and (RECIPES_DIR / p.name).is_file() and not p.parent.name:
        p = RECIPES_DIR / p.name
    read_yaml(p)  # clear error for a missing / malformed file
    r = load_config(Recipe, p, overrides)
    return validate(r, base=p.resolve().parent)


def recipe_summary(r: Recipe) -> dict[str, Any]:
    return {
        "name": r.name, "methods": r.methods, "seeds": r.seeds, "rounds": r.rounds,
        "target": r.target.preset, "proxy": r.proxy.preset, "select_fraction": r.select_fraction,
    }
