"""Filesystem faults end in one line and leave nothing complete-looking; content checksums catch corrupt files."""

from __future__ import annotations

import errno
import json
import os
import shutil

import numpy as np
import pytest

import lmselect.artifacts as A
from lmselect.artifacts import ChecksumError, DiskWriteError, is_complete, read_json
from lmselect.cli import main
from lmselect.data.pool import TokenPool, TokenRangeError, write_pool
from lmselect.testing import SAMPLE_TEXT


def _one_error_line(err: str, verb: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"lmselect {verb}: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture()
def corpus(tmp_path):
    p = tmp_path / "corpus.jsonl"
    p.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(SAMPLE_TEXT)))
    return p


def _prepare_args(corpus, out):
    return ["prepare", str(corpus), "--out", str(out), "--seq-len", "16", "--n-shards", "2", "--vocab-size", "300",
            "--no-progress"]


def _no_leftovers(out):
    assert not out.exists() or not is_complete(out)
    assert [p.name for p in out.parent.iterdir() if ".tmp-" in p.name] == []


def test_prepare_enospc_on_tokens_bin(tmp_path, corpus, monkeypatch, capsys):
    out = tmp_path / "pool"

    real_fsync = os.fsync

    def full_disk(fd):  # the disk fills up while the merge writes the pool's tokens.bin (its temp build dir)
        name = os.readlink(f"/proc/self/fd/{fd}")
        if name.endswith("tokens.bin") and "/.pool.tmp-" in name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    assert main(_prepare_args(corpus, out)) == 2
    line = _one_error_line(capsys.readouterr().err, "prepare")
    assert line.endswith(f"{out / 'tokens.bin'}: cannot write: no space left on device")
    _no_leftovers(out)
    assert not out.exists()
    # the tasks' parts survive a failed merge (a rerun only merges); a part on a full disk: one line naming it
    work = tmp_path / ".pool.work"
    assert (work / "parts" / "00000" / "part.json").is_file()
    shutil.rmtree(work)

    def full_disk_part(fd):
        if "/.pool.work/parts/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk_part)
    assert main(_prepare_args(corpus, tmp_path / "pool")) == 2
    line = _one_error_line(capsys.readouterr().err, "prepare")
    assert line.endswith(f"{work / 'parts' / '00000'}: cannot write: no space left on device")
    assert not out.exists() and not [p for p in (work / "parts").iterdir() if ".tmp-" in p.name]


def test_prepare_erofs_on_manifest(tmp_path, corpus, monkeypatch, capsys):
    out = tmp_path / "pool"
    real_open = open

    def ro_open(file, mode="r", *a, **k):
        if "w" in mode and f".{A.MANIFEST}.tmp-" in str(file):
            raise OSError(errno.EROFS, "Read-only file system", str(file))
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(A, "open", ro_open, raising=False)  # artifacts' own writes only
    assert main(_prepare_args(corpus, out)) == 2
    line = _one_error_line(capsys.readouterr().err, "prepare")
    # the temp name of the manifest is reported under its final name
    assert line.endswith(f"{out / A.MANIFEST}: cannot write: read-only file system"), line
    _no_leftovers(out)


def test_unrelated_oserror_is_not_called_a_write_fault(tmp_path):
    err = A.write_fault(tmp_path / "pool", PermissionError(errno.EACCES, "Permission denied", "/elsewhere/input.jsonl"))
    assert err is None  # an unreadable input is reported by the CLI under its own name
    assert A.write_fault(tmp_path / "x", ValueError("bad value")) is None


def _train_args(pool, out):
    return ["train", "--pool", str(pool), "--out", str(out), "--steps", "1", "--global_batch=4", "--micro_batch=4"]


