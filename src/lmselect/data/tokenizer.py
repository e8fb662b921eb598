"""Tokenizers: load any Hugging Face tokenizer directory, or train a byte-level BPE on the pool.

Every pool carries its tokenizer as an HF tokenizer directory (``pool/tokenizer``) so that each model trained on the
pool loads with ``AutoTokenizer.from_pretrained`` and in lm-evaluation-harness. Two models can only be compared or
distilled (proxy <- target KL) when their tokenizers are identical; :func:`tokenizer_fingerprint` decides that.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from lmselect.artifacts import LmselectError


def load_tokenizer(path: str | Path) -> Any:
    """Load an HF tokenizer directory as ``PreTrainedTokenizerFast``; one-line error when it does not load."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.exists():
        raise LmselectError(f"{p}: tokenizer directory not found")
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # transformers raises many types here
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LmselectError(f"{p}: not a loadable Hugging Face tokenizer directory ({msg[:200]})") from None
    return tok


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the vocabulary (token -> id) and special tokens: equal iff two tokenizers encode identically."""
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    vocab = tokenizer.get_vocab()
    payload = {
        "vocab": sorted(vocab.items(), key=lambda kv: kv[1]),
        "eos": tokenizer.eos_token,
        "bos": tokenizer.bos_token,
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()[:16]


def check_same_tokenizer(a: Any, b: Any, what_a: str = "proxy", what_b: str = "target") -> None:
    """Raise a clear error before any compute when two models' tokenizers differ."""
    fa, fb = tokenizer_fingerprint(a), tokenizer_fingerprint(b)
    if fa != fb:
        raise LmselectError(
            f"tokenizer mismatch: {what_a} ({a if isinstance(a, (str, Path)) else fa}) and "
            f"{what_b} ({b if isinstance(b, (str, Path)) else fb}) must share one tokenizer"
        )
