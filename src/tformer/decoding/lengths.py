"""Output lengths and the length penalty, shared by every search.

Length of a hypothesis, for the penalty: the number of tokens it predicted, eos included when it ended
with one (a hypothesis cut at the maximum length has no eos). This is also Hugging Face's convention.

    gnmt:     lp(n) = ((5 + n) / 6) ** alpha         (Wu et al. 2016, GNMT)
    average:  lp(n) = n ** alpha                     (alpha = 1: the mean log-probability per token;
                                                      any alpha: Hugging Face's `length_penalty`)
    none:     lp(n) = 1
    score = log_prob / lp(n)

Shape legend: B sentences.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tformer.config import DecodeConfig


def length_penalty(lengths: Tensor | float, config: DecodeConfig) -> Tensor | float:
    """lp(n) for a tensor (or a number) of hypothesis lengths n."""
    alpha = config.length_penalty
    if isinstance(lengths, Tensor):
        lengths = lengths.float()  # fp32 as the scores it divides, whatever torch's default dtype (not float64)
    if config.length_normalization == "none" or alpha == 0.0:
        return torch.ones_like(lengths, dtype=torch.float32) if isinstance(lengths, Tensor) else 1.0
    if config.length_normalization == "gnmt":
        return ((5.0 + lengths) / 6.0) ** alpha
    return lengths**alpha


def max_output_lengths(src_lengths_B: Tensor, config: DecodeConfig, *, limit: int) -> Tensor:
    """max_len_a * source length + max_len_b per sentence (eos excluded), clamped to [1, limit].

    The source length counts the source's real tokens, its eos included.
    """
    # in float64: max_len_a in float32 (1.3 -> 1.29999995) would floor 1.3 x 90 to 116, not 117. Clamped
    # before the conversion to integers: a product or sum past 2**63 (max_len_a 1e20, max_len_b 2**63 - 1)
    # wrapped around to a negative length, which the clamp then made 1 token
    lengths_B = (config.max_len_a * src_lengths_B.double()).floor() + float(config.max_len_b)
    return lengths_B.clamp(min=1, max=limit).long()
