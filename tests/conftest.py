"""Fixtures shared by the test files."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from helpers import perturbed

from tformer.config import preset
from tformer.model import Transformer


@pytest.fixture
def tiny_model() -> Transformer:
    return perturbed(Transformer(preset("tiny", src_vocab_size=40, tgt_vocab_size=40), seed=1)).eval()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models train several times faster on one thread than on two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
