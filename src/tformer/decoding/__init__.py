"""Turning a trained model into output tokens: greedy, beam search, sampling, ensembles, a Translator.

`generate` is the one entry point; it dispatches on the `DecodeConfig`:
sampling=True -> `sample`; beam_size == 1 -> `greedy_search`; otherwise `beam_search`.
Every search returns `list[list[Hypothesis]]`: an n-best list per sentence, best first.
On CPU in fp32 the search multiplies with oneDNN-packed weights (`tformer.model.packed`), packed for the
call and dropped after it. See docs/decoding.md for the exact scoring rules.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from torch import Tensor

from tformer.config import DecodeConfig
from tformer.decoding.beam import beam_search
from tformer.decoding.ensemble import EnsembleModel
from tformer.decoding.greedy import greedy_search
from tformer.decoding.lengths import length_penalty, max_output_lengths
from tformer.decoding.sampling import sample
from tformer.decoding.search_types import DecodingError, Hypothesis
from tformer.model.packed import packed_weights


def generate(
    model: Any,
    src_ids: Tensor,
    *,
    src_pad_mask: Tensor | None,
    bos_id: int,
    eos_id: int,
    config: DecodeConfig,
    prefix: list[list[int]] | None = None,
    return_attention: bool = False,
) -> list[list[Hypothesis]]:
    """Decode a batch of sources (B, S; padding on the right, `src_pad_mask` True for real tokens).

    `prefix` forces the first target tokens of each sentence (one list per sentence, may be empty).
    `model` is a `Transformer` in eval mode or an `EnsembleModel`. Unless the step is compiled
    (`compile_step`, which chooses its own kernels), fp32 weights on the CPU are packed for oneDNN for
    the call (a caller decoding many batches can hold `packed_weights(model)` around all of them).
    """
    if not isinstance(config, DecodeConfig):
        raise TypeError(f"config must be a DecodeConfig, got {type(config).__name__}")
    search = sample if config.sampling else greedy_search if config.beam_size == 1 else beam_search
    with nullcontext() if config.compile_step else packed_weights(model):
        return search(
            model,
            src_ids,
            src_pad_mask=src_pad_mask,
            bos_id=bos_id,
            eos_id=eos_id,
            config=config,
            prefix=prefix,
            return_attention=return_attention,
        )


__all__ = [
    "DecodingError",
    "EnsembleModel",
    "Hypothesis",
    "beam_search",
    "generate",
    "greedy_search",
    "length_penalty",
    "max_output_lengths",
    "sample",
]
