"""GPU tests (marker ``gpu``): every one skips without CUDA. Reuses the training tests' helpers (make_cfg, ...)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

_TRAIN = str(Path(__file__).resolve().parents[1] / "train")
if _TRAIN not in sys.path:
    sys.path.insert(0, _TRAIN)


@pytest.fixture()
def no_tf32():
    """Plain fp32 matmuls for the tight fp32 comparisons (train() switches TF32 on for the whole process)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
