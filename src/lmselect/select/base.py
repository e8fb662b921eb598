"""The selection-method interface and its registry.

A selection method is one file in ``lmselect/select/`` (or one package, e.g. ``select/bliss/``, whose ``__init__``
imports the module that registers it) that defines one :class:`SelectionMethod` subclass and registers it with
:func:`register`. Everything outside ``select/`` — the multi-round runner, recipe validation,
provenance, ``compare``, the report and its figures — reads the registry and never branches on a method's name::

    @register
    class Perplexity(SelectionMethod):
        name = "perplexity"
        config_cls = PerplexityConfig        # the recipe's ``perplexity:`` section (None: no settings)
        needs = frozenset({"proxy"})          # warm-up proxy; "selection_set": the method reads the selection set
        stages = ("scores", "selection", "target", "eval")

        def select(self, ctx: RoundContext) -> Selection: ...

Sequence-level methods implement :meth:`SelectionMethod.select` (which candidates the target trains on); token-level
methods (``level = "token"``) train on every candidate and implement :meth:`SelectionMethod.token_selector`, a
:class:`lmselect.train.hooks.TokenSelector` that masks the loss. :meth:`SelectionMethod.selection_flops` estimates
what the selection costs (forward = 2·N·tokens, forward+backward = 6·N·tokens; N from the presets), for the
exposure ledger and ``compare``.

Discovery: the registry imports every module and subpackage of the ``lmselect.select`` package once (so a new file
or package is found without editing a list; a subpackage is imported through its ``__init__``, not module by module)
and every ``lmselect.methods`` entry point (methods shipped by other packages).
"""

from __future__ import annotations

import difflib
import importlib
import logging
import pkgutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

import lmselect.select as pkg  # this package, for discovery (its __init__ imports nothing)
from lmselect.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from lmselect.context import FlopContext, RoundContext
    from lmselect.train.hooks import TokenSelector

log = logging.getLogger("lmselect.select")

#: what a method may ask the runner for
NEEDS = frozenset({"proxy", "selection_set"})
#: every stage directory a round can hold, in the order the runner makes them
STAGE_ORDER: tuple[str, ...] = ("bilevel", "influence", "scores", "selection", "target", "eval")


@dataclass
class Selection:
    """What a sequence-level method chose in one round.

    ``ids`` are candidate sequence ids (any order; the runner sorts them); ``scores`` (optional) has one value per
    candidate, aligned with ``RoundContext.candidates``, oriented so that **higher = preferred**; ``parents`` are
    ``parent_ref`` records of the artifacts the choice was derived from; ``extra`` goes into ``summary.json``;
    ``diagnostics`` (JSON values) are merged into the round's ``selection/diagnostics.json`` beside the generic
    selection diagnostics, e.g. BLISS's ``rank_stability`` (Spearman of the previous round's and this round's score
    models on the same candidates).
    """

    ids: np.ndarray
    scores: np.ndarray | None = None
    parents: list[dict[str, str]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)


