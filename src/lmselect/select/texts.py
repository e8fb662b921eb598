"""Text views of token data for the text-feature baselines (``fasttext``, ``dsir``): no method of its own.

Both baselines work on words, not on our BPE tokens, so they need the text of

* a pool sequence: its tokens decoded with the pool's tokenizer (special tokens such as the EOS between packed
  documents dropped), i.e. exactly the text the target trains on when the sequence is selected;
* a selection-set item: the tokens of its real (non-padding) positions decoded with the same tokenizer, so that
  target and candidate text pass through the same tokenizer round trip (any normalisation it does applies to both).

Decoding is batched (the HF fast tokenizer's ``batch_decode``); ``words`` is the word split both baselines share.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from lmselect.errors import LmselectError

#: NLTK's WordPunctTokenizer pattern (``\\w+|[^\\w\\s]+``): the tokenizer the DSIR code offers besides
#: ``word_tokenize`` (p-lambda/dsir dsir/hashed_ngram_dsir.py:20,78), and one that needs no NLTK data download
WORD_RE = re.compile(r"\w+|[^\w\s]+")


def one_line(text: str) -> str:
    """``text`` with its lines joined by single spaces (fastText reads one example per line; DCLM's classifier
    does the same before predicting: mlfoundations/dclm baselines/mappers/enrichers/
    quality_prediction_enrichers_calc_fasttext.py, ``" ".join(content.strip().splitlines())``)."""
    return " ".join(text.strip().splitlines())


def words(text: str, lower: bool = True) -> list[str]:
    """The word / punctuation-run split of ``text`` (lower-cased first by default, as DSIR does)."""
    return WORD_RE.findall(text.lower() if lower else text)


def pool_texts(pool: Any, ids: np.ndarray, batch: int = 1024) -> list[str]:
    """Decoded text of pool sequences ``ids`` (special tokens dropped), in the order of ``ids``."""
    tok = pool.load_tokenizer()
    ids = np.asarray(ids, dtype=np.int64)
    out: list[str] = []
    for i in range(0, len(ids), batch):
        rows = np.asarray(pool.tokens[ids[i : i + batch]], dtype=np.int64)
        out += tok.batch_decode(rows.tolist(), skip_special_tokens=True)
    return out


def valset_texts(vset: Any, tokenizer: Any) -> list[str]:
    """Decoded text of each item of a ValidationSet: the tokens of its real positions (the whole passage, context
    and final word for a LAMBADA set; padding dropped)."""
    tm = vset.token_mask
    n_real = (tm.sum(1) + 1).tolist() if tm is not None else [vset.input_ids.shape[1]] * len(vset)
    rows = [vset.input_ids[i, : int(n)].tolist() for i, n in enumerate(n_real)]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def selection_texts(ctx: Any, key: str, min_items: int) -> list[str]:
    """The selection set's item texts for method ``key`` (``fasttext`` / ``dsir``), with a one-line error naming
    the file when fewer than ``min_items`` items have any word left after normalisation."""
    vs = ctx.selection_set
    texts = [t for t in valset_texts(vs, ctx.pool.load_tokenizer()) if words(t)]
    if len(texts) < min_items:
        raise LmselectError(
            f"{vs.source}: the selection set has {len(texts)} item(s) with words, {key} needs at least {min_items} "
            f"(recipe key '{key}.min_target_items'); give validation.selection more items")
    return texts
