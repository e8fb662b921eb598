"""Checkpoints in Hugging Face format, plus the training state needed to resume exactly.

A checkpoint directory::

    config.json, model.safetensors      save_pretrained: AutoModelForCausalLM.from_pretrained(dir) loads it as is
    tokenizer files                      copied from the pool, so AutoTokenizer / lm_eval --model hf load it too
    training_state.pt                    optimizer, step, data position, RNG states, token-selector state
    config.yaml                          the resolved TrainConfig
    manifest.json                        kind="checkpoint", written last; extra = {preset, step, tokens_seen, ...};
                                         checksums["model.safetensors"] = size + sampled hash (checked on load) +
                                         full hash (``lmselect inspect --verify``)

The training loop writes periodic checkpoints to ``OUT/checkpoints/step-XXXXXXX/``, each built in a temp dir and
renamed (all or nothing), and publishes the final one to ``OUT/`` itself (files moved in one by one, manifest last).
A crash at any point leaves either the previous complete checkpoint or the new one, never a half-written one that
looks complete; :func:`latest_checkpoint` finds the newest complete one to resume from. A full disk (or a read-only
one) while writing ends in one ``DiskWriteError`` naming the file, with the temp dir removed.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import random
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from lmselect.artifacts import (
    MANIFEST,
    LmselectError,
    Manifest,
    atomic_path,
    atomic_write_json,
    file_checksums,
    is_complete,
    read_manifest,
    verify_checksums,
    writing,
)

TRAINING_STATE = "training_state.pt"
WEIGHTS = "model.safetensors"
CHECKPOINTS_SUBDIR = "checkpoints"


def step_dir(out_dir: Path, step: int) -> Path:
    return out_dir / CHECKPOINTS_SUBDIR / f"step-{step:07d}"


@contextlib.contextmanager
def _quiet_hf() -> Iterator[None]:
    """No transformers progress bars while saving / loading: a checkpoint every N steps would flood the log."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