class SelectionMethod:
    """Base class of every selection method (see the module docstring)."""

    #: registry key, recipe ``methods:`` entry and run-directory name
    name: ClassVar[str] = ""
    #: one line for ``--help`` and the report
    description: ClassVar[str] = ""
    #: dataclass of the method's settings: the recipe section ``<name>:`` (None: the method has none)
    config_cls: ClassVar[type | None] = None
    #: "sequence" (``select``) or "token" (``token_selector``)
    level: ClassVar[str] = "sequence"
    #: what the runner must provide (subset of NEEDS)
    needs: ClassVar[frozenset[str]] = frozenset()
    #: stage directories a round of this method writes, in order (a subset of STAGE_ORDER)
    stages: ClassVar[tuple[str, ...]] = ("selection", "target", "eval")
    #: artifacts kept once per method seed (``RUN/<name>/seed<k>/<stage>``), e.g. RHO-1's reference model
    seed_stages: ClassVar[tuple[str, ...]] = ()
    #: True: every rank runs ``select`` (collectives inside, or cheap and seed-determined); False: single-process
    #: code that rank 0 runs first, then the other ranks rerun it and only read what rank 0 wrote (it must be
    #: idempotent: return early on complete artifacts)
    collective: ClassVar[bool] = True
    #: colour of the method in every figure
    color: ClassVar[str | None] = None
    #: the control every comparison is paired with (exactly one registered method: random selection)
    control: ClassVar[bool] = False
    #: the control of the other methods of its ``level`` (random_tokens for the token-level methods): they are also
    #: paired with it, so that a token-level method is compared with a mask of the same size, not only with random
    level_control: ClassVar[bool] = False
    #: a cheap baseline practitioners would run instead of a model-based method (fasttext, dsir): the report pairs
    #: every method with the best of those in the run as well as with random, so a win over random is not mistaken
    #: for a win over what one would do anyway
    baseline: ClassVar[bool] = False
    #: a control arm whose answer is known (``compare --controls``): "positive" (selects the planted target-like
    #: documents: must help) or "negative" (selects known junk: must hurt); None for every real method. Such arms
    #: are left out of a comparison's default method list and read by the report's control verdicts and headroom
    known_answer: ClassVar[str | None] = None

    def __init__(self, cfg: Any = None):
        self.cfg = cfg

    def select(self, ctx: RoundContext) -> Selection:
        """Sequence level: choose which of ``ctx.candidates`` the target trains on this round."""
        raise NotImplementedError(f"{self.name}: a sequence-level method must implement select()")

    def token_selector(self, ctx: RoundContext) -> TokenSelector:
        """Token level: the loss mask the target (and its evaluation branch) trains with this round."""
        raise NotImplementedError(f"{self.name}: a token-level method must implement token_selector()")

    def resolved_config(self) -> Any:
        """The settings that determine this method's artifacts, with every default that depends on another key filled
        in (e.g. BLISS's profile options). Stage identity hashes this, so a changed profile value makes old stages
        stale even when the recipe text is unchanged. Default: ``cfg`` itself."""
        return self.cfg

    def check_config(self) -> None:
        """Raise ``ConfigError`` / ``LmselectError`` naming ``<name>.<key>`` for settings that cannot work; called
        when the recipe loads, before any compute. Default: only positive step / batch counts are checked."""
        import dataclasses

        if self.cfg is None or not dataclasses.is_dataclass(self.cfg):
            return
        for f in dataclasses.fields(self.cfg):
            v = getattr(self.cfg, f.name)
            if (f.name.endswith("steps") or f.name.endswith("batch_size") or f.name.startswith("n_")) \
                    and isinstance(v, int) and not isinstance(v, bool) and v < 0:
                raise ConfigError(f"recipe key '{self.name}.{f.name}': must be >= 0, got {v}")

    def model_contexts(self) -> list[tuple[str, str, int]]:
        """The models of its own this method builds from its settings, each as ``(recipe key, description, context
        length)``: the recipe checks that they hold the pool's sequences before any compute (MATES: its influence
        model when built from ``influence_preset``). A setting that names no usable model raises ``ConfigError``
        whose ``key`` is that recipe key and whose message is the reason alone (the recipe adds the key and where
        its value came from). Default: none (the method trains only the proxy / target)."""
        return []

    def data_files(self) -> list[str]:
        """Extra files the method reads (e.g. a reference corpus); the recipe checks them against the report sets."""
        return []

    def selection_flops(self, f: FlopContext) -> float:
        """Estimated FLOPs one round of selection costs (not counting the target's own training)."""
        return 0.0

    @classmethod
    def load_text_scorer(cls, path: Path) -> TextScorer:
        """The text scorer a round of this method saved in ``path`` (see :func:`load_text_scorer`). Methods that
        score raw text (``fasttext``, ``dsir``) override this; the others have none."""
        raise ConfigError(f"{path}: method '{cls.name}' saves no text scorer")


#: the file that marks a directory as a saved text scorer: ``{"method": NAME, "format": 1, ...}``
TEXT_SCORER_FILE = "text_scorer.json"


class TextScorer(Protocol):
    """A scorer of raw text that a text-feature method (``fasttext``, ``dsir``) saves in its round's ``scores``
    stage (``scores/text_scorer/``), so that ``lmselect score --jsonl`` and the datatrove step score whole documents
    with the classifier or importance weights of that round. Higher = preferred, as in the round's own scores."""

    #: what the score is (one line, e.g. "fastText P(target)")
    description: str

    def score_texts(self, texts: Sequence[str]) -> np.ndarray:
        """One float64 score per text, in order."""
        ...


def is_text_scorer(path: str | Path) -> bool:
    """Whether ``path`` (or its ``text_scorer/`` subdirectory) holds a saved text scorer."""
    p = Path(path)
    return (p / TEXT_SCORER_FILE).is_file() or (p / "text_scorer" / TEXT_SCORER_FILE).is_file()


