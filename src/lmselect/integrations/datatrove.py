"""Score documents inside a datatrove pipeline: :class:`LmselectScorer`, a datatrove ``PipelineStep``.

    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from lmselect.integrations.datatrove import LmselectScorer

    LocalPipelineExecutor(pipeline=[
        JsonlReader("corpus/"),
        LmselectScorer("runs/paper/bliss/seed0/round3/bilevel", tokenizer_from="pool/"),  # or lm_loss=True + a checkpoint
        JsonlWriter("scored/"),
    ], tasks=64, workers=8, logging_dir="logs/score").run()

Each document gets ``doc.metadata["lmselect_score"]`` (``key``): the score ``lmselect score --jsonl`` gives the same
text with the same model (the same ``seq_len``-token windows, the unweighted mean of their finite scores; None when the
text has no token), computed by :class:`lmselect.score.documents.DocumentScorer`. With ``threshold`` the step also
drops documents scoring below it (and those without a score). The model is loaded once per task process, on first
use, so the step pickles as its arguments (what the executors ship to their workers); ``device="auto"`` takes the
task's GPU when it has one (``SlurmPipelineExecutor(..., gpus_per_task=1)``), else the CPU.
Documents are scored ``docs_per_batch`` at a time (their windows batched ``batch_size`` at a time) and leave the step
in their input order. Read the corpus with ``JsonlReader(..., adapter=lmselect_adapter)`` so that records without a
usable id (missing, null, "") carry the id lmselect gives them everywhere else (``lmselect.data.readers.ID_RULE``).
"""

from __future__ import annotations

import math
from itertools import islice
from pathlib import Path
from typing import Any, Iterator

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from lmselect.data.readers import record_id


def lmselect_adapter(self: Any, data: dict, path: str, id_in_file: int | str) -> dict:
    """A datatrove reader ``adapter`` that gives records lmselect's ids (:data:`lmselect.data.readers.ID_RULE`):
    datatrove's default adapter, except that a null or empty id is derived like a missing one
    (``"<file>/<0-based line>"``) and a non-string id becomes its JSON text. With it, ``JsonlReader(folder,
    adapter=lmselect_adapter)`` yields the ids that ``lmselect prepare`` / ``export`` / ``score --jsonl`` give the same
    records, so scores, exports and dropped lists join by id::

        JsonlReader("my_corpus/", adapter=lmselect_adapter)
    """
    raw = data.get(self.id_key)
    out = self._default_adapter(data, path, id_in_file)
    out["id"], _ = record_id(raw, str(path), int(id_in_file))
    return out


class LmselectScorer(PipelineStep):
    """Write an lmselect document score into each document's metadata (optionally drop those below ``threshold``).

    ``model``: a score model directory (BLISS bilevel dir or its ``score_model/``, a MATES ``scorer.json`` dir), or
    with ``lm_loss=True`` a causal-LM checkpoint scored by its negative mean token cross-entropy (the perplexity
    proxy), or the text scorer of a ``fasttext`` / ``dsir`` round (``RUN/<method>/seed<k>/round<r>/scores``: the
    classifier's P(target) / the DSIR log importance weight of the whole document). ``tokenizer_from``: the pool (or
    model) directory whose tokenizer encodes the text, as for ``lmselect score --jsonl --tokenizer-from``; a text
    scorer needs none. As ``score --jsonl``, the step refuses a model whose tokenizer differs from
    ``tokenizer_from``'s, and one that carries none to check unless ``trust_tokenizer=True``.
    """

    name = "lmselect scorer"
    type = "🔢 - SCORER"

    def __init__(self, model: str | Path, tokenizer_from: str | Path | None = None, *, lm_loss: bool = False,
                 seq_len: int | None = None, batch_size: int = 64, docs_per_batch: int = 256,
                 device: str = "auto", dtype: str = "auto", key: str = "lmselect_score",
                 threshold: float | None = None, trust_tokenizer: bool = False):
        super().__init__()
        if docs_per_batch < 1:
            raise ValueError(f"docs_per_batch must be >= 1, got {docs_per_batch}")
        self.model_path = str(model)
        self.tokenizer_from = None if tokenizer_from is None else str(tokenizer_from)
        self.lm_loss, self.seq_len, self.batch_size = lm_loss, seq_len, batch_size
        self.docs_per_batch, self.device, self.dtype = docs_per_batch, device, dtype
        self.key, self.threshold, self.trust_tokenizer = key, threshold, trust_tokenizer
        self._scorer: Any = None

    def __getstate__(self) -> dict[str, Any]:  # ship the arguments, never a loaded model
        d = dict(self.__dict__)
        d["_scorer"] = None
        return d

    def scorer(self) -> Any:
        """The loaded :class:`~lmselect.score.documents.DocumentScorer` (loaded on first use)."""
        if self._scorer is None:
            # torch: at the first document, not when a datatrove pipeline is built
            from lmselect.score.documents import DocumentScorer

            self._scorer = DocumentScorer(self.model_path, self.tokenizer_from, lm_loss=self.lm_loss,
                                          seq_len=self.seq_len, batch_size=self.batch_size, device=self.device,
                                          dtype=self.dtype, trust_tokenizer=self.trust_tokenizer)
        return self._scorer

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data is None:
            return
        it: Iterator[Any] = iter(data)
        scorer = None
        while chunk := list(islice(it, self.docs_per_batch)):
            scorer = scorer or self.scorer()  # loaded outside the timed part: the step's time is scoring time
            with self.track_time(unit="batch"):
                scores = scorer.score([d.text for d in chunk])
            for doc, s in zip(chunk, scores):
                self.stat_update("documents")
                value = float(s) if math.isfinite(float(s)) else None
                doc.metadata[self.key] = value
                if value is None:
                    self.stat_update("no_score")
                if self.threshold is not None and (value is None or value < self.threshold):
                    self.stat_update("dropped")
                    continue
                self.stat_update("forwarded")
                yield doc
