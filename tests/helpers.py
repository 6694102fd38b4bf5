"""Shared test helpers: tiny models with deterministic, non-trivial weights; the paper's learning rate."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from tformer.model import Transformer


def perturbed(model: Transformer, seed: int = 0, scale: float = 0.1) -> Transformer:
    """Add noise to every parameter, so zero biases and identity layer norms are tested too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * scale)
    return model


def paper_lr(step: int, *, d_model: int, warmup: int, scale: float = 1.0) -> float:
    """Eq. 3 of the paper, written independently of tformer.training.schedule."""
    return scale / math.sqrt(d_model) * min(1.0 / math.sqrt(step), step / warmup / math.sqrt(warmup))


def non_utf8_directory(parent: Path) -> Path:
    """A directory under `parent` whose name is not valid UTF-8 (Latin-1 bytes from an old archive), or a
    skip where the file system refuses such a name (macOS's, Windows')."""
    path = Path(os.fsdecode(os.fsencode(parent) + b"/caf\xe9"))
    try:
        path.mkdir()
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system takes no name that is not valid UTF-8")
    return path
