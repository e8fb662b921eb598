"""The packed token pool: fixed-length sequences in a numpy memmap plus an index.

Layout of a pool directory (written by ``lmselect prepare`` through :func:`write_pool`)::

    pool/
      tokens.bin          raw memmap, dtype uint16 (vocab <= 65535) or uint32, shape [n_sequences, seq_len]
      sequences.parquet   one row per sequence: seq_id (= row of tokens.bin), shard (-1 = validation hold-out),
                          source (label of the document contributing most tokens), n_docs
      docs.parquet        one row per (sequence, document) span: seq_id, doc_id, source, start, length
      tokenizer/          HF tokenizer directory (AutoTokenizer.from_pretrained works on it)
      config.yaml         resolved prepare config
      manifest.json       kind="pool"; written last (see lmselect.artifacts); ``checksums["tokens.bin"]`` holds
                          its size, a sampled hash (checked on every open) and the full hash (``inspect --verify``)

A **sequence id** is the row in ``tokens.bin``; it never changes, so score sidecars and selections refer to it.
A **shard** is one round's candidate pool (METHODS §1.3); shards are assigned deterministically from the seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from lmselect.artifacts import (
    ArtifactError,
    LmselectError,
    Manifest,
    atomic_path,
    file_checksums,
    read_manifest,
    verify_checksums,
    write_manifest,
    writing,
)
from lmselect.data import tokenizer as hf_tokenizer  # the module: TokenPool has a load_tokenizer of its own

VAL_SHARD = -1
TOKENS = "tokens.bin"
_REBUILD = "rerun lmselect prepare"


class TokenRangeError(LmselectError):
    """A pool holds token ids outside its vocabulary (corrupt tokens.bin or a pool built with another tokenizer)."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def _read_exactly(f: Any, buf: memoryview, path: Path) -> None:
    """Fill ``buf`` from the raw file ``f`` (a raw read may return less than asked); a short file is an error."""
    got = 0
    while got < len(buf):
        n = f.readinto(buf[got:])
        if not n:
            raise ArtifactError(f"{path}: ends early (read {got} of {len(buf)} bytes at offset "
                                f"{f.tell() - got}); the file is truncated — {_REBUILD}")
        got += n


