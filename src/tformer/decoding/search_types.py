"""The one result type every decoding algorithm returns, and the decoding user error."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


class DecodingError(ValueError):
    """A decoding request that cannot be honoured as asked; the message says how to fix it."""


@dataclass
class Hypothesis:
    """One output sequence.

    `tokens` excludes bos and eos. `score` is what the hypotheses of a sentence are ranked by: `log_prob`
    divided by the length penalty (plus the coverage penalty in beam search), see docs/decoding.md.
    `attention`, when asked for, is the last decoder layer's cross-attention averaged over heads, one row
    per predicted token (`tokens`, then eos if the hypothesis ended with one) and one column per real
    source token (source eos included, padding excluded).
    """

    tokens: list[int]
    score: float
    log_prob: float
    attention: Tensor | None = None
