"""On-disk artifacts: atomic writes, manifests and stage directories.

Contract used by every stage (prepare, train, score, select, eval, pipeline rounds):

* An artifact is a directory. Its ``manifest.json`` is written **last**, atomically. A directory without a manifest
  (or whose manifest says ``"status": "partial"``) is incomplete: readers refuse it and writers redo it.
* Files are written to a temporary name in the same directory and renamed into place (``os.replace`` is atomic on
  POSIX), so a killed process never leaves a truncated file under its final name.
* A filesystem fault during any write (no space, read-only filesystem, permission denied, quota) becomes a
  :class:`DiskWriteError` naming the file and the problem, the temporary file is removed and no manifest is written,
  so the failure is one line and nothing looks complete (:func:`writing`).
* The manifest records: kind, uuid, parents (uuids + paths), config and its hash, seed, counts, timings, git commit,
  library versions and creation time. ``lmselect inspect`` reads these to print lineage.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid as _uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from lmselect.config import config_hash, dump_yaml, to_dict
from lmselect.errors import ArtifactError, LmselectError  # noqa: F401 - re-exported (the error root)

MANIFEST = "manifest.json"




class DiskWriteError(ArtifactError):
    """A write failed because of the filesystem (full, read-only, not writable, over quota): ``PATH: cannot write: ...``."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path}: cannot write: {problem}")


# ----------------------------------------------------------------------------------------------------------------
# filesystem faults

# errnos that mean "this filesystem cannot take the write", as opposed to a bug or bad input
WRITE_FAULT_ERRNOS: frozenset[int] = frozenset(
    e for e in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, getattr(errno, "EDQUOT", None)) if e is not None
)
# Libraries that write through their own code hide the errno: safetensors (Rust) says "... (os error 28)", torch's
# zip writer says "[enforce fail at inline_container.cc] unexpected pos", np.save says "N requested and M written".
_RUST_OS_ERROR = re.compile(r"os error (\d+)")
_IO_HINT = re.compile(r"os error|I/O|inline_container|write|written|No space|Read-only|Permission denied|quota", re.I)
_LOW_SPACE_BYTES = 1 << 20


def _strerror(code: int) -> str:
    return os.strerror(code).lower()


def _probe_filesystem(path: Path) -> int | None:
    """After a write failed without a usable errno: ask the filesystem why (read-only, full, not writable)."""
    d = path if path.is_dir() else path.parent
    while not d.exists() and d != d.parent:
        d = d.parent
    try:
        st = os.statvfs(d)
    except OSError:
        return None
    if st.f_flag & getattr(os, "ST_RDONLY", 1):
        return errno.EROFS
    free = st.f_bavail * st.f_frsize
    if free < _LOW_SPACE_BYTES or free < 0.01 * st.f_blocks * st.f_frsize:
        return errno.ENOSPC
    if not os.access(d, os.W_OK):
        return errno.EACCES
    return None


def write_fault(path: str | Path, exc: BaseException, tmp: str | Path | None = None) -> DiskWriteError | None:
    """The one-line error for ``exc`` if it is a filesystem fault while writing ``path`` (else None).

    An ``OSError`` naming some other file (an input that cannot be read) is not a write fault of ``path``. ``tmp`` is
    the temporary name being written: a file below it is reported under its final name below ``path``.
    """
    path = Path(path)
    if isinstance(exc, DiskWriteError) and tmp is not None:
        # raised by a nested write into our temp dir (the manifest of a pool built in .pool.tmp-*): final name
        t = Path(tmp)
        if exc.path == t or t in exc.path.parents:
            return DiskWriteError(path / exc.path.relative_to(t) if exc.path != t else path, exc.problem)
        return None
    if isinstance(exc, LmselectError) or not isinstance(exc, Exception):
        return None
    where = path
    if isinstance(exc, OSError) and exc.filename is not None:
        f = Path(str(exc.filename))
        if tmp is not None and (f == Path(tmp) or Path(tmp) in f.parents):
            where = path / f.relative_to(tmp) if f != Path(tmp) else path
        elif f == path or path in f.parents:
            where = f
        else:
            return None  # a fault of another file (e.g. an unreadable input): not ours to rename
    code: int | None = None
    if isinstance(exc, OSError) and exc.errno in WRITE_FAULT_ERRNOS:
        code = exc.errno
    else:
        m = _RUST_OS_ERROR.search(str(exc))
        if m and int(m.group(1)) in WRITE_FAULT_ERRNOS:
            code = int(m.group(1))
        elif isinstance(exc, OSError) or _IO_HINT.search(f"{type(exc).__name__} {exc}"):
            code = _probe_filesystem(path)
    if code is None:
        return None
    return DiskWriteError(where, _strerror(code))


