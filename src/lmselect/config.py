"""Typed configuration: dataclasses loaded from YAML with ``--key.sub=value`` overrides.

Every stage of lmselect is configured by a (nested) dataclass. The same machinery serves all of them:

    cfg = load_config(TrainConfig, "recipe.yaml", ["--optim.lr=3e-4", "--steps=100"])
    artifacts.save_config(cfg, out_dir / "config.yaml")   # the resolved config lives next to every output
    config_hash(cfg)                            # short, stable hash recorded in manifests

Unknown keys are errors that name the key (a typo in a recipe must never be silently ignored). A bad value is blamed
on where it came from: ``command line: --rounds=two: config key 'rounds' must be int`` for an override, the YAML
file's path for a value read from a file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Iterable, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from lmselect.errors import ConfigError  # noqa: F401 - re-exported (config errors are LmselectErrors)

T = TypeVar("T")




def check_fraction(value: Any, key: str = "fraction", where: str = "") -> float:
    """``value`` as a float in (0, 1] (a selection / keep fraction), or a one-line ConfigError naming ``key``."""
    import math

    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}{where}: a fraction must be a number in (0, 1], got {value!r}", key=key) from None
    if math.isnan(f) or not 0.0 < f <= 1.0:
        raise ConfigError(f"{key}{where}: a fraction must be in (0, 1], got {value!r}", key=key)
    return f


def _is_optional(tp: Any) -> tuple[bool, Any]:
    """(whether None is allowed, the type without None): ``X | None`` -> X, ``X | Y | None`` -> ``X | Y``."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) < len(get_args(tp)):
            return True, args[0] if len(args) == 1 else Union[tuple(args)]
    return False, tp


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML / command-line value to the annotated type, or raise ConfigError naming ``key``."""
    optional, inner = _is_optional(tp)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~") and optional):
        if optional or tp is Any:
            return None
        raise ConfigError(f"config key '{key}' may not be null", key=key)
    tp = inner
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {type(value).__name__}", key=key)
        return from_dict(tp, value, prefix=key + ".")
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):  # e.g. float | str: the first member the value already is, else converts to
        members = get_args(tp)
        if any(type(value) is m for m in members):
            return value
        for m in members:
            try:
                return _coerce(value, m, key)
            except ConfigError:
                continue
        names = " or ".join(getattr(m, "__name__", str(m)) for m in members)
        raise ConfigError(f"config key '{key}' must be {names}, got {value!r}", key=key)
    if origin in (list, tuple, list, tuple):
        args = get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""] if not value.startswith("[") else yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            value = [value]
        elem = args[0] if args else Any
        out = [_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin in (tuple, tuple) else out
    if origin in (dict, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping", key=key)
        return dict(value)
    if origin is typing.Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {list(allowed)}, got {value!r}", key=key)
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"config key '{key}' must be a boolean, got {value!r}", key=key)
    if tp in (int, float, str):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            if tp is int and isinstance(value, str):
                return int(float(value)) if "e" in value.lower() else int(value)
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' must be {tp.__name__}, got {value!r}", key=key) from None
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) mapping; unknown keys raise ConfigError naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' (known keys here: {known})", key=prefix + unknown[0])
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}': {e}") from None
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain (YAML/JSON-able) dict of a dataclass config; tuples become lists, Paths strings."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return conv(cfg)


def parse_overrides(args: Iterable[str]) -> dict[str, Any]:
    """``["--a.b=1", "--c", "x"]`` -> ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    items = list(args)
    i = 0
    while i < len(items):
        a = items[i]
        if not a.startswith("--"):
            raise ConfigError(f"override '{a}' must look like --key.sub=value")
        body = a[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
        elif i + 1 < len(items) and not items[i + 1].startswith("--"):
            key, raw = body, items[i + 1]
            i += 1
        else:
            key, raw = body, "true"
        try:
            val = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            val = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{a}' conflicts with an earlier override of '{p}'")
        node[parts[-1]] = val
        i += 1
    return out


def deep_merge(base: dict[str, Any], upd: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}:{where} invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping of config keys")
    return data


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = (), base: dict[str, Any] | None = None
) -> T:
    """Defaults <- ``base`` <- YAML file <- ``--key.sub=value`` overrides, validated into ``cls``."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = deep_merge(data, read_yaml(path))
    overrides = list(overrides)
    data = deep_merge(data, parse_overrides(overrides))
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        raise blame(e, path, overrides) from None


def override_sources(args: Iterable[str]) -> dict[str, str]:
    """Dotted key -> the command-line text that set it: ``["--rounds=two"]`` -> ``{"rounds": "--rounds=two"}``."""
    items = list(args)
    out: dict[str, str] = {}
    i = 0
    while i < len(items):
        a = items[i]
        body = a[2:] if a.startswith("--") else a
        if "=" in body:
            out[body.split("=", 1)[0]] = a
        elif i + 1 < len(items) and not items[i + 1].startswith("--"):
            out[body] = f"{a} {items[i + 1]}"
            i += 1
        else:
            out[body] = a
        i += 1
    return out


def blame(e: ConfigError, path: str | Path | None, overrides: Iterable[str] = ()) -> ConfigError:
    """``e`` prefixed with where the bad value came from: ``command line: --rounds=two: ...`` when an override set
    the key (or a section above it), else ``FILE: ...`` when a YAML file was read; unchanged otherwise."""
    if isinstance(e.key, str):
        key = re.sub(r"\[\d+\]", "", e.key)
        parts = key.split(".")
        sources = override_sources(overrides)
        for n in range(len(parts), 0, -1):
            arg = sources.get(".".join(parts[:n]))
            if arg is not None:
                return ConfigError(f"command line: {arg}: {e}", key=e.key)
        below = [a for k, a in sources.items() if k.startswith(key + ".")]  # --optim.lr=1 when 'optim' is unknown
        if below:
            return ConfigError(f"command line: {below[0]}: {e}", key=e.key)
    if path is not None:
        return ConfigError(f"{path}: {e}", key=e.key)
    return e


def replace(cfg: T, **changes: Any) -> T:
    """``dataclasses.replace`` with dotted keys: ``replace(cfg, **{"optim.lr": 1e-3})``."""
    data = to_dict(cfg)
    for k, v in changes.items():
        node = data
        parts = k.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = v
    return from_dict(type(cfg), data)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_hash(cfg: Any) -> str:
    """Stable 12-hex-digit hash of the resolved config (key order independent)."""
    blob = json.dumps(to_dict(cfg) if not isinstance(cfg, dict) else cfg, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
