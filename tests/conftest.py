"""Fixtures shared by the test files."""

from __future__ import annotations

import pytest
from helpers import perturbed

from tformer.config import preset
from tformer.model import Transformer


@pytest.fixture
def tiny_model() -> Transformer:
    return perturbed(Transformer(preset("tiny", src_vocab_size=40, tgt_vocab_size=40), seed=1)).eval()
