"""Small real building blocks for tests and examples: an in-memory byte-level BPE and a tiny packed pool.

Used by lmselect's own test suite and handy for users' tests of code built on lmselect (no network, seconds on CPU).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SAMPLE_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "A language model predicts the next token from the tokens before it.",
    "Selecting good pretraining data lowers the validation loss of the model.",
    "Buy cheap pills now!!! Click here for a free offer, limited time only.",
    "The committee met on Tuesday to discuss the budget for the coming year.",
    "Rain is expected in the north, with sunshine in the south later today.",
    "She opened the door and saw the garden covered in snow.",
    "Subscribe to our mailing list to win a prize of one million dollars.",
] * 8


def make_tokenizer(vocab_size: int = 320):
    """A byte-level BPE trained in memory on a few sentences, wrapped as PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SAMPLE_TEXT, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>")


def make_pool(path: Path, tokenizer, n_per_shard: int = 16, n_shards: int = 2, n_val: int = 8, seq_len: int = 32, seed: int = 0) -> Path:
    """A pool of real tokenized sentences, two sources ('clean', 'spam'), shards 0..n_shards-1 plus a val hold-out."""
    from lmselect.data.pool import write_pool

    rng = np.random.default_rng(seed)
    clean = [t for t in SAMPLE_TEXT if "!!!" not in t and "prize" not in t]
    spam = [t for t in SAMPLE_TEXT if "!!!" in t or "prize" in t]
    n = n_per_shard * n_shards + n_val
    rows, sources = [], []
    eos = tokenizer.eos_token_id
    for i in range(n):
        src = "spam" if rng.random() < 0.3 else "clean"
        pool_txt = spam if src == "spam" else clean
        ids: list[int] = []
        while len(ids) < seq_len:
            ids += tokenizer.encode(pool_txt[rng.integers(len(pool_txt))]) + [eos]
        rows.append(ids[:seq_len])
        sources.append(src)
    shard = np.concatenate([np.repeat(np.arange(n_shards), n_per_shard), np.full(n_val, -1)]).astype(np.int32)
    return write_pool(path, np.array(rows), shard, sources, tokenizer, seed=seed, config={"test": True})


SAMPLE_LAMBADA = [
    "The quick brown fox jumps over the lazy dog",
    "A language model predicts the next token from the tokens before it",
    "She opened the door and saw the garden covered in snow",
    "The committee met on Tuesday to discuss the budget for the coming year",
    "Rain is expected in the north, with sunshine in the south later today",
    "Selecting good pretraining data lowers the validation loss of the model",
]


def write_jsonl_texts(path: Path, texts: list[str]) -> Path:
    """One ``{"text": ...}`` record per line."""
    import json

    Path(path).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return Path(path)


def make_valset(path: Path, tokenizer, texts: list[str] | None = None, kind: str = "lambada", seq_len: int = 32):
    """Write ``texts`` (default: six LAMBADA-style passages) to ``path`` and load them as a ValidationSet."""
    from lmselect.data.valset import load_validation

    return load_validation(write_jsonl_texts(path, texts or SAMPLE_LAMBADA), tokenizer, kind=kind, seq_len=seq_len)
