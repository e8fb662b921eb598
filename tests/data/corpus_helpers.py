"""Helpers for corpus-preparation tests: tiny corpora written in any input format."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

SENTENCES = [
    "The committee met on Tuesday to discuss the budget for the coming year.",
    "Rain is expected in the north, with sunshine in the south later today.",
    "She opened the door and saw the garden covered in snow.",
    "A language model predicts the next token from the tokens before it.",
    "The quick brown fox jumps over the lazy dog.",
    "Selecting good pretraining data lowers the validation loss of the model.",
]
SPAM = [
    "Buy cheap pills now!!! Click here for a free offer, limited time only.",
    "Subscribe to our mailing list to win a prize of one million dollars.",
]


def write_jsonl(path: Path, records: list, compress: str = "") -> Path:
    """Write records (dicts, or raw str lines) as .jsonl / .jsonl.gz / .jsonl.zst."""
    lines = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()
    if compress == "gz":
        data = gzip.compress(lines)
    elif compress == "zst":
        import zstandard

        data = zstandard.ZstdCompressor().compress(lines)
    else:
        data = lines
    path.write_bytes(data)
    return path


def clean_records(n: int = 24, prefix: str = "c") -> list[dict]:
    return [{"id": f"{prefix}{i}", "text": " ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(1 + i % 3))} for i in range(n)]


def spam_records(n: int = 12) -> list[dict]:
    return [{"text": SPAM[i % 2] + f" Offer {i}."} for i in range(n)]