def load_text_scorer(path: str | Path) -> TextScorer:
    """Load the text scorer saved in ``path`` (a ``text_scorer/`` directory, or the ``scores`` stage that holds one)
    through the registry: ``text_scorer.json`` names the method, whose ``load_text_scorer`` reads the rest."""
    import json

    p = Path(path)
    if not (p / TEXT_SCORER_FILE).is_file() and (p / "text_scorer" / TEXT_SCORER_FILE).is_file():
        p = p / "text_scorer"
    f = p / TEXT_SCORER_FILE
    if not f.is_file():
        raise ConfigError(f"{path}: no {TEXT_SCORER_FILE} (a fasttext or dsir round's scores/text_scorer directory)")
    try:
        meta = json.loads(f.read_text())
        name = meta["method"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{f}: not a text scorer description (need a JSON object with 'method')") from None
    return method_class(name).load_text_scorer(p)


_REGISTRY: dict[str, type[SelectionMethod]] = {}
_DISCOVERED = False


def register(cls: type[SelectionMethod]) -> type[SelectionMethod]:
    """Class decorator: add a method to the registry (its ``name`` must be new, its declarations valid)."""
    if not cls.name or not cls.name.isidentifier():
        raise TypeError(f"{cls.__name__}: a selection method needs an identifier `name`, got {cls.name!r}")
    if cls.level not in ("sequence", "token"):
        raise TypeError(f"{cls.__name__}: level must be 'sequence' or 'token', got {cls.level!r}")
    bad = set(cls.needs) - NEEDS
    if bad:
        raise TypeError(f"{cls.__name__}: unknown needs {sorted(bad)} (known: {sorted(NEEDS)})")
    if cls.known_answer not in (None, "positive", "negative"):
        raise TypeError(f"{cls.__name__}: known_answer must be None, 'positive' or 'negative', got {cls.known_answer!r}")
    bad_st = [s for s in cls.stages if s not in STAGE_ORDER]
    if bad_st or not {"target", "eval"} <= set(cls.stages):
        raise TypeError(f"{cls.__name__}: stages must be drawn from {STAGE_ORDER} and include target and eval")
    old = _REGISTRY.get(cls.name)
    if old is not None and old.__qualname__ != cls.__qualname__:
        raise TypeError(f"selection method '{cls.name}' is registered twice ({old.__module__}, {cls.__module__})")
    _REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    """Import every module and subpackage of this package (each method file registers itself; a method package
    registers through its ``__init__``) and the entry points, once."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name not in ("base", "cli"):
            importlib.import_module(f"{pkg.__name__}.{info.name}")
    try:
        from importlib.metadata import entry_points

        for ep in entry_points(group="lmselect.methods"):
            try:
                ep.load()
            except Exception as e:  # noqa: BLE001 - a broken plug-in must not break the built-in methods
                log.warning("selection-method plug-in %s could not be loaded: %s", ep.value, e)
    except Exception:  # pragma: no cover - importlib.metadata quirks
        pass


#: display order of the built-in methods; others follow alphabetically
_ORDER = ("random", "bliss", "mates", "rho1", "blade", "perplexity", "reference")


def method_names() -> list[str]:
    """Every registered method name, built-ins first in their usual order."""
    _discover()
    return sorted(_REGISTRY, key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n))


def method_class(name: str) -> type[SelectionMethod]:
    """The registered class for ``name``; an unknown name is a ConfigError with a "did you mean" hint."""
    _discover()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown selection method '{name}' (known: {', '.join(method_names())}){hint}")
    return _REGISTRY[name]


def get_method(name: str, cfg: Any = None) -> SelectionMethod:
    """An instance of method ``name`` with settings ``cfg`` (default: its config class's defaults)."""
    cls = method_class(name)
    if cfg is None and cls.config_cls is not None:
        cfg = cls.config_cls()
    return cls(cfg)


def control_name() -> str:
    """The registered control method (``control = True``): the baseline of every paired comparison."""
    _discover()
    names = [n for n, c in _REGISTRY.items() if c.control]
    if len(names) != 1:
        raise ConfigError(f"exactly one selection method must be the control, found {names}")
    return names[0]


def level_control_name(level: str) -> str | None:
    """The registered control of the methods of ``level`` (``level_control = True``), or None."""
    _discover()
    names = sorted(n for n, c in _REGISTRY.items() if c.level_control and c.level == level)
    if len(names) > 1:
        raise ConfigError(f"at most one {level}-level control may be registered, found {names}")
    return names[0] if names else None


def baseline_names() -> list[str]:
    """The registered cheap baselines (``baseline = True``), sorted."""
    _discover()
    return sorted(n for n, c in _REGISTRY.items() if c.baseline)


def known_answer_controls() -> dict[str, str]:
    """The registered known-answer control arms: name -> "positive" / "negative" (``known_answer``)."""
    _discover()
    return {n: c.known_answer for n, c in sorted(_REGISTRY.items()) if c.known_answer is not None}


def comparable_method_names() -> list[str]:
    """Every registered method except the known-answer controls: what a comparison runs by default."""
    return [n for n in method_names() if method_class(n).known_answer is None]


def method_color(name: str) -> str | None:
    """The declared figure colour of a method (None for unknown names or methods that declare none)."""
    _discover()
    cls = _REGISTRY.get(name)
    return cls.color if cls is not None else None