class TokenPool:
    """Read-only view of a complete pool directory."""

    def __init__(self, path: str | Path):
        import pyarrow.parquet as pq

        self.path = Path(path)
        self.manifest = read_manifest(self.path, kind="pool")
        info = self.manifest["extra"]
        self.seq_len: int = int(info["seq_len"])
        self.vocab_size: int = int(info["vocab_size"])
        self.eos_id: int = int(info["eos_id"])
        self.dtype = np.dtype(info["dtype"])
        self.n_sequences: int = int(self.manifest["counts"]["sequences"])
        self.n_shards: int = int(info["n_shards"])
        self.tokenizer_dir = self.path / "tokenizer"
        self.tokenizer_fingerprint: str = info.get("tokenizer_fingerprint", "")
        tb = self.path / TOKENS
        expected = self.n_sequences * self.seq_len * self.dtype.itemsize
        if not tb.is_file() or tb.stat().st_size != expected:
            raise ArtifactError(f"{tb}: size does not match the manifest ({self.n_sequences} x {self.seq_len})")
        verify_checksums(self.path, self.manifest, fix_hint=_REBUILD)  # the cheap, sampled check (~1 MiB read)
        self.tokens = np.memmap(tb, dtype=self.dtype, mode="r", shape=(self.n_sequences, self.seq_len))
        seqs = pq.read_table(self.path / "sequences.parquet", columns=["shard", "source", "n_docs"])  # seq_id = row
        self.shard: np.ndarray = seqs.column("shard").to_numpy().astype(np.int32)
        # codes through arrow's dictionary encoding: no Python string per sequence (memory flat in the pool's size)
        enc = seqs.column("source").combine_chunks().dictionary_encode()
        names = enc.dictionary.to_pylist()
        self.source_names: list[str] = sorted(names)
        remap = np.array([self.source_names.index(x) for x in names], dtype=np.int32)
        codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64) if len(enc) else np.zeros(0, np.int64)
        self.source_code: np.ndarray = remap[codes] if len(names) else np.zeros(0, np.int32)
        self.n_docs: np.ndarray = seqs.column("n_docs").to_numpy()

    # ---- selection helpers -------------------------------------------------------------------------------------
    def ids(self, shard: int | str | None = None) -> np.ndarray:
        """Sequence ids of one shard (``"val"`` or -1 for the hold-out), or of all training shards when None."""
        if shard is None:
            return np.flatnonzero(self.shard >= 0).astype(np.int64)
        if shard == "val":
            shard = VAL_SHARD
        return np.flatnonzero(self.shard == int(shard)).astype(np.int64)

    def sources(self, ids: np.ndarray | None = None) -> np.ndarray:
        """Source label (majority of tokens) of each sequence, as an array of str."""
        names = np.array(self.source_names, dtype=object)
        codes = self.source_code if ids is None else self.source_code[np.asarray(ids)]
        return names[codes]

    def rows(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows ``ids`` of ``tokens.bin``, ``[len(ids), seq_len]`` in the pool's dtype, read from the file; a run of
        consecutive ids is one read (sorted ids read fastest).

        Why not through the memmap (``self.tokens``): on a fault the kernel maps the cached pages around the one
        asked for too (fault-around, 64 KiB), so a process that reads a few scattered rows -- export's selection,
        a scoring shard -- ends up with most of the file in its resident set, growing with the pool. Reads hold
        only what they return."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.seq_len), dtype=self.dtype)
        if not len(ids):
            return out
        if ids.min() < 0 or ids.max() >= self.n_sequences:
            raise ArtifactError(f"{self.path / TOKENS}: sequence ids out of range (the pool has {self.n_sequences})")
        row = self.seq_len * self.dtype.itemsize
        cuts = np.flatnonzero(np.diff(ids) != 1) + 1
        with open(self.path / TOKENS, "rb", buffering=0) as f:
            for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(ids)]):
                f.seek(int(ids[a]) * row)
                _read_exactly(f, memoryview(out[a:b]).cast("B"), self.path / TOKENS)
        return out

    def span(self, seq_id: int, start: int, length: int) -> np.ndarray:
        """Tokens ``start:start + length`` of sequence ``seq_id`` (one document's span), read from the file as
        :meth:`rows` does."""
        out = np.empty(max(0, min(int(length), self.seq_len - int(start))), dtype=self.dtype)
        with open(self.path / TOKENS, "rb", buffering=0) as f:
            f.seek((int(seq_id) * self.seq_len + int(start)) * self.dtype.itemsize)
            _read_exactly(f, memoryview(out).cast("B"), self.path / TOKENS)
        return out

    def batch(self, ids: Sequence[int] | np.ndarray) -> Any:
        """LongTensor [len(ids), seq_len] of the given sequences (sorted reads are faster on disk)."""
        import torch

        ids = np.asarray(ids, dtype=np.int64)
        arr = self.rows(ids).astype(np.int64)
        # one max over the batch is cheap next to a forward pass, and turns a deep "index out of range in self" of the
        # embedding into a message naming the pool and the sequence
        if arr.size and int(arr.max()) >= self.vocab_size:
            row = int(np.flatnonzero(arr.max(axis=1) >= self.vocab_size)[0])
            raise TokenRangeError(
                f"{self.path / TOKENS}: sequence {int(ids[row])} holds token id {int(arr[row].max())} >= the pool's "
                f"vocabulary size {self.vocab_size}; the file is corrupt or was built with another tokenizer — "
                f"{_REBUILD}"
            )
        return torch.from_numpy(arr)

    def verify(self, full: bool = True) -> list[str]:
        """Check ``tokens.bin`` against the manifest's checksums (full hash by default); names of files checked."""
        return verify_checksums(self.path, self.manifest, full=full, fix_hint=_REBUILD)

    def load_tokenizer(self) -> Any:
        """The pool's HF tokenizer, loaded once per TokenPool (decoding examples calls this per sequence)."""
        if getattr(self, "_tokenizer", None) is None:
            self._tokenizer = hf_tokenizer.load_tokenizer(self.tokenizer_dir)
        return self._tokenizer

    def doc_spans(self) -> Any:
        import pyarrow.parquet as pq

        return pq.read_table(self.path / "docs.parquet")

    def decode(self, seq_id: int, max_tokens: int | None = None) -> str:
        tok = self.load_tokenizer()
        ids = self.tokens[int(seq_id)][: max_tokens or self.seq_len].tolist()
        return tok.decode(ids)

    def __len__(self) -> int:
        return self.n_sequences

    def __repr__(self) -> str:
        return f"TokenPool({self.path}, n={self.n_sequences}, seq_len={self.seq_len}, shards={self.n_shards})"


