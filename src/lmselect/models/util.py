"""Small model utilities shared by the selection methods: freezing a reference, switching the attention kernel."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: a reference / teacher model that scores but never trains (returns ``model``)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@contextlib.contextmanager
def attention_implementation(model: nn.Module, impl: str | None) -> Iterator[None]:
    """Temporarily run an HF model with attention kernel ``impl`` ("eager", "sdpa", ...); None or the current one:
    no change. Restored on exit, also on errors."""
    old = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl is None or old == impl or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation(impl)
    try:
        yield
    finally:
        model.set_attn_implementation(old)