# ----------------------------------------------------------------------------------------------------------------
# RNG state


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (CPU) and, when present, CUDA generator states."""
    st: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(st["cuda"])


# ----------------------------------------------------------------------------------------------------------------
# partial state of a single-process loop (MATES probes and influence model, the RHO-1 reference)


def state_fingerprint(*parts: Any) -> str:
    """A digest of what a saved partial state was computed from, so that a rerun with other inputs starts afresh
    instead of resuming another computation. Tensors and arrays count by their bytes (moved to the CPU); modules and
    optimizers by the float64 sum and sum of squares of each state tensor, computed on its device (cheap for a large
    model; a guard against resuming another model's work, not a proof); anything else by its ``repr``."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)

    def add(x: Any) -> None:
        if isinstance(x, torch.nn.Module):
            for name, t in x.state_dict().items():
                h.update(name.encode())
                add_sums(t)
        elif isinstance(x, torch.optim.Optimizer):
            sd = x.state_dict()
            h.update(repr(sd["param_groups"]).encode())
            for k in sorted(sd["state"]):
                for name, t in sorted(sd["state"][k].items()):
                    h.update(f"{k}.{name}".encode())
                    if isinstance(t, torch.Tensor):
                        add_sums(t)
                    else:
                        h.update(repr(t).encode())
        elif isinstance(x, torch.Tensor):
            h.update(f"{x.dtype}{tuple(x.shape)}".encode())
            h.update(np.ascontiguousarray(x.detach().cpu().numpy()).tobytes())
        elif isinstance(x, np.ndarray):
            h.update(f"{x.dtype}{x.shape}".encode())
            h.update(np.ascontiguousarray(x).tobytes())
        else:
            h.update(repr(x).encode())

    def add_sums(t: torch.Tensor) -> None:
        d = t.detach().double()
        h.update(repr((tuple(t.shape), float(d.sum()), float((d * d).sum()))).encode())

    for p in parts:
        add(p)
    return h.hexdigest()


def save_partial_state(path: str | Path, state: dict[str, Any]) -> None:
    """Write a loop's partial state atomically (``torch.save`` into a temp file, renamed): a kill while saving
    leaves the previous one."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_partial_state(path: str | Path, key: str, what: str) -> dict[str, Any] | None:
    """The partial state at ``path`` when it was saved with fingerprint ``key`` (its ``"key"`` entry); else None,
    with a warning naming the file when one made from other inputs (or unreadable) is set aside."""
    import logging

    path = Path(path)
    if not path.is_file():
        return None
    try:
        st = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a damaged partial file is only lost work, never an error
        logging.getLogger("lmselect.train").warning("%s: unreadable (%s); %s starts from the beginning", path,
                                                    str(e).splitlines()[0] if str(e) else type(e).__name__, what)
        return None
    if not isinstance(st, dict) or st.get("key") != key:
        logging.getLogger("lmselect.train").warning(
            "%s: saved by a run with other inputs or settings; %s starts from the beginning", path, what)
        return None
    return st


# ----------------------------------------------------------------------------------------------------------------
# writing


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    *,
    tokenizer_dir: str | Path | None,
    training_state: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    parents: list[dict[str, str]] | None = None,
    seed: int | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a complete checkpoint directory at ``path`` atomically (temp dir + rename; replaces an old one).

    ``model`` is an (unwrapped) HF causal LM; ``state_dict`` overrides its weights (FSDP: the gathered full state).
    ``extra`` goes into the manifest (the loop records preset, step, tokens_seen, tokenizer_fingerprint, pool).
    """
    import yaml

    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.mkdir(parents=True)
        kwargs: dict[str, Any] = {"state_dict": state_dict}
        if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:  # transformers < 5
            kwargs["safe_serialization"] = True
        # each write names its own file on a filesystem fault: safetensors and torch.save hide the errno
        with _quiet_hf(), writing(path / WEIGHTS, tmp):
            model.save_pretrained(str(tmp), **kwargs)
        if tokenizer_dir is not None:
            for f in Path(tokenizer_dir).iterdir():
                if f.is_file():
                    with writing(path / f.name, tmp):
                        shutil.copy2(f, tmp / f.name)
        if training_state is not None:
            with writing(path / TRAINING_STATE, tmp):
                torch.save(training_state, tmp / TRAINING_STATE)
        if config is not None:
            with writing(path / "config.yaml", tmp):
                (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        checksums = file_checksums(tmp, [WEIGHTS]) if (tmp / WEIGHTS).is_file() else {}
        manifest = Manifest(
            kind="checkpoint", config=config or {}, seed=seed, parents=parents or [], extra=dict(extra or {}),
            checksums=checksums,
        )
        atomic_write_json(tmp / MANIFEST, manifest.to_json())
    return path


def publish_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Make ``dst`` (an output dir that also holds logs) a copy of the complete checkpoint ``src``.

    ``dst``'s manifest is removed first and rewritten last, so ``dst`` never looks complete with mixed files.
    """
    src, dst = Path(src), Path(dst)
    read_manifest(src, kind="checkpoint")
    dst.mkdir(parents=True, exist_ok=True)
    (dst / MANIFEST).unlink(missing_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name != MANIFEST:
            _copy_atomic(f, dst / f.name)
    _copy_atomic(src / MANIFEST, dst / MANIFEST)  # last: dst looks complete only once every file is in
    return dst


def _copy_atomic(src: Path, dst: Path) -> None:
    """Copy to a temp name and rename; on a filesystem fault the temp file goes and the error names ``dst``."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        with writing(dst, tmp):
            shutil.copy2(src, tmp)
            os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------------
# reading


def checkpoint_step(path: str | Path) -> int:
    return int(read_manifest(path, kind="checkpoint")["extra"].get("step", 0))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The complete checkpoint with training state and the highest step: ``out_dir`` itself or a periodic one."""
    out_dir = Path(out_dir)
    cands = [out_dir] + sorted((out_dir / CHECKPOINTS_SUBDIR).glob("step-*"))
    best: tuple[int, Path] | None = None
    for c in cands:
        if (c / TRAINING_STATE).is_file() and is_complete(c, kind="checkpoint"):
            s = checkpoint_step(c)
            if best is None or s > best[0]:
                best = (s, c)
    return None if best is None else best[1]


def prune_checkpoints(out_dir: str | Path, keep: Path | None) -> None:
    """Delete periodic checkpoints other than ``keep`` (only the newest is needed to resume)."""
    root = Path(out_dir) / CHECKPOINTS_SUBDIR
    for c in sorted(root.glob("step-*")):
        if keep is None or c.resolve() != Path(keep).resolve():
            shutil.rmtree(c, ignore_errors=True)
    if keep is None and root.is_dir() and not any(root.iterdir()):
        root.rmdir()


def load_training_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The ``training_state.pt`` of a complete checkpoint (our own file, so full unpickling is safe)."""
    path = Path(path)
    read_manifest(path, kind="checkpoint")
    f = path / TRAINING_STATE
    if not f.is_file():
        raise LmselectError(f"{path}: checkpoint has no {TRAINING_STATE} (weights only; cannot resume from it)")
    return torch.load(f, map_location=map_location, weights_only=False)


def load_checkpoint_model(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    *,
    attn_implementation: str = "sdpa",
    strict: bool = True,
) -> torch.nn.Module:
    """An HF causal LM from a checkpoint directory (local files only), float32 unless ``dtype`` says otherwise.

    ``strict`` requires a complete lmselect checkpoint (manifest); ``strict=False`` accepts any HF model directory.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if strict:
        verify_checksums(path, read_manifest(path, kind="checkpoint"), fix_hint="retrain or restore the checkpoint")
    elif not (path / "config.json").is_file():
        raise LmselectError(f"{path}: not a Hugging Face model directory (no config.json)")
    try:
        with _quiet_hf():
            model = AutoModelForCausalLM.from_pretrained(
                str(path), local_files_only=True, dtype=dtype or torch.float32, attn_implementation=attn_implementation
            )
    except Exception as e:  # transformers raises many types; the user needs one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LmselectError(f"{path}: cannot load the model ({msg[:200]})") from None
    if device is not None:
        model = model.to(device)
    return model