@contextlib.contextmanager
def writing(path: str | Path, tmp: str | Path | None = None) -> Iterator[None]:
    """Turn a filesystem fault inside the block into :class:`DiskWriteError` naming ``path`` (see :func:`write_fault`)."""
    try:
        yield
    except Exception as e:
        err = write_fault(path, e, tmp)
        if err is None:
            raise
        raise err from e


def _remove(p: Path) -> None:
    with contextlib.suppress(OSError):
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------------
# atomic file writes


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{_uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path`` (file or directory)."""
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        with writing(path, tmp):
            path.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            if path.is_dir() and tmp.is_dir():
                shutil.rmtree(path)
            os.replace(tmp, path)
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


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
# content checksums

# The cheap check reads SAMPLE_BLOCKS blocks of SAMPLE_BLOCK bytes at evenly spaced offsets (first and last included):
# about 1 MiB whatever the file size, so opening a pool stays instant yet a file replaced or overwritten with other
# content (a garbage tokens.bin of the right size) is caught. A flipped byte between samples needs the full hash
# (``lmselect inspect --verify``).
SAMPLE_BLOCKS = 16
SAMPLE_BLOCK = 1 << 16
_HASH_CHUNK = 1 << 22


class ChecksumError(ArtifactError):
    """A file's content does not match the checksum its manifest recorded."""


def _blake2b() -> Any:
    import hashlib

    return hashlib.blake2b(digest_size=16)


def sampled_hash(path: str | Path) -> str:
    """blake2b of the file size and of SAMPLE_BLOCKS evenly spaced blocks (the whole file when it is small)."""
    path = Path(path)
    size = path.stat().st_size
    h = _blake2b()
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if size <= SAMPLE_BLOCKS * SAMPLE_BLOCK:
            h.update(f.read())
        else:
            last = size - SAMPLE_BLOCK
            for i in range(SAMPLE_BLOCKS):
                f.seek(last * i // (SAMPLE_BLOCKS - 1))
                h.update(f.read(SAMPLE_BLOCK))
    return h.hexdigest()


def full_hash(path: str | Path) -> str:
    """blake2b of the whole file (streamed)."""
    h = _blake2b()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def file_checksums(artifact_dir: str | Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"size", "sampled", "full"}}`` for files of an artifact, for its manifest's ``checksums``."""
    d = Path(artifact_dir)
    out = {}
    for name in names:
        f = d / name
        out[name] = {"size": f.stat().st_size, "algo": "blake2b-128", "sampled": sampled_hash(f), "full": full_hash(f)}
    return out


def verify_checksums(
    artifact_dir: str | Path, manifest: dict[str, Any], *, full: bool = False, fix_hint: str = "rerun the command that makes it"
) -> list[str]:
    """Check the files listed in ``manifest["checksums"]``: size and sampled hash, plus the full hash when ``full``.

    Raises :class:`ChecksumError` naming the first file that differs; returns the names checked (empty for manifests
    written before checksums existed, which still load).
    """
    d = Path(artifact_dir)
    checked = []
    for name, ck in (manifest.get("checksums") or {}).items():
        f = d / name
        if not f.is_file():
            raise ChecksumError(f"{f}: file listed in the manifest is missing; {fix_hint}")
        bad = f.stat().st_size != ck.get("size")
        bad = bad or ("sampled" in ck and sampled_hash(f) != ck["sampled"])
        bad = bad or (full and "full" in ck and full_hash(f) != ck["full"])
        if bad:
            raise ChecksumError(f"{f}: content does not match its manifest; the file changed or is corrupt — {fix_hint}")
        checked.append(name)
    return checked


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
    checksums: dict[str, dict[str, Any]] = field(default_factory=dict)  # file name -> file_checksums() entry
    status: str = "complete"
    uuid: str = field(default_factory=lambda: _uuid.uuid4().hex)
    config_hash: str | None = None
    git_commit: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    created: str = field(default_factory=now_iso)

    def to_json(self) -> dict[str, Any]:

        d = dict(self.__dict__)
        if not d["checksums"]:
            d.pop("checksums")  # artifacts without checksummed files keep the old manifest shape
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


# kind -> (a file its writer creates before the manifest, the command that makes it): a directory without the
# manifest *and* without that file was never this kind of artifact, which deserves another message than "incomplete"
_KIND_MARKERS: dict[str, tuple[str, str]] = {
    "pool": ("tokens.bin", "lmselect prepare"),
    "checkpoint": ("config.json", "lmselect train"),
}


def read_manifest(artifact_dir: str | Path, kind: str | None = None) -> dict[str, Any]:
    p = Path(artifact_dir) / MANIFEST
    if not p.is_file():
        if not Path(artifact_dir).exists():
            raise ArtifactError(f"{artifact_dir}: no such artifact directory")
        if kind in _KIND_MARKERS and not (Path(artifact_dir) / _KIND_MARKERS[kind][0]).exists():
            raise ArtifactError(
                f"{artifact_dir}: not a {kind} directory (no {MANIFEST}); run {_KIND_MARKERS[kind][1]}"
            )
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


# ----------------------------------------------------------------------------------------------------------------
# recorded parents, checked against the parents' current manifests (the read side of parent_ref)


def read_manifest_loose(d: Path) -> dict[str, Any] | None:
    """The manifest of ``d`` whatever its status, or None when absent / unreadable."""
    p = d / MANIFEST
    if not p.is_file():
        return None
    try:
        m = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return m if isinstance(m, dict) else None


@dataclass
class ParentCheck:
    """One recorded parent of an artifact, checked against the parent's current manifest."""

    uuid: str
    kind: str
    path: str  # as recorded
    resolved: Path | None  # where it was found now (None = not found)
    current_uuid: str | None
    state: str  # "ok" | "changed" | "missing" | "incomplete"

    @property
    def ok(self) -> bool:
        return self.state == "ok"

    def describe(self) -> str:
        short = self.uuid[:8] if self.uuid else "?"
        if self.state == "changed":
            return f"parent {self.kind} {short} changed (now {str(self.current_uuid)[:8]}): {self.resolved}"
        if self.state == "missing":
            return f"parent {self.kind} {short} missing: {self.path}"
        if self.state == "incomplete":
            return f"parent {self.kind} {short} incomplete (no complete manifest): {self.resolved}"
        return f"parent {self.kind} {short} ok"


def _resolve_parent(recorded: str, child_dir: Path, run_dir: Path | None) -> Path | None:
    """Find a recorded parent directory now.

    A path that points into a run directory (a suffix of it starts at one of the run directory's entries: ``pool``,
    ``warmup``, a method) is looked up in the *current* run directory only, so a moved or copied run directory is
    checked against its own artifacts: the longest such suffix that exists there (the path's own ancestors may bear
    an entry's name, /home/random/runs/RUN/random/seed0/... -> RUN/random/seed0/..., and so may its last part,
    RUN/reference/seed0/reference: the ``reference`` method's seed stage ``reference``). Any other path as recorded
    (absolute, or relative to the run directory, the cwd or the child)."""
    p = Path(recorded)
    if run_dir is not None and run_dir.is_dir():
        top = {e.name for e in run_dir.iterdir() if e.is_dir()}
        idx = [i for i, part in enumerate(p.parts) if part in top]
        if idx:
            return next((c for c in (run_dir.joinpath(*p.parts[i:]) for i in idx) if c.is_dir()), None)
    cands: list[Path] = []
    if p.is_absolute():
        cands.append(p)
    else:
        if run_dir is not None:
            cands.append(run_dir / p)
        cands += [Path.cwd() / p, child_dir / p]
    for c in cands:
        if c.is_dir():
            return c
    return None


def check_parents(manifest: dict[str, Any], artifact_dir: Path, run_dir: Path | None = None) -> list[ParentCheck]:
    """Compare each recorded parent uuid with the parent's current manifest."""
    out = []
    for ref in manifest.get("parents") or []:
        if not isinstance(ref, dict):
            continue
        rec_uuid = str(ref.get("uuid") or "")
        rec_path = str(ref.get("path") or "")
        kind = str(ref.get("kind") or "?")
        where = _resolve_parent(rec_path, artifact_dir, run_dir) if rec_path else None
        if where is None:
            out.append(ParentCheck(rec_uuid, kind, rec_path, None, None, "missing"))
            continue
        pm = read_manifest_loose(where)
        if pm is None or pm.get("status", "complete") != "complete":
            out.append(ParentCheck(rec_uuid, kind, rec_path, where, (pm or {}).get("uuid"), "incomplete"))
            continue
        cur = str(pm.get("uuid") or "")
        out.append(ParentCheck(rec_uuid, kind, rec_path, where, cur, "ok" if cur == rec_uuid else "changed"))
    return out


@contextlib.contextmanager
def building(artifact_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Build an artifact directory in place, marking it incomplete until the caller writes its manifest.

    A stale manifest is removed first, so a crash mid-build never leaves a directory that looks complete.
    Use for artifacts that are resumable piece by piece (shards of scores); for all-or-nothing artifacts
    prefer :func:`atomic_path` on the whole directory.
    """
    d = Path(artifact_dir)
    with writing(d):
        if overwrite and d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        m = d / MANIFEST
        if m.exists():
            m.unlink()
        yield d


class Timer:
    """``with Timer() as t: ...; t.seconds``"""

    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.t0


def fresh_tmpdir(parent: str | Path, prefix: str = ".tmp-") -> Path:
    Path(parent).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config ``cfg`` as YAML next to an output (atomically)."""
    atomic_write_text(path, dump_yaml(cfg))


def check_replaceable(out: str | Path, kind: str, own_files: set[str] | frozenset[str] = frozenset()) -> None:
    """Refuse to replace ``out`` unless it is absent, empty, a (possibly incomplete) ``kind`` artifact, or holds only
    ``own_files`` (and dot-files): any other directory may be someone's data. One-line errors name ``out``."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise LmselectError(f"{out}: exists and is not a directory")
    if is_complete(out):
        have = read_manifest(out).get("kind")
        if have != kind:
            raise LmselectError(f"{out}: holds a '{have}' artifact; choose another --out")
        return
    foreign = [q.name for q in out.iterdir() if q.name not in own_files and not q.name.startswith(".")]
    if foreign:
        raise LmselectError(f"{out}: not empty and not {'an' if kind[0] in 'aeiou' else 'a'} {kind} (contains "
                            f"{foreign[0]}); choose another --out")


def remove_stale_tmp(path: str | Path, logger: Any = None) -> list[Path]:
    """Remove the temporary siblings ``.NAME.tmp-PID-*`` of ``path`` (see :func:`atomic_path`) whose process is no
    longer running on this host: what a killed run left behind. A live PID's (another run writing right now) is
    kept. Returns what was removed."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return []
    pat = re.compile(rf"^\.{re.escape(path.name)}\.tmp-(\d+)-[0-9a-f]+$")
    removed = []
    for p in parent.iterdir():
        m = pat.match(p.name)
        if not m:
            continue
        pid = int(m.group(1))
        try:
            os.kill(pid, 0)
            alive = pid != os.getpid()
        except ProcessLookupError:
            alive = False
        except PermissionError:  # someone else's live process
            alive = True
        if alive:
            continue
        if logger is not None:
            logger.info("removing leftover partial output %s", p)
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        removed.append(p)
    return removed
