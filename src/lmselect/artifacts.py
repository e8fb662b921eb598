"""On-disk artifacts: atomic writes, manifests and stage directories.

Contract used by every stage (prepare, train, score, select, eval, pipeline rounds):

* An artifact is a directory. Its ``manifest.json`` is written **last**, atomically. A directory without a manifest
  (or whose manifest says ``"status": "partial"``) is incomplete: readers refuse it and writers redo it.
* Files are written to a temporary name in the same directory and renamed into place (``os.replace`` is atomic on
  POSIX), so a killed process never leaves a truncated file under its final name.
* The manifest records: kind, uuid, parents (uuids + paths), config and its hash, seed, counts, timings, git commit,
  library versions and creation time. ``lmselect inspect`` reads these to print lineage.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid as _uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from lmselect.errors import ArtifactError, LmselectError  # noqa: F401 - re-exported (the error root)

MANIFEST = "manifest.json"




# ----------------------------------------------------------------------------------------------------------------
# atomic file writes


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{_uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path`` (file or directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "__dataclass_fields__"):
        from lmselect.config import to_dict

        return to_dict(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def atomic_save_npy(path: str | Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr)


def read_json(path: str | Path) -> Any:
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{p}: file not found") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{p}: invalid JSON at line {e.lineno} ({e.msg})") from None


# ----------------------------------------------------------------------------------------------------------------
# provenance helpers


def git_commit(start: str | Path | None = None) -> str | None:
    """Commit of the lmselect source tree (``+dirty`` when modified), or None outside a git checkout."""
    here = Path(start) if start else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except Exception:
        return None


_GIT_COMMIT_CACHE: list[str | None] = []


def cached_git_commit() -> str | None:
    if not _GIT_COMMIT_CACHE:
        _GIT_COMMIT_CACHE.append(git_commit())
    return _GIT_COMMIT_CACHE[0]


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("lmselect", "torch", "transformers", "tokenizers", "numpy", "lm_eval"):
        try:
            out[name] = md.version(name.replace("_", "-"))
        except md.PackageNotFoundError:
            continue
    return out


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------------------------
# manifests


@dataclass
class Manifest:
    kind: str  # "pool", "checkpoint", "scores", "selection", "eval", "bilevel", "round", "run", ...
    config: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    parents: list[dict[str, str]] = field(default_factory=list)  # [{"uuid":..., "path":..., "kind":...}]
    counts: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    status: str = "complete"
    uuid: str = field(default_factory=lambda: _uuid.uuid4().hex)
    config_hash: str | None = None
    git_commit: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    created: str = field(default_factory=now_iso)

    def to_json(self) -> dict[str, Any]:
        from lmselect.config import config_hash

        d = dict(self.__dict__)
        d["config_hash"] = self.config_hash or (config_hash(self.config) if self.config else None)
        d["git_commit"] = self.git_commit or cached_git_commit()
        d["versions"] = self.versions or library_versions()
        return d


def parent_ref(artifact_dir: str | Path) -> dict[str, str]:
    """Reference to a complete artifact, for a child's ``parents`` list."""
    m = read_manifest(artifact_dir)
    return {"uuid": m["uuid"], "path": str(Path(artifact_dir)), "kind": m.get("kind", "?"), "created": m.get("created")}


def write_manifest(artifact_dir: str | Path, manifest: Manifest) -> dict[str, Any]:
    """Write ``manifest.json`` atomically; call it only after every other file of the artifact is in place."""
    d = manifest.to_json()
    atomic_write_json(Path(artifact_dir) / MANIFEST, d)
    return d


def read_manifest(artifact_dir: str | Path, kind: str | None = None) -> dict[str, Any]:
    p = Path(artifact_dir) / MANIFEST
    if not p.is_file():
        if not Path(artifact_dir).exists():
            raise ArtifactError(f"{artifact_dir}: no such artifact directory")
        raise ArtifactError(f"{artifact_dir}: incomplete artifact (no {MANIFEST}); rerun the command that makes it")
    m = read_json(p)
    if m.get("status", "complete") != "complete":
        raise ArtifactError(f"{artifact_dir}: artifact is marked {m.get('status')}; rerun the command that makes it")
    if kind is not None and m.get("kind") != kind:
        raise ArtifactError(f"{artifact_dir}: expected a '{kind}' artifact, found '{m.get('kind')}'")
    return m


def is_complete(artifact_dir: str | Path, kind: str | None = None) -> bool:
    try:
        read_manifest(artifact_dir, kind)
        return True
    except ArtifactError:
        return False


@contextlib.contextmanager
def building(artifact_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Build an artifact directory in place, marking it incomplete until the caller writes its manifest.

    A stale manifest is removed first, so a crash mid-build never leaves a directory that looks complete.
    Use for artifacts that are resumable piece by piece (shards of scores); for all-or-nothing artifacts
    prefer :func:`atomic_path` on the whole directory.
    """
    d = Path(artifact_dir)
    if overwrite and d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    m = d / MANIFEST
    if m.exists():
        m.unlink()
    yield d


class Timer:
    """``with Timer() as t: ...; t.seconds``"""

    def __enter__(self) -> "Timer":
        self.t0 = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.t0


def fresh_tmpdir(parent: str | Path, prefix: str = ".tmp-") -> Path:
    Path(parent).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
