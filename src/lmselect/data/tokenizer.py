"""Tokenizers: load any Hugging Face tokenizer directory, or train a byte-level BPE on the pool.

Every pool carries its tokenizer as an HF tokenizer directory (``pool/tokenizer``) so that each model trained on the
pool loads with ``AutoTokenizer.from_pretrained`` and in lm-evaluation-harness. Two models can only be compared or
distilled (proxy <- target KL) when their tokenizers are identical; :func:`tokenizer_fingerprint` decides that, and
:func:`check_same_tokenizer` refuses a mismatch before any compute (tokenizers given as objects, directories or
16-hex fingerprints).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from lmselect.artifacts import LmselectError

log = logging.getLogger("lmselect.tokenizer")


def load_tokenizer(path: str | Path) -> Any:
    """Load an HF tokenizer directory as ``PreTrainedTokenizerFast``; one-line error when it does not load."""
    p = Path(path)
    if not p.exists():
        raise LmselectError(f"{p}: tokenizer directory not found")
    try:
        if _plain_fast_tokenizer_dir(p):
            # same class AutoTokenizer would pick, without importing the auto-class registry (~2 s per process)
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast.from_pretrained(str(p), local_files_only=True)
        else:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # transformers raises many types here
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LmselectError(f"{p}: not a loadable Hugging Face tokenizer directory ({msg[:200]})") from None
    return quiet_length_warning(tok)


_LENGTH_WARNING = "sequence-length-is-longer-than-the-specified-maximum"


def quiet_length_warning(tok: Any) -> Any:
    """Silence transformers' "Token indices sequence length is longer than the specified maximum" for ``tok``.

    lmselect encodes whole documents on purpose and then packs or truncates them to ``seq_len`` itself (prepare,
    validation sets, jsonl scoring), so the warning is expected every time and only hides real messages. transformers
    marks it as shown in ``deprecation_warnings``; setting the mark up front keeps it from ever being printed.
    """
    warned = getattr(tok, "deprecation_warnings", None)
    if isinstance(warned, dict):
        warned[_LENGTH_WARNING] = True
    return tok


def _plain_fast_tokenizer_dir(p: Path) -> bool:
    """True for a directory holding a generic fast tokenizer (e.g. the BPE that ``prepare`` trains)."""
    cfg = p / "tokenizer_config.json"
    if not (p / "tokenizer.json").is_file() or not cfg.is_file():
        return False
    try:
        cls = json.loads(cfg.read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        return False
    return cls in ("PreTrainedTokenizerFast", "TokenizersBackend")


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


FINGERPRINT = re.compile(r"[0-9a-f]{16}")  # what tokenizer_fingerprint returns


def is_fingerprint(x: Any) -> bool:
    """True for a 16-hex fingerprint string (that is not also the name of an existing path)."""
    return isinstance(x, str) and FINGERPRINT.fullmatch(x) is not None and not Path(x).exists()


def as_fingerprint(x: Any) -> str:
    """The fingerprint of a tokenizer object or HF tokenizer directory; a fingerprint string is returned as is."""
    return x if is_fingerprint(x) else tokenizer_fingerprint(x)


def check_same_tokenizer(a: Any, b: Any, what_a: str = "proxy", what_b: str = "target") -> None:
    """Raise a clear error before any compute when two models' tokenizers differ. ``a`` / ``b``: tokenizer objects,
    HF tokenizer directories or fingerprints (:func:`tokenizer_fingerprint`); the error names a directory by its path,
    anything else by its fingerprint."""
    fa, fb = as_fingerprint(a), as_fingerprint(b)
    if fa != fb:
        def label(x: Any, fp: str) -> Any:
            return x if isinstance(x, (str, Path)) and not is_fingerprint(x) else fp

        raise LmselectError(
            f"tokenizer mismatch: {what_a} ({label(a, fa)}) and {what_b} ({label(b, fb)}) must share one tokenizer"
        )


EOS_TOKEN = "<|endoftext|>"
MIN_BPE_VOCAB = 257  # 256 byte symbols + <|endoftext|>


def train_bpe(texts: Iterable[str], vocab_size: int = 8192, model_max_length: int | None = None) -> Any:
    """Train a byte-level BPE (GPT-2 style) on ``texts``; returns a ``PreTrainedTokenizerFast``.

    ``<|endoftext|>`` is the only special token and serves as EOS, BOS, PAD and UNK (byte-level BPE never needs UNK,
    but lm-evaluation-harness and some collators expect the attributes to be set). Save it with
    ``save_pretrained(dir)``; ``AutoTokenizer.from_pretrained(dir)`` loads it back.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_BPE_VOCAB:
        raise LmselectError(f"config key 'vocab_size' must be >= {MIN_BPE_VOCAB} for a byte-level BPE (got {vocab_size})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps offsets byte-exact; the post-processor adds no special tokens
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    log.info("training a byte-level BPE tokenizer (vocabulary %d) on the corpus ...", vocab_size)
    t0 = time.perf_counter()
    tok.train_from_iterator(texts, trainer)
    log.info("BPE tokenizer trained in %.1fs (%d tokens)", time.perf_counter() - t0, tok.get_vocab_size())
    kwargs: dict[str, Any] = {}
    if model_max_length:
        kwargs["model_max_length"] = int(model_max_length)
    return quiet_length_warning(
        PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=EOS_TOKEN, unk_token=EOS_TOKEN,
            **kwargs,
        )
    )