def test_checkpoint_write_fault_torch_save(tiny_pool, tmp_path, monkeypatch, capsys):
    """torch.save hides the errno (RuntimeError from its zip writer): the filesystem is probed and named."""
    import torch

    out = tmp_path / "ckpt"

    def failing_save(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    class FullFS:  # statvfs of a full filesystem
        f_flag, f_bavail, f_frsize, f_blocks = 0, 0, 4096, 1000

    monkeypatch.setattr(torch, "save", failing_save)
    monkeypatch.setattr(os, "statvfs", lambda p: FullFS())
    assert main(_train_args(tiny_pool.path, out)) == 2
    line = _one_error_line(capsys.readouterr().err, "train")
    assert "checkpoints/step-0000001/training_state.pt: cannot write: no space left on device" in line, line
    assert not is_complete(out) and not (out / "model.safetensors").exists()
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").glob("step-*"))
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_checkpoint_write_fault_safetensors(tiny_pool, tmp_path, monkeypatch, capsys):
    """safetensors (Rust) reports 'os error 28' in its message: the errno is taken from there."""
    import transformers.modeling_utils as mu

    out = tmp_path / "ckpt"

    def failing(*a, **k):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(mu, "safe_save_file", failing)
    assert main(_train_args(tiny_pool.path, out)) == 2
    line = _one_error_line(capsys.readouterr().err, "train")
    assert "step-0000001/model.safetensors: cannot write: no space left on device" in line, line
    assert not is_complete(out)


def test_garbage_tokens_bin_of_right_size(tiny_pool, capsys):
    tb = tiny_pool.path / "tokens.bin"
    size = tb.stat().st_size
    tb.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    with pytest.raises(ChecksumError) as e:
        TokenPool(tiny_pool.path)
    assert str(e.value) == (
        f"{tb}: content does not match its manifest; the file changed or is corrupt — rerun lmselect prepare"
    )
    assert main(["inspect", str(tiny_pool.path)]) == 2
    assert "content does not match its manifest" in _one_error_line(capsys.readouterr().err, "inspect")


def test_old_manifest_without_checksums_loads(tiny_pool):
    m = read_json(tiny_pool.path / A.MANIFEST)
    assert set(m["checksums"]) == {"tokens.bin"}
    del m["checksums"]
    A.atomic_write_json(tiny_pool.path / A.MANIFEST, m)
    assert TokenPool(tiny_pool.path).verify() == []


def test_out_of_vocab_token_ids(tmp_path, tiny_tokenizer):
    from lmselect.train.loop import TrainConfig, train

    vocab = len(tiny_tokenizer)
    tokens = np.random.default_rng(0).integers(0, vocab, (12, 16))
    tokens[5, 3] = vocab + 7  # fits uint16, outside the vocabulary
    shard = np.array([0] * 6 + [1] * 6)
    pool = TokenPool(write_pool(tmp_path / "pool", tokens, shard, ["s"] * 12, tiny_tokenizer))
    assert pool.batch([0, 1, 2]).shape == (3, 16)
    with pytest.raises(TokenRangeError, match=rf"pool/tokens.bin: sequence 5 holds token id {vocab + 7} >= the pool's"):
        pool.batch([4, 5])
    cfg = TrainConfig(preset="debug", steps=2, global_batch=12, micro_batch=12, log_every=1)
    with pytest.raises(TokenRangeError, match="vocabulary size"):
        train(cfg, pool, pool.ids(), tmp_path / "ck")


def test_inspect_verify_detects_flipped_byte(tmp_path, tiny_tokenizer, capsys):
    n, L = 65536, 32  # 4 MiB of uint16: the open-time check samples 16 x 64 KiB of it
    tokens = np.random.default_rng(0).integers(0, len(tiny_tokenizer), (n, L))
    path = write_pool(tmp_path / "pool", tokens, np.arange(n) % 2, ["s"] * n, tiny_tokenizer)
    assert main(["inspect", str(path), "--verify", "--n", "0"]) == 0
    assert f"verified {path / 'tokens.bin'}" in capsys.readouterr().out
    with open(path / "tokens.bin", "r+b") as f:  # flip one byte between the first two sampled blocks
        f.seek(150_000)
        b = f.read(1)
        f.seek(150_000)
        f.write(bytes([b[0] ^ 0x01]))
    TokenPool(path)  # the cheap check does not read that byte
    assert main(["inspect", str(path), "--verify"]) == 2
    line = _one_error_line(capsys.readouterr().err, "inspect")
    assert f"{path / 'tokens.bin'}: content does not match its manifest" in line


def test_checkpoint_checksum_verified_on_load(tiny_pool, tmp_path):
    from lmselect.models.presets import build_model
    from lmselect.train.checkpoint import load_checkpoint_model, save_checkpoint

    model = build_model("debug", tiny_pool.vocab_size, seed=0)
    ck = save_checkpoint(tmp_path / "ck", model, tokenizer_dir=tiny_pool.tokenizer_dir)
    assert "model.safetensors" in read_json(ck / A.MANIFEST)["checksums"]
    load_checkpoint_model(ck)
    w = ck / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF  # small file: the sampled hash covers all of it
    w.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="model.safetensors: content does not match its manifest"):
        load_checkpoint_model(ck)


def test_disk_write_error_is_one_line(tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(np, "save", full)
    with pytest.raises(DiskWriteError, match=r"sel\.npy: cannot write: disk quota exceeded"):
        A.atomic_save_npy(tmp_path / "sel.npy", np.arange(3))
    assert list(tmp_path.iterdir()) == []
