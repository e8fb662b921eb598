"""Provenance of a run directory: lineage tree, stage status and changed-parent flags, from manifests alone.

Everything here reads files under the run directory (``manifest.json``, ``config.yaml``); nothing touches live state,
so ``lmselect inspect`` and ``lmselect report`` work on a finished run, a run in progress, or a copy of either.

* :func:`stage_status` -- per method / seed / round (and per stage inside a round): ``done`` (complete manifest),
  ``partial`` (directory exists but has no manifest, an unreadable one, or one marked ``partial``), ``missing``
  (expected by the run's plan -- methods x seeds x rounds -- but absent).
* :func:`lineage` -- a tree of the artifact directories below a path, each node with kind, uuid, status and its
  recorded parents checked against the parents' *current* manifests: a parent whose uuid differs from the one the
  child recorded was rebuilt after the child was made (``changed``); a parent that is gone is ``missing``; one whose
  directory exists without a complete manifest is ``incomplete``. Such nodes are *stale*.
* :func:`print_lineage` -- what ``lmselect inspect RUN_DIR`` prints.

The run's plan is read from ``RUN/config.yaml`` (keys ``methods``, ``seeds``, ``rounds`` at top level or under
``pipeline:`` / ``run:``), falling back to ``RUN/manifest.json`` ``extra.{methods,seeds,rounds}``.
Rounds are numbered 1..R (METHODS §1.3) unless the directory already holds a ``round0``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from lmselect.artifacts import MANIFEST, LmselectError, ParentCheck, check_parents, read_manifest_loose
from lmselect.layout import POOL, WARMUP, WARMUP_MODELS, RunLayout, parse_round, parse_seed, round_name, seed_name
from lmselect.select.base import STAGE_ORDER as _SELECT_STAGE_ORDER
from lmselect.select.base import method_class, method_names
from lmselect.stages import find_stale

DONE, PARTIAL, MISSING = "done", "partial", "missing"

#: stages a round of a method not in the registry (e.g. a plug-in that is not installed) is expected to have
DEFAULT_STAGES: tuple[str, ...] = ("target", "eval")
STAGE_ORDER: tuple[str, ...] = ("reference",) + _SELECT_STAGE_ORDER

# directories never descended into when looking for artifacts
_SKIP_DIRS = {"tokenizer", "tb", "wandb", "figures", "__pycache__"}


# ----------------------------------------------------------------------------------------------------------------
# small readers


def dir_status(d: str | Path) -> str:
    """``done`` / ``partial`` / ``missing`` for one artifact directory (see module docstring)."""
    d = Path(d)
    if not d.is_dir():
        return MISSING
    m = read_manifest_loose(d)
    if m is None:
        return PARTIAL
    return DONE if m.get("status", "complete") == "complete" else PARTIAL


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """``RUN/config.yaml`` as a dict ({} when absent); a malformed file is a one-line LmselectError."""
    import yaml

    p = Path(run_dir) / "config.yaml"
    if not p.is_file():
        return {}
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise LmselectError(f"{p}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise LmselectError(f"{p}: top level must be a mapping")
    return data


def _lookup(cfg: dict[str, Any], key: str) -> Any:
    if key in cfg:
        return cfg[key]
    for section in ("pipeline", "run"):
        sub = cfg.get(section)
        if isinstance(sub, dict) and key in sub:
            return sub[key]
    return None


def _known_methods() -> list[str]:
    return method_names()


def _expected_stages_of(method: str) -> tuple[str, ...]:
    try:
        return method_class(method).stages
    except LmselectError:
        return DEFAULT_STAGES


def _method_sort_key(name: str) -> tuple[int, str]:
    known = _known_methods()
    return (known.index(name) if name in known else len(known), name)


@dataclass
class RunPlan:
    """What a run directory is expected to contain: methods x seeds x rounds."""

    methods: list[str]
    seeds: list[int]
    rounds: list[int]


def run_plan(run_dir: str | Path) -> RunPlan:
    """The expected methods / seeds / rounds (``config.yaml`` first, then the run manifest's ``extra``).

    ``seeds`` is a list of seed values (a bare int n means n seeds ``seed, seed+1, ...``); ``rounds`` an int R
    (rounds 1..R, or 0..R-1 when a ``round0`` directory exists) or an explicit list."""
    run_dir = Path(run_dir)
    m = read_manifest_loose(run_dir) or {}
    extra = m.get("extra") if isinstance(m.get("extra"), dict) else {}
    cfg = read_run_config(run_dir)

    def pick(key: str) -> Any:  # config.yaml (what a resumed run will do) first, then the run manifest
        v = _lookup(cfg, key)
        return v if v is not None else (extra.get(key) if extra else None)

    methods_v = pick("methods")
    if isinstance(methods_v, str):
        methods_v = [s for s in methods_v.split(",") if s]
    methods = [str(x) for x in (methods_v or [])]

    seeds_v = pick("seeds")
    base_seed = _lookup(cfg, "seed")
    base_seed = int(base_seed) if isinstance(base_seed, int) and not isinstance(base_seed, bool) else 0
    if isinstance(seeds_v, (list, tuple)):
        seeds = [int(s) for s in seeds_v]
    elif isinstance(seeds_v, int) and not isinstance(seeds_v, bool):
        seeds = [base_seed + i for i in range(seeds_v)]  # a count of seeds
    else:
        seeds = [base_seed] if methods else []

    rounds_v = pick("rounds")
    first = 0 if any(p.round == 0 for p in RunLayout(run_dir).round_paths()) else 1
    if isinstance(rounds_v, (list, tuple)):
        rounds = [int(r) for r in rounds_v]
    elif isinstance(rounds_v, int) and not isinstance(rounds_v, bool):
        rounds = list(range(first, first + rounds_v))
    else:
        rounds = []
    return RunPlan(methods=methods, seeds=seeds, rounds=rounds)


def pool_dir(run_dir: str | Path) -> Path | None:
    """The run's pool: ``RUN/pool`` or ``config.yaml`` ``pool.path`` (relative to the run dir or the cwd)."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    pool = cfg.get("pool")
    ref = pool.get("path") if isinstance(pool, dict) else pool if isinstance(pool, str) else None
    if ref:
        p = Path(str(ref)).expanduser()
        for cand in ([p] if p.is_absolute() else [run_dir / p, Path.cwd() / p]):
            if cand.is_dir():
                return cand
        return p if p.is_absolute() else run_dir / p
    if RunLayout(run_dir).pool.is_dir():
        return RunLayout(run_dir).pool
    return None


def is_run_dir(path: str | Path) -> bool:
    """True for a run directory: manifest kind=run, or config.yaml naming methods, or method/seed*/ dirs."""
    path = Path(path)
    if not path.is_dir():
        return False
    m = read_manifest_loose(path)
    if m is not None:
        return m.get("kind") == "run"
    if (path / WARMUP).is_dir() or next(RunLayout(path).round_paths(), None) is not None:
        return True
    try:
        return bool(run_plan(path).methods)
    except LmselectError:
        return False


def _discovered(run_dir: Path) -> tuple[list[str], dict[str, list[int]], dict[tuple[str, int], list[int]]]:
    """Methods, seeds per method and rounds per (method, seed) present on disk."""
    methods: list[str] = []
    seeds: dict[str, list[int]] = {}
    rounds: dict[tuple[str, int], list[int]] = {}
    if not run_dir.is_dir():
        return methods, seeds, rounds
    layout = RunLayout(run_dir)
    for mdir in sorted(p for p in run_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        sdirs = layout.seeds(mdir.name)
        if not sdirs and mdir.name not in _known_methods():
            continue
        methods.append(mdir.name)
        seeds[mdir.name] = sorted(sdirs)
        for k in sdirs:
            rounds[(mdir.name, k)] = sorted(layout.rounds(mdir.name, k))
    return methods, seeds, rounds


def round_dir(run_dir: str | Path, method: str, seed: int, rnd: int) -> Path:
    return RunLayout(run_dir).round(method, seed, rnd)


def expected_stages(method: str, rdir: Path | None = None) -> list[str]:
    """Stages a round of ``method`` should have (``extra.stages`` of the round manifest overrides the default)."""
    if rdir is not None:
        m = read_manifest_loose(rdir)
        st = (m or {}).get("extra", {}).get("stages") if isinstance((m or {}).get("extra"), dict) else None
        if isinstance(st, (list, tuple)) and st:
            return [str(s) for s in st]
    return list(_expected_stages_of(method))


def _stage_key(name: str) -> tuple[int, str]:
    return (STAGE_ORDER.index(name) if name in STAGE_ORDER else len(STAGE_ORDER), name)


def stage_status(run_dir: str | Path) -> dict[str, Any]:
    """Status of every stage of a run directory.

    Returns::

        {"run": s, "pool": s, "warmup": {"target": s, "proxy": s},
         "rounds": {method: {seed: {round: {"status": s, "stages": {stage: s, ...}}}}},
         "counts": {"done": n, "partial": n, "missing": n}}        # over rounds

    with ``s`` in ``done`` / ``partial`` / ``missing``. Expected = the run plan (:func:`run_plan`) united with what is
    on disk; stages of a round = :func:`expected_stages` plus any other sub-directory present.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LmselectError(f"{run_dir}: no such run directory")
    plan = run_plan(run_dir)
    d_methods, d_seeds, d_rounds = _discovered(run_dir)
    methods = sorted(set(plan.methods) | set(d_methods), key=_method_sort_key)
    pool = pool_dir(run_dir)
    out: dict[str, Any] = {
        "run": dir_status(run_dir) if (run_dir / MANIFEST).is_file() else PARTIAL,
        "pool": dir_status(pool) if pool is not None else MISSING,
        "warmup": {w: dir_status(RunLayout(run_dir).warmup(w)) for w in WARMUP_MODELS},
        "rounds": {},
        "counts": {DONE: 0, PARTIAL: 0, MISSING: 0},
    }
    for method in methods:
        seeds = sorted(set(plan.seeds) | set(d_seeds.get(method, [])))
        per_seed: dict[int, dict[int, dict[str, Any]]] = {}
        for seed in seeds:
            rounds = sorted(set(plan.rounds) | set(d_rounds.get((method, seed), [])))
            per_round: dict[int, dict[str, Any]] = {}
            for r in rounds:
                rdir = round_dir(run_dir, method, seed, r)
                stages = expected_stages(method, rdir)
                if rdir.is_dir():
                    extra = [
                        p.name
                        for p in rdir.iterdir()
                        if p.is_dir() and not p.name.startswith(".") and p.name not in stages and p.name not in _SKIP_DIRS
                    ]
                    stages = stages + extra
                stages = sorted(stages, key=_stage_key)
                rstat = dir_status(rdir)
                per_round[r] = {"status": rstat, "stages": {s: dir_status(rdir / s) for s in stages}}
                out["counts"][rstat] += 1
            per_seed[seed] = per_round
        out["rounds"][method] = per_seed
    return out


# ----------------------------------------------------------------------------------------------------------------
# lineage


@dataclass
class Node:
    """An artifact directory (or a structural directory such as ``bliss/`` or ``seed0/``) in the lineage tree."""

    path: Path
    rel: str
    kind: str | None
    uuid: str | None
    status: str  # done / partial / missing, or "" for structural dirs
    parents: list[ParentCheck] = field(default_factory=list)
    children: list[Node] = field(default_factory=list)

    @property
    def is_artifact(self) -> bool:
        return self.kind is not None or self.status in (PARTIAL, MISSING)

    @property
    def stale(self) -> bool:
        return any(not p.ok for p in self.parents)

    def walk(self) -> Iterator[Node]:
        yield self
        for c in self.children:
            yield from c.walk()

    def find(self, rel: str) -> Node | None:
        """The node whose path relative to the root is ``rel`` (``"."`` = root)."""
        return next((n for n in self.walk() if n.rel == rel), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "rel": self.rel,
            "kind": self.kind,
            "uuid": self.uuid,
            "status": self.status,
            "stale": self.stale,
            "parents": [
                {"uuid": p.uuid, "kind": p.kind, "path": p.path, "state": p.state, "current_uuid": p.current_uuid}
                for p in self.parents
            ],
            "children": [c.to_dict() for c in self.children],
        }


def _child_sort_key(p: Path) -> tuple[int, int, str]:
    name = p.name
    if name == POOL:
        return (0, 0, name)
    if name == WARMUP:
        return (1, 0, name)
    known = _known_methods()
    if name in known:
        return (2, known.index(name), name)
    if (k := parse_seed(name)) is not None or (k := parse_round(name)) is not None:
        return (3, k, name)
    if name in STAGE_ORDER:
        return (4, STAGE_ORDER.index(name), name)
    return (5, 0, name)


def _build(d: Path, root: Path, run_dir: Path | None, depth: int) -> Node | None:
    m = read_manifest_loose(d)
    children: list[Node] = []
    if depth < 8:
        try:
            subdirs = sorted(
                (p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in _SKIP_DIRS),
                key=_child_sort_key,
            )
        except OSError:
            subdirs = []
        for s in subdirs:
            n = _build(s, root, run_dir, depth + 1)
            if n is not None:
                children.append(n)
    rel = "." if d == root else d.relative_to(root).as_posix()
    is_stage = d.name in STAGE_ORDER or parse_round(d.name) is not None or d.parent.name == WARMUP
    if m is None and not children and not is_stage:
        return None
    if m is not None:
        status = DONE if m.get("status", "complete") == "complete" else PARTIAL
        return Node(d, rel, m.get("kind"), m.get("uuid"), status, check_parents(m, d, run_dir), children)
    if is_stage:
        return Node(d, rel, None, None, PARTIAL, [], children)
    return Node(d, rel, None, None, "", [], children)


def _enclosing_run(path: Path) -> Path | None:
    for p in [path, *path.parents]:
        if (p / MANIFEST).is_file() and (read_manifest_loose(p) or {}).get("kind") == "run":
            return p
        if (p / "config.yaml").is_file() and ((p / WARMUP).is_dir() or RunLayout(p).has_seeds()):
            return p
    return None


def lineage(path: str | Path) -> Node:
    """The tree of artifact directories under ``path`` (a run directory or any artifact), parents checked.

    Structural directories (``bliss/``, ``seed0/``) appear as nodes with ``kind=None`` and status ``""``; a stage
    or round directory without a manifest is ``partial``. For a run directory the configured pool is attached
    under the root when it lives outside the run directory.
    """
    path = Path(path)
    if not path.is_dir():
        raise LmselectError(f"{path}: no such directory")
    run_dir = path if is_run_dir(path) else _enclosing_run(path.resolve())
    root = _build(path, path, run_dir, 0)
    if root is None:
        root = Node(path, ".", None, None, "", [], [])
    if run_dir is not None and Path(run_dir) == path:
        pool = pool_dir(path)
        if pool is not None and not RunLayout(path).pool.is_dir():
            pm = read_manifest_loose(pool)
            pn = Node(pool, str(pool), (pm or {}).get("kind"), (pm or {}).get("uuid"), dir_status(pool),
                      check_parents(pm, pool, None) if pm else [], [])
            root.children.insert(0, pn)
    return root


def stale_artifacts(path: str | Path) -> list[tuple[Node, ParentCheck]]:
    """(node, parent) for every artifact below ``path`` whose recorded parent changed, vanished or is incomplete."""
    return [(n, p) for n in lineage(path).walk() for p in n.parents if not p.ok]


def ancestry(path: str | Path, max_depth: int = 12) -> list[str]:
    """Lines of the parent chain of one artifact (each parent indented under its child)."""
    path = Path(path)
    run_dir = _enclosing_run(path.resolve())
    lines: list[str] = []
    seen: set[str] = set()

    def rec(d: Path, depth: int) -> None:
        m = read_manifest_loose(d)
        if m is None or depth > max_depth:
            return
        for pc in check_parents(m, d, run_dir):
            mark = "" if pc.ok else f"  !! {pc.state.upper()}"
            where = pc.resolved if pc.resolved is not None else pc.path
            lines.append(f"{'  ' * depth}<- {pc.kind:<10} {pc.uuid[:8]:<8}  {where}{mark}")
            if pc.resolved is not None and pc.uuid not in seen:
                seen.add(pc.uuid)
                rec(pc.resolved, depth + 1)

    rec(path, 1)
    return lines


# ----------------------------------------------------------------------------------------------------------------
# printing


def _node_line(n: Node) -> str:
    if n.kind is None and n.status == "":
        return f"{n.path.name}/"
    kind = n.kind or "?"
    short = (n.uuid or "-")[:8]
    label = n.rel if n.rel != "." else str(n.path)
    line = f"{kind:<10} {short:<8}  {label}  [{n.status}]"
    bad = [p for p in n.parents if not p.ok]
    if bad:
        line += "  !! STALE: " + "; ".join(p.describe() for p in bad)
    return line


def format_tree(root: Node) -> list[str]:
    lines = [_node_line(root)]

    def rec(n: Node, prefix: str) -> None:
        for i, c in enumerate(n.children):
            last = i == len(n.children) - 1
            lines.append(prefix + ("└── " if last else "├── ") + _node_line(c))
            rec(c, prefix + ("    " if last else "│   "))

    rec(root, "")
    return lines


def format_status(status: dict[str, Any]) -> list[str]:
    """The stage-status table as text lines."""
    lines = [
        f"run: {status['run']}   pool: {status['pool']}   "
        f"warmup target: {status['warmup']['target']}   warmup proxy: {status['warmup']['proxy']}"
    ]
    rows = []
    for method, seeds in status["rounds"].items():
        for seed, rounds in seeds.items():
            for r, info in rounds.items():
                stages = " ".join(f"{s}={v}" for s, v in info["stages"].items())
                rows.append((method, seed_name(seed), round_name(r), info["status"], stages))
    if rows:
        w = [max(len(r[i]) for r in rows + [("method", "seed", "round", "status", "")]) for i in range(4)]
        lines.append(f"{'method':<{w[0]}}  {'seed':<{w[1]}}  {'round':<{w[2]}}  {'status':<{w[3]}}  stages")
        lines += [f"{a:<{w[0]}}  {b:<{w[1]}}  {c:<{w[2]}}  {d:<{w[3]}}  {e}" for a, b, c, d, e in rows]
    else:
        lines.append("no method rounds planned or found")
    c = status["counts"]
    lines.append(f"rounds: {c[DONE]} done, {c[PARTIAL]} partial, {c[MISSING]} missing")
    return lines


def stale_stages(run_dir: str | Path, recipe: Any = None) -> list[tuple[str, list[str]]]:
    """Stages of a run that a rerun of ``recipe`` (default: the run's own ``config.yaml``) would not reuse."""
    from lmselect.recipe import load_recipe  # torch (recipe reads TrainConfig): provenance stays torch-free

    run_dir = Path(run_dir)
    if recipe is None:
        if not (run_dir / "config.yaml").is_file():
            return []
        try:
            recipe = load_recipe(run_dir / "config.yaml")
        except LmselectError:
            return []  # not a recipe config (a run of another tool, a hand-edited file): nothing to compare with
    return find_stale(run_dir, recipe)


def format_lineage(path: str | Path, recipe: Any = None) -> str:
    """Everything :func:`print_lineage` prints, as one string (``recipe``: also mark stages it would not reuse)."""
    path = Path(path)
    root = lineage(path)
    out = ["Lineage (kind, uuid, path, status):", *format_tree(root)]
    if root.kind is not None and root.kind != "run":
        anc = ancestry(path)
        out += ["", "Parents:", *(anc or ["  (none recorded)"])]
    if is_run_dir(path):
        out += ["", "Stage status:", *format_status(stage_status(path))]
    stale = [(n, p) for n in root.walk() for p in n.parents if not p.ok]
    out.append("")
    if stale:
        out.append(f"{len(stale)} artifact parent link(s) changed since the artifact was made:")
        out += [f"  {n.rel}: {p.describe()}" for n, p in stale]
    else:
        out.append("all recorded parents match their current manifests")
    if is_run_dir(path):
        st = stale_stages(path, recipe)
        against = "the given recipe" if recipe is not None else "the run's config.yaml"
        if st:
            out.append(f"{len(st)} stage(s) STALE against {against} (a rerun refuses them; --recompute redoes them):")
            out += [f"  {rel}: {'; '.join(why[:3])}" for rel, why in st]
        else:
            out.append(f"every stage matches {against}")
    return "\n".join(out)


def print_lineage(path: str | Path, recipe: Any = None) -> None:
    """Print the lineage tree, stage status and changed-parent flags of a run or artifact directory."""
    print(format_lineage(path, recipe))
