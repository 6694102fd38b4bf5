"""A model in eval mode for the time of a block (decoding, validation, attention maps, alignments), and
every module's own mode back after it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """`model` in eval mode (dropout off) inside the block; after it every module has the mode it had before
    (also after an error), so that a model in training, or with some modules frozen in eval, is left as it
    was."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
