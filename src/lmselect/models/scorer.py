"""Sequence-level scoring models: an LM backbone, mean-pooled over positions, then a linear head.

* BLISS score model (METHODS §1.1): s = sigmoid(w · meanpool(h(x)) + b), backbone copied from the warm-up proxy.
* MATES influence model (METHODS §2): the same with ``activation="identity"`` (a regression head).

Saved as a directory: ``backbone/`` (an HF causal-LM checkpoint, so the backbone reloads with transformers),
``head.safetensors`` and ``scorer.json`` (activation, hidden size, tokenizer fingerprint).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmselect.artifacts import LmselectError, atomic_path, atomic_write_json


def base_model(lm: nn.Module) -> nn.Module:
    """The transformer body of an HF causal LM (``gpt_neox`` / ``model``), without the LM head."""
    prefix = getattr(lm, "base_model_prefix", None)
    if prefix and hasattr(lm, prefix):
        return getattr(lm, prefix)
    raise LmselectError(f"cannot find the backbone of {type(lm).__name__}")


HEAD_INITS = ("normal", "torch_default")


class SequenceScorer(nn.Module):
    """``head_init`` (drawn from a generator seeded with ``seed`` when given):

    * ``normal``: weight ~ N(0, head_std²), bias 0 (METHODS §1.3a, lmselect's default);
    * ``torch_default``: weight and bias ~ U(−1/√d, 1/√d), what ``nn.Linear(d, 1)`` gets from PyTorch's default
      initialisation (kaiming_uniform with a = √5 has exactly that bound). The released BLISS code's head is this,
      because it is replaced after the model's weight init ran (bilevel_selection.py:246, 254-257). Drawn in
      float64, weight then bias."""

    def __init__(self, lm: nn.Module, activation: str = "sigmoid", head_std: float = 0.02, seed: int | None = None,
                 head_init: str = "normal"):
        super().__init__()
        if activation not in ("sigmoid", "identity"):
            raise LmselectError(f"unknown scorer activation '{activation}' (sigmoid, identity)")
        if head_init not in HEAD_INITS:
            raise LmselectError(f"unknown scorer head_init '{head_init}' ({', '.join(HEAD_INITS)})")
        self.lm = lm  # keep the full causal LM so the backbone saves/loads as an HF checkpoint
        self.activation = activation
        d = lm.config.hidden_size
        self.head = nn.Linear(d, 1)
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            if head_init == "normal":
                self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=g) * head_std)
                self.head.bias.zero_()
        self.head.to(device=next(lm.parameters()).device, dtype=next(lm.parameters()).dtype)
        if head_init == "torch_default":  # drawn in float64 and rounded once to the backbone's dtype
            bound = 1.0 / math.sqrt(d)
            with torch.no_grad():
                for t in (self.head.weight, self.head.bias):
                    t.copy_(torch.empty(t.shape, dtype=torch.float64).uniform_(-bound, bound, generator=g))

    @classmethod
    def from_causal_lm(cls, lm: nn.Module, activation: str = "sigmoid", seed: int | None = None,
                       head_init: str = "normal") -> SequenceScorer:
        """New scorer whose backbone is a deep copy of ``lm`` (parameters equal, storage separate)."""
        return cls(copy.deepcopy(lm), activation=activation, seed=seed, head_init=head_init)

    @property
    def backbone(self) -> nn.Module:
        return base_model(self.lm)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if attention_mask is None:
            return h.mean(dim=1)
        m = attention_mask.to(h.dtype).unsqueeze(-1)
        return (h * m).sum(1) / m.sum(1).clamp_min(1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Scores [B]: sigmoid(w·meanpool(h)+b) in (0, 1), or the raw regression output."""
        out = self.head(self.pooled(input_ids, attention_mask)).squeeze(-1)
        return torch.sigmoid(out) if self.activation == "sigmoid" else out

    def save_pretrained(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            tmp.mkdir(parents=True)
            self.lm.save_pretrained(str(tmp / "backbone"), safe_serialization=True)
            save_file({k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}, str(tmp / "head.safetensors"))
            atomic_write_json(tmp / "scorer.json", {"activation": self.activation, "hidden_size": self.lm.config.hidden_size, **(extra or {})})

    @classmethod
    def load(cls, path: str | Path, device: Any = None, dtype: Any = None) -> SequenceScorer:
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        p = Path(path)
        if not (p / "scorer.json").is_file():
            raise LmselectError(f"{p}: not a score model directory (no scorer.json)")
        meta = json.loads((p / "scorer.json").read_text())
        lm = AutoModelForCausalLM.from_pretrained(str(p / "backbone"), local_files_only=True)
        scorer = cls(lm, activation=meta["activation"])
        scorer.head.load_state_dict(load_file(str(p / "head.safetensors")))
        scorer.meta = meta
        return scorer.to(device=device, dtype=dtype) if (device is not None or dtype is not None) else scorer