def batch_encoder(tokenizer: Any) -> Callable[[list[str]], list[list[int]]]:
    """A function ``texts -> token id lists`` without special tokens, using the fastest path available.

    For fast tokenizers this calls the Rust backend directly (``encode_batch_fast`` skips offset bookkeeping and is
    parallel across threads when ``TOKENIZERS_PARALLELISM`` allows); slow tokenizers fall back to ``__call__``.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        fn = getattr(backend, "encode_batch_fast", None) or backend.encode_batch

        def encode(texts: list[str]) -> list[list[int]]:
            return [e.ids for e in fn(texts, add_special_tokens=False)]

        return encode

    def encode_slow(texts: list[str]) -> list[list[int]]:
        return list(tokenizer(texts, add_special_tokens=False)["input_ids"])

    return encode_slow


LONG_TEXT_CHARS = 1 << 18  # texts longer than this are tokenized piece by piece (:func:`split_long_text`)


def split_long_text(text: str, max_chars: int = LONG_TEXT_CHARS) -> Iterator[str]:
    """Cut ``text`` into consecutive pieces of at most about ``max_chars`` characters, each cut placed at the start
    of a run of whitespace, so that a long document can be tokenized (and a BPE trained on it) in bounded memory.

    Why there: a byte-level BPE's pre-tokenizer (the GPT-2 pattern, which prepare's own tokenizer uses) never joins a
    word with the whitespace before it into one piece except as a single leading space, and a whitespace run stays
    whole in the next piece, so encoding the pieces one after the other gives exactly the tokens of the whole text.
    Two cases can differ from whole-text tokenization: a stretch of ``max_chars`` characters without any whitespace
    (cut hard, mid-word), and tokenizers whose normalizer or pre-tokenizer looks across whitespace or adds a prefix
    at the start of each input (e.g. SentencePiece with ``add_dummy_prefix``): there the tokens next to a cut may
    differ. Pieces concatenate back to ``text``.
    """
    n, start = len(text), 0
    while n - start > max_chars:
        cut = start + max_chars
        i = max(text.rfind(" ", start + 1, cut), text.rfind("\n", start + 1, cut))
        if i > start:
            while i - 1 > start and text[i - 1].isspace():  # back to the start of the whitespace run
                i -= 1
        if i <= start or text[i - 1].isspace():
            i = cut  # no whitespace in the window: a hard cut
        yield text[start:i]
        start = i
    yield text[start:]
