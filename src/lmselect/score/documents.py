"""Score documents in memory, one call per batch of texts: the same windows and roll-up as ``lmselect score --jsonl``.

``score_jsonl`` (:mod:`lmselect.score.windows`) is a resumable job over one file that writes a sidecar;
:class:`DocumentScorer` is its streaming counterpart for code that already holds the documents (a datatrove pipeline,
:mod:`lmselect.integrations.datatrove`): the model and tokenizer are loaded once, each text is cut into the same
``seq_len``-token windows (:func:`~lmselect.score.windows.make_windows`), every window is scored by the same batched
forward (:func:`~lmselect.score.job.forward_scores`, right padding with a mask when a batch mixes lengths), and a
document's score is the same unweighted mean of its finite window scores
(:func:`~lmselect.score.windows.rollup_documents`), float32, NaN when it has none (an empty text).

Window scores do not depend on which other windows share their batch in exact arithmetic; in float32 a batch of
another shape may round differently (~1e-7 relative). With the same ``batch_size`` of 1 both paths run identical
shapes and agree bit for bit (tests/integrations/test_datatrove.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lmselect.artifacts import LmselectError, is_complete
from lmselect.data.pool import TokenPool
from lmselect.data.readers import JsonlDoc
from lmselect.data.tokenizer import load_tokenizer, tokenizer_fingerprint
from lmselect.score.job import check_vocab, load_scoring_model, resolve_amp_dtype, torch_device
from lmselect.score.windows import make_windows, resolve_tokenizer_dir, rollup_documents, score_windows
from lmselect.select.base import is_text_scorer, load_text_scorer


class DocumentScorer:
    """A score model (BLISS / MATES ``scorer.json``) or, with ``lm_loss``, a causal LM (the perplexity proxy),
    with the tokenizer of ``tokenizer_from``; or a text scorer a ``fasttext`` / ``dsir`` round saved
    (``scores/text_scorer``, loaded through the registry: :func:`lmselect.select.base.load_text_scorer`), which
    scores each whole document's text with no tokenizer and no windows. :meth:`score` maps texts to document scores
    (higher = preferred)."""

    def __init__(self, model: str | Path, tokenizer_from: str | Path | None = None, *, lm_loss: bool = False,
                 seq_len: int | None = None, batch_size: int = 64, device: str = "auto", dtype: str = "auto",
                 trust_tokenizer: bool = False):
        if batch_size < 1:
            raise LmselectError(f"batch_size must be >= 1, got {batch_size}")
        self.text_scorer = None
        if not lm_loss and is_text_scorer(model):
            self.text_scorer = load_text_scorer(model)
            self.tokenizer = self.seq_len = None
            return
        if tokenizer_from is None:
            raise LmselectError(f"{model}: a score model or checkpoint needs tokenizer_from (the pool or model "
                                "directory whose tokenizer encodes the text)")
        self.tokenizer_dir = resolve_tokenizer_dir(tokenizer_from)
        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        self.model, self.meta = load_scoring_model(model, lm_loss=lm_loss)
        check_vocab(self.meta, tokenizer_fingerprint(self.tokenizer), len(self.tokenizer), str(self.tokenizer_dir),
                     trust=trust_tokenizer)
        # the window length, resolved as score_jsonl resolves it
        if seq_len is None:
            seq_len = self.meta.get("seq_len")
        if seq_len is None and is_complete(tokenizer_from, "pool"):
            seq_len = TokenPool(tokenizer_from).seq_len
        if seq_len is None:
            seq_len = self.meta.get("max_positions")
        if seq_len is None:
            raise LmselectError(f"{model}: cannot tell the window length; pass seq_len")
        self.seq_len = int(seq_len)
        if self.meta.get("max_positions") and self.seq_len > int(self.meta["max_positions"]):
            raise LmselectError(f"seq_len {self.seq_len} exceeds the model's {self.meta['max_positions']} positions")
        self.batch_size = int(batch_size)
        self.device = torch_device(device)
        self.amp_dtype = resolve_amp_dtype(dtype, self.device)
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.model.to(self.device).eval()

    def score_windows(self, texts: Sequence[str]) -> tuple[Any, np.ndarray]:
        """(windows of ``texts``, their scores float32) — the rows ``score --jsonl`` writes as window scores."""
        win = make_windows([(str(i), t) for i, t in enumerate(texts)], self.tokenizer, self.seq_len)
        return win, score_windows(self.model, win, batch_size=self.batch_size, device=self.device,
                                  amp_dtype=self.amp_dtype, pad_id=self.pad_id)

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """Document scores (float32; NaN for a text without a scorable window). A text scorer gives one per whole
        text, as the round scored its candidates (0 for a text without words: no evidence either way), in float32
        like every sidecar (``score --jsonl`` writes the same values)."""
        import pyarrow as pa

        if self.text_scorer is not None:
            return np.asarray(self.text_scorer.score_texts(list(texts)), dtype=np.float64).astype(np.float32)
        if not len(texts):
            return np.zeros(0, dtype=np.float32)
        win, scores = self.score_windows(texts)
        docs = [JsonlDoc(str(i), t, "", i + 1) for i, t in enumerate(texts)]
        table = pa.table({"doc_index": pa.array(win.doc_index), "score": pa.array(scores)})
        return rollup_documents(table, docs).column("score").to_numpy(zero_copy_only=False).astype(np.float32)
