"""Bits per byte of a report set against a hand computation: Σ CE (nats) over the scored tokens / (ln 2 · UTF-8
bytes of the scored text)."""

from __future__ import annotations

import math

import pytest
import torch

from lmselect.data.valset import bits_per_byte, load_validation, scored_bytes, validation_loss
from lmselect.models.losses import token_ce
from lmselect.models.presets import build_model
from lmselect.testing import write_jsonl_texts

PASSAGES = ["The quick brown fox jumps over the lazy dog", "She opened the door and saw the café",
            "A language model predicts the next token"]


@pytest.mark.parametrize("kind", ["lambada", "text"])
def test_bits_per_byte_equals_a_hand_computation(kind, tmp_path, tiny_tokenizer):
    vs = load_validation(write_jsonl_texts(tmp_path / "v.jsonl", PASSAGES), tiny_tokenizer, kind=kind, seq_len=64)
    if kind == "lambada":  # the scored text is the final word with its leading space ("café": 5 bytes, 4 chars)
        want_bytes = sum(len((" " + p.rsplit(" ", 1)[1]).encode("utf-8")) for p in PASSAGES)
    else:  # every token after the first
        want_bytes = sum(len(p.encode("utf-8")) - len(tiny_tokenizer.decode(tiny_tokenizer.encode(p)[:1]).encode("utf-8"))
                         for p in PASSAGES)
    assert scored_bytes(vs, tiny_tokenizer) == want_bytes

    model = build_model("debug", len(tiny_tokenizer), seed=0).eval()
    nats = 0.0
    with torch.no_grad():
        for p in PASSAGES:  # one row at a time, no padding: the plain sum of CE over the scored tokens
            if kind == "lambada":
                ctx, word = p.rsplit(" ", 1)
                c, w = tiny_tokenizer.encode(ctx), tiny_tokenizer.encode(" " + word)
                ids = torch.tensor([c + w])
                nats += float(token_ce(model(input_ids=ids).logits, ids)[0, -len(w):].sum())
            else:
                ids = torch.tensor([tiny_tokenizer.encode(p)])
                nats += float(token_ce(model(input_ids=ids).logits, ids).sum())
    got = bits_per_byte(validation_loss(model, vs, batch_size=2), vs, tiny_tokenizer)
    assert got == pytest.approx(nats / (math.log(2) * want_bytes), rel=1e-5)
