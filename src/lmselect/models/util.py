"""Small model utilities shared by the selection methods: freezing a reference, switching the attention kernel
(``attention_implementation``), and twice-differentiable attention for Hessian-vector products and forward-mode AD
(``math_attention``)."""

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


@contextlib.contextmanager
def math_attention(*models: nn.Module) -> Iterator[None]:
    """Twice-differentiable attention for HVPs / forward-mode AD: SDPA restricted to the math backend, and models
    configured with a fused non-SDPA kernel (flash-attention) temporarily switched to eager attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    switched: list[tuple[nn.Module, str]] = []
    try:
        for m in models:
            impl = getattr(getattr(m, "config", None), "_attn_implementation", None)
            if impl not in (None, "sdpa", "eager"):
                m.set_attn_implementation("eager")
                switched.append((m, impl))
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        for m, impl in switched:
            m.set_attn_implementation(impl)
