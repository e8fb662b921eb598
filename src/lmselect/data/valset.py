"""Validation sets: the text whose loss defines "good data".

Two kinds (METHODS §1.1):

* ``lambada``: one passage per record; the loss counts only the tokens of the **final word** (the passage's last
  whitespace-separated word, encoded with its leading space, exactly how lm-evaluation-harness splits
  lambada_openai into context and continuation).
* ``text``: plain documents; the loss counts every token.

Records are read from ``.jsonl`` (field ``text``) or ``.txt`` (one document per line). A ValidationSet is a padded
tensor ``input_ids`` [N, L] with ``loss_mask`` [N, L-1] marking which next-token predictions count, and
``token_mask`` [N, L-1] marking every real (non-pad) next-token position: for ``text`` sets the two are equal; for
``lambada`` sets ``token_mask`` is the all-token loss of the same passages, which BLISS can optimise instead of (or
mixed with) the final word (``BlissConfig.objective``).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from lmselect.artifacts import LmselectError
from lmselect.data.readers import iter_json_records
from lmselect.models.losses import token_ce


@dataclass
class ValidationSet:
    input_ids: torch.Tensor  # [N, L] long
    loss_mask: torch.Tensor  # [N, L-1] bool: the positions the set's own loss counts
    kind: str
    source: str
    # [N, L-1] bool: every real next-token position. None = derived from loss_mask: rows are right-padded and a
    # LAMBADA row ends with its final word, so the real positions are those up to each row's last counted one.
    token_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.token_mask is None:
            m = self.loss_mask.bool()
            pos = torch.arange(m.shape[1])
            last = torch.where(m.any(1), (m * (pos + 1)).amax(1), torch.zeros(m.shape[0], dtype=torch.long))
            self.token_mask = pos.unsqueeze(0) < last.unsqueeze(1)
        elif self.token_mask.shape != self.loss_mask.shape:
            raise LmselectError(f"{self.source}: token_mask shape {tuple(self.token_mask.shape)} != loss_mask shape "
                                f"{tuple(self.loss_mask.shape)}")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batches(self, batch_size: int, device: Any = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self), batch_size):
            ids = self.input_ids[i : i + batch_size]
            m = self.loss_mask[i : i + batch_size]
            # trim shared right padding so short sets run fast
            last = int(m.any(0).nonzero().max()) + 2 if m.any() else ids.shape[1]
            yield ids[:, :last].to(device), m[:, : last - 1].to(device)

    def subset(self, idx: Any) -> ValidationSet:
        assert self.token_mask is not None
        return ValidationSet(self.input_ids[idx], self.loss_mask[idx], self.kind, self.source, self.token_mask[idx])

    def objective_masks(self, device: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, loss_mask, token_mask) of the whole set, trimmed to the longest real row (one batch)."""
        assert self.token_mask is not None
        used = self.token_mask.any(0) | self.loss_mask.any(0)
        last = int(used.nonzero().max()) + 2 if used.any() else self.input_ids.shape[1]
        return (self.input_ids[:, :last].to(device), self.loss_mask[:, : last - 1].to(device),
                self.token_mask[:, : last - 1].to(device))


def read_texts(path: Path, field: str = "text") -> list[str]:
    """The items of a validation / text file: ``.jsonl`` records' ``field``, else one item per non-empty line."""
    if not path.is_file():
        raise LmselectError(f"{path}: validation file not found")
    if ".jsonl" in path.name:
        texts = []
        for n, rec in iter_json_records(path, what="validation file"):
            if field not in rec:
                raise LmselectError(f"{path}:{n}: record has no '{field}' field")
            texts.append(str(rec[field]))
    else:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            texts = [ln.rstrip("\n") for ln in f if ln.strip()]
    if not texts:
        raise LmselectError(f"{path}: validation file is empty")
    return texts


def load_validation(
    path: str | Path,
    tokenizer: Any,
    kind: str = "lambada",
    seq_len: int = 256,
    max_items: int | None = None,
    field: str = "text",
) -> ValidationSet:
    path = Path(path)
    if kind not in ("lambada", "text"):
        raise LmselectError(f"unknown validation kind '{kind}' (lambada, text)")
    texts = read_texts(path, field)[: max_items or None]
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    rows: list[list[int]] = []
    masks: list[list[bool]] = []  # the set's loss positions (every real position for ``text``)
    for t in texts:
        if kind == "lambada":
            ctx, _, word = t.rstrip().rpartition(" ")
            if not ctx:
                continue
            c = tokenizer.encode(ctx, add_special_tokens=False)
            w = tokenizer.encode(" " + word, add_special_tokens=False)
            ids = (c + w)[-seq_len:]
            n_w = min(len(w), len(ids) - 1)
            m = [False] * (len(ids) - 1 - n_w) + [True] * n_w
        else:
            ids = tokenizer.encode(t, add_special_tokens=False)[:seq_len]
            if len(ids) < 2:
                continue
            m = [True] * (len(ids) - 1)
        rows.append(ids)
        masks.append(m)
    if not rows:
        raise LmselectError(f"{path}: no usable validation records")
    L = max(len(r) for r in rows)
    ids_t = torch.full((len(rows), L), pad, dtype=torch.long)
    mask_t = torch.zeros((len(rows), L - 1), dtype=torch.bool)
    tok_t = torch.zeros((len(rows), L - 1), dtype=torch.bool)
    for i, (r, m) in enumerate(zip(rows, masks)):
        ids_t[i, : len(r)] = torch.tensor(r)
        mask_t[i, : len(m)] = torch.tensor(m)
        tok_t[i, : len(r) - 1] = True  # every next-token prediction inside the real row
    return ValidationSet(ids_t, mask_t, kind, str(path), tok_t)


@torch.no_grad()
def validation_loss(model: torch.nn.Module, vset: ValidationSet, batch_size: int = 32, device: Any = None) -> float:
    """Token-weighted mean CE over the masked positions of the whole set (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    total, count = 0.0, 0
    for ids, m in vset.batches(batch_size, device):
        ce = token_ce(model(input_ids=ids).logits, ids)
        total += float((ce * m).sum())
        count += int(m.sum())
    model.train(was_training)
    return total / max(count, 1)


def scored_bytes(vset: ValidationSet, tokenizer: Any) -> int:
    """UTF-8 bytes of the text whose tokens a set's loss scores: per row, the tokens at the ``loss_mask`` positions
    (the predicted tokens: ``input_ids[:, 1:]``) decoded together (a LAMBADA row: its final word with the leading
    space; a text row: everything after its first token)."""
    ids = vset.input_ids[:, 1:]
    total = 0
    for row, m in zip(ids, vset.loss_mask.bool()):
        total += len(tokenizer.decode(row[m].tolist()).encode("utf-8"))
    return total


def bits_per_byte(mean_ce: float, vset: ValidationSet, tokenizer: Any) -> float:
    """Bits per byte of a set from its token-weighted mean CE (nats, as :func:`validation_loss` returns):
    ``bpb = Σ CE / (ln 2 · bytes)`` with Σ CE = mean CE · scored tokens (tokenizer-independent, comparable across
    vocabularies and with other work)."""
    import math

    n_bytes = scored_bytes(vset, tokenizer)
    if n_bytes == 0:
        raise LmselectError(f"{vset.source}: the scored text has no bytes; bits per byte is undefined")
    return float(mean_ce) * int(vset.loss_mask.sum()) / (math.log(2) * n_bytes)
