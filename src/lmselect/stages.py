"""Stage identity: what each stage of a run is made from, and which stages on disk a recipe would not reuse.

Every stage directory of a run (``pool``, ``warmup/target``, ``<method>/seed<k>/round<r>/<stage>``, ...) is
determined by a slice of the recipe (:func:`stage_specs`: its own keys and those of every stage upstream of it) and
by its parents. ``RUN/stages.json`` records, for each stage, the slice it was made from (:func:`record_spec`, written
before the stage is computed); :func:`find_stale` compares the stages on disk with what the current recipe would make
and checks their recorded parents' uuids; :func:`downstream` is what a changed stage invalidates. The runner
(``pipeline``) refuses or recomputes stale stages; ``provenance`` / ``lmselect inspect`` lists them.

This module reads the recipe, the registry (a method's ``stages``, ``seed_stages``, ``needs`` and resolved settings)
and manifests; it imports neither the runner nor provenance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmselect.artifacts import atomic_write_json, check_parents, is_complete, read_json, read_manifest
from lmselect.config import config_hash, to_dict
from lmselect.layout import RunLayout, RunPath
from lmselect.paths import portable
from lmselect.select.base import STAGE_ORDER, get_method

SPECS_FILE = "stages.json"


_REL = RunLayout(".")  # run-relative keys (RUN/stages.json), built and parsed by the layout

def _sub(r: Any, *keys: str) -> dict[str, Any]:
    d = portable(to_dict(r))
    return {k: d[k] for k in keys if k in d}


def stage_specs(r: Any) -> dict[str, dict[str, Any]]:
    """Run-relative stage path -> the recipe slice that determines it, for every stage this recipe makes.

    A stage depends on the keys of every stage upstream of it, so a changed key makes its first stage and everything
    downstream stale, and nothing else: changing ``eval.limit`` only redoes evaluations, changing
    ``select_fraction`` redoes selections, training and evaluation, changing ``warmup.steps`` redoes everything."""
    specs: dict[str, dict[str, Any]] = {}
    pool = {"pool": portable(to_dict(r.pool))}
    pool["pool"].get("prepare", {}).pop("tasks", None)  # the task count does not change the pool
    if not pool["pool"].get("prepare", {}).get("prefilter", True):
        del pool["pool"]["prepare"]["prefilter"]  # off: runs made before the option existed keep their identity
    if r.pool.path is None:
        specs[_REL.key(RunPath(pool=True))] = pool
    warm = {**pool, **_sub(r, "seed", "warmup", "train")}
    warm_target = _REL.key(RunPath(warmup="target"))
    specs[warm_target] = {**warm, "target": portable(to_dict(r.target))}
    methods = {m: get_method(m, getattr(r, m, None)) for m in r.methods}
    if any("proxy" in m.needs for m in methods.values()):
        specs[_REL.key(RunPath(warmup="proxy"))] = {**warm, "proxy": portable(to_dict(r.proxy))}
    v = portable(to_dict(r.validation))
    sel_v = {k: v[k] for k in ("selection", "selection_kind", "max_items", "seq_len", "batch_size")}
    for name, m in methods.items():
        base = {**specs[warm_target], **_sub(r, "select_fraction", "round_steps", "lr_per_round", "score_batch_size"),
                "method": name, "settings": portable(to_dict(m.resolved_config())) if m.cfg is not None else None}
        if "proxy" in m.needs:
            base["proxy"] = portable(to_dict(r.proxy))
        if "selection_set" in m.needs:
            base["validation"] = sel_v
        for seed in r.seeds:
            for st in m.seed_stages:
                specs[_REL.key(RunPath(name, seed, stage=st))] = base
            for rnd in range(1, r.rounds + 1):
                for st in m.stages:
                    spec = base
                    if st == "eval":
                        spec = {**base, **_sub(r, "decay", "eval"), "report_sets": {k: v[k] for k in ("lambada", "clean")},
                                "report_validation": {k: v[k] for k in ("max_items", "seq_len", "batch_size")}}
                    specs[_REL.key(RunPath(name, seed, rnd, st))] = spec
    return specs


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ ("key: old -> new")."""
    a, b = _flat(old), _flat(new)
    return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in sorted(a.keys() | b.keys())
            if a.get(k, "<unset>") != b.get(k, "<unset>")]


def downstream(rel: str, planned: list[str]) -> list[str]:
    """``rel`` and every planned stage that depends on it (in plan order)."""
    at = _REL.parse(rel)
    plan = [(p, _REL.parse(p)) for p in planned]
    if at is None:
        raise ValueError(f"{rel}: not a stage of a run directory")
    if at.pool or at.warmup is not None:
        if at.warmup == "proxy":  # only methods that use the proxy depend on it
            return [rel] + [p for p, q in plan if q is not None and q.seed is not None]
        return [p for p, q in plan if p == rel or (q is not None and (q.warmup is not None or q.seed is not None))]
    chain = [(p, q) for p, q in plan if q is not None and q.method == at.method and q.seed == at.seed
             and q.stage is not None]
    if at.round is None:  # a per-seed stage (e.g. a reference): the whole chain depends on it
        return [p for p, _ in chain]
    if at.stage == "eval":  # evaluation feeds nothing downstream
        return [rel]
    out = [rel]
    for p, q in chain:
        if q.round is not None and (q.round > at.round or (q.round == at.round and
                                                            STAGE_ORDER.index(q.stage) > STAGE_ORDER.index(at.stage))):
            out.append(p)
    return out


def find_stale(run_dir: str | Path, recipe: Any) -> list[tuple[str, list[str]]]:
    """Stages on disk that the recipe would not reuse: (run-relative path, reasons), in plan order."""
    root = Path(run_dir)
    specs = stage_specs(recipe)
    recorded = read_json(root / SPECS_FILE) if (root / SPECS_FILE).is_file() else {}
    stale: list[tuple[str, list[str]]] = []
    for rel, spec in specs.items():
        d = root / rel
        if not d.exists():
            continue
        rec = recorded.get(rel)
        if rec is None:
            if any(d.iterdir()):
                stale.append((rel, ["no record of the configuration that made it (made by another lmselect run?)"]))
            continue
        if rec.get("hash") != config_hash(spec):
            stale.append((rel, changed_keys(rec.get("spec", {}), spec) or ["configuration changed"]))
            continue
        if is_complete(d):
            bad = [c for c in check_parents(read_manifest(d), d, root) if not c.ok]
            if bad:
                stale.append((rel, [c.describe() for c in bad]))
    return stale


# ------------------------------------------------------------------------------------------------------------------
# RUN/stages.json


def record_spec(run_dir: str | Path, rel: str, spec: dict[str, Any]) -> None:
    """Record in ``RUN/stages.json`` the recipe slice stage ``rel`` is being made from (before computing it)."""
    path = Path(run_dir) / SPECS_FILE
    rec = read_json(path) if path.is_file() else {}
    if rec.get(rel, {}).get("hash") != config_hash(spec):
        rec[rel] = {"hash": config_hash(spec), "spec": spec}
        atomic_write_json(path, rec)


def forget_specs(run_dir: str | Path, rels: list[str]) -> None:
    """Drop the records of stages ``rels`` (they are being deleted) from ``RUN/stages.json``."""
    path = Path(run_dir) / SPECS_FILE
    rec = read_json(path) if path.is_file() else {}
    for rel in rels:
        rec.pop(rel, None)
    atomic_write_json(path, rec)
