"""Scores: a sharded, resumable sidecar of one score per pool sequence (or per .jsonl window and document).

The package is split by concern:

* :mod:`lmselect.score.sidecar` — the on-disk format: part names, ``read_scores``, ``read_scores_table``,
  ``read_documents``, ``write_scores``, part listing. Every reader of scores goes through it.
* :mod:`lmselect.score.job` — the sharded, resumable scoring job: ``score_pool``, model loading, forward scoring.
* :mod:`lmselect.score.windows` — .jsonl windowing, ``score_jsonl`` and the roll-up to document scores
  (``documents.parquet``, dolma attribute files); its input (files, records, ids) is read by
  :mod:`lmselect.data.readers`, its attribute files are written by :mod:`lmselect.data.records`.
* :mod:`lmselect.score.cli` — ``lmselect score`` (``add_arguments``, ``run``, ``--pool-shard`` parsing).

This module re-exports the public API, so ``from lmselect.score import read_scores, score_pool`` keeps working.
"""

from __future__ import annotations

from lmselect.data.readers import ID_POLICY, JsonlDoc, read_jsonl_docs, read_jsonl_texts, resolve_jsonl_inputs
from lmselect.data.records import DEFAULT_ATTRIBUTE, write_attributes
from lmselect.score.cli import ScoreConfig, parse_shard, pool_ids
from lmselect.score.job import (
    JOB_FILE,
    LMLossScorer,
    forward_scores,
    load_scoring_model,
    resolve_amp_dtype,
    score_pool,
    split_part,
)
from lmselect.score.sidecar import (
    ATTRIBUTES_DIR,
    DOCUMENTS_FILE,
    PART_RE,
    existing_split,
    list_parts,
    part_name,
    partial_name,
    read_documents,
    read_scores,
    read_scores_table,
    write_scores,
)
from lmselect.score.windows import (
    Windows,
    attribute_path,
    make_windows,
    resolve_tokenizer_dir,
    rollup_documents,
    score_jsonl,
)

__all__ = [
    "ATTRIBUTES_DIR", "DEFAULT_ATTRIBUTE", "DOCUMENTS_FILE", "ID_POLICY", "JOB_FILE", "PART_RE", "JsonlDoc", "LMLossScorer",
    "ScoreConfig", "Windows", "attribute_path", "existing_split", "forward_scores", "list_parts",
    "load_scoring_model", "make_windows", "parse_shard", "part_name", "partial_name", "pool_ids", "read_documents",
    "read_jsonl_docs", "read_jsonl_texts", "read_scores", "read_scores_table", "resolve_amp_dtype",
    "resolve_jsonl_inputs", "resolve_tokenizer_dir", "rollup_documents", "score_jsonl", "score_pool", "split_part", "write_attributes",
    "write_scores",
]
