"""Turning a trained model into output tokens: greedy, beam search, sampling, ensembles, a Translator.

`generate` is the one entry point; it dispatches on the `DecodeConfig`:
sampling=True -> `sample`; beam_size == 1 -> `greedy_search`; otherwise `beam_search`.
Every search returns `list[list[Hypothesis]]`: an n-best list per sentence, best first.
On CPU in fp32 the search multiplies with oneDNN-packed weights (`tformer.model.packed`), packed for the
call and dropped after it. See docs/decoding.md for the exact scoring rules.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from tformer.config import DecodeConfig
from tformer.decoding.beam import beam_search
from tformer.decoding.ensemble import EnsembleModel
from tformer.decoding.greedy import greedy_search
from tformer.decoding.incremental import check_arguments
from tformer.decoding.lengths import length_penalty, max_output_lengths
from tformer.decoding.memory import sentences_per_batch
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
    `model` is a `Transformer` in eval mode or an `EnsembleModel`. fp32 weights on the CPU are packed for
    oneDNN for the call, compiled step (`compile_step`) or not (a caller decoding many batches can hold
    `packed_weights(model)` around all of them).

    A batch whose search would take more than half of the memory (tformer.decoding.memory) is decoded a
    few sentences at a time (the results are the same: a sentence's output does not depend on its batch);
    a search too large for even one sentence (a huge beam) is refused with a DecodingError before it starts.
    """
    check_arguments(model, src_ids, src_pad_mask, bos_id=bos_id, eos_id=eos_id, config=config)
    B, S = src_ids.shape
    per_batch = sentences_per_batch(
        model, config, source_length=S, device=src_ids.device, return_attention=return_attention
    )
    if per_batch is not None and per_batch < B and (prefix is None or len(prefix) == B):
        return [
            nbest
            for start in range(0, B, per_batch)
            for nbest in generate(
                model,
                src_ids[start : start + per_batch],
                src_pad_mask=None if src_pad_mask is None else src_pad_mask[start : start + per_batch],
                bos_id=bos_id,
                eos_id=eos_id,
                config=config,
                prefix=None if prefix is None else prefix[start : start + per_batch],
                return_attention=return_attention,
            )
        ]
    search = sample if config.sampling else greedy_search if config.beam_size == 1 else beam_search
    with packed_weights(model):
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