def write_pool(
    path: str | Path,
    tokens: np.ndarray,
    shard: np.ndarray,
    source: Sequence[str],
    tokenizer: Any,
    doc_spans: dict[str, Iterable[Any]] | None = None,
    config: dict[str, Any] | None = None,
    seed: int | None = None,
    counts: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    parents: list[dict[str, str]] | None = None,
) -> Path:
    """Write a complete pool directory atomically (built in a temp dir, renamed into place).

    ``tokens`` [N, L] integer array; ``shard`` [N] (-1 = validation); ``source`` [N] labels; ``tokenizer`` an HF
    tokenizer object (saved with ``save_pretrained``) or a tokenizer directory to copy. ``doc_spans`` columns
    seq_id, doc_id, source, start, length (defaults to one span per sequence).
    """
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise ArtifactError(f"{path}: a pool needs at least one sequence (got shape {tokens.shape})")
    n, seq_len = tokens.shape
    if isinstance(tokenizer, (str, Path)):
        tok_obj = hf_tokenizer.load_tokenizer(tokenizer)
    else:
        tok_obj = tokenizer
    vocab_size = len(tok_obj)
    dtype = token_dtype(vocab_size)
    eos_id = tok_obj.eos_token_id if tok_obj.eos_token_id is not None else vocab_size - 1
    shard = np.asarray(shard, dtype=np.int32)
    source = [str(s) for s in source]
    if len(shard) != n or len(source) != n:
        raise ArtifactError(f"{path}: shard/source arrays must have one entry per sequence")
    if doc_spans is None:
        doc_spans = {
            "seq_id": np.arange(n),
            "doc_id": [str(i) for i in range(n)],
            "source": source,
            "start": np.zeros(n, dtype=np.int64),
            "length": np.full(n, seq_len, dtype=np.int64),
        }
    n_docs = np.bincount(np.asarray(list(doc_spans["seq_id"]), dtype=np.int64), minlength=n)

    with atomic_path(path) as tmp:
        tmp.mkdir(parents=True)
        with writing(path / TOKENS, tmp / TOKENS):
            write_tokens_memmap(tmp / TOKENS, tokens.astype(dtype))
        pq.write_table(
            pa.table({"seq_id": np.arange(n, dtype=np.int64), "shard": shard, "source": source, "n_docs": n_docs}),
            tmp / "sequences.parquet",
        )
        pq.write_table(
            pa.table(
                {
                    "seq_id": pa.array(np.asarray(list(doc_spans["seq_id"]), dtype=np.int64)),
                    "doc_id": pa.array([str(x) for x in doc_spans["doc_id"]]),
                    "source": pa.array([str(x) for x in doc_spans["source"]]),
                    "start": pa.array(np.asarray(list(doc_spans["start"]), dtype=np.int64)),
                    "length": pa.array(np.asarray(list(doc_spans["length"]), dtype=np.int64)),
                }
            ),
            tmp / "docs.parquet",
        )
        if isinstance(tokenizer, (str, Path)):
            shutil.copytree(tokenizer, tmp / "tokenizer")
        else:
            tok_obj.save_pretrained(str(tmp / "tokenizer"))
        if config is not None:
            import yaml

            (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        shards_present = sorted(int(s) for s in np.unique(shard) if s >= 0)
        all_counts = {
            "sequences": int(n),
            "tokens": int(n * seq_len),
            "sequences_per_shard": {str(s): int((shard == s).sum()) for s in shards_present},
            "validation_sequences": int((shard == VAL_SHARD).sum()),
        }
        all_counts.update(counts or {})
        info = {
            "seq_len": int(seq_len),
            "vocab_size": int(vocab_size),
            "eos_id": int(eos_id),
            "dtype": dtype.name,
            "n_shards": len(shards_present),
            "tokenizer_fingerprint": hf_tokenizer.tokenizer_fingerprint(tok_obj),
        }
        info.update(extra or {})
        write_manifest(
            tmp,
            Manifest(
                kind="pool", config=config or {}, seed=seed, counts=all_counts, extra=info, parents=parents or [],
                checksums=file_checksums(tmp, [TOKENS]),
            ),
        )
    return path


def preallocate(path: str | Path, nbytes: int) -> None:
    """Create ``path`` with ``nbytes`` of disk space reserved.

    Why: a memmap over a sparse file that the disk cannot back dies of SIGBUS on the first page it cannot write, with
    no Python exception at all; reserving the space first turns a full disk into an ``OSError(ENOSPC)`` up front.
    """
    import errno
    import os

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            if nbytes > 0:
                os.posix_fallocate(fd, 0, nbytes)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
                raise OSError(e.errno, e.strerror, str(path)) from None
            os.ftruncate(fd, nbytes)  # filesystem without fallocate: a sparse file, as np.memmap would make
        except AttributeError:  # no posix_fallocate on this platform
            os.ftruncate(fd, nbytes)
    finally:
        os.close(fd)


def write_tokens_memmap(path: str | Path, tokens: np.ndarray) -> None:
    """Write a 2-D token array to ``path`` through a memmap over preallocated space, flushed to disk."""
    preallocate(path, tokens.nbytes)
    mm = np.memmap(path, dtype=tokens.dtype, mode="r+", shape=tokens.shape)
    mm[:] = tokens
    mm.flush()
    del mm
