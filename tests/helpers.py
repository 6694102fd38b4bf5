"""Shared test helpers: tiny models with deterministic, non-trivial weights."""

from __future__ import annotations

import torch

from tformer.model import Transformer


def perturbed(model: Transformer, seed: int = 0, scale: float = 0.1) -> Transformer:
    """Add noise to every parameter, so zero biases and identity layer norms are tested too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * scale)
    return model
