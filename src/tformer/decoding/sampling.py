"""Ancestral sampling with temperature, top-k and top-p (nucleus), reproducible under a seed.

Each sentence gets `config.nbest` independent samples, best score first. A sentence's samples depend on
the sentence, the seed and the model alone, never on the batch it is decoded in (its size, the other
sentences, its row, padding, or how `generate` or a Translator cut the input): a row's uniform number at
step t is a hash of (`config.seed`, the sentence's source ids, the sample's index, t), computed on the
device with integer tensor arithmetic (`row_keys`, `Sampler.uniforms`), not drawn from a generator whose
stream every row of the batch shares. Two equal source sentences therefore get the same samples under one
seed. Temperature, top-k and top-p shape only the distribution a token is drawn from;
`Hypothesis.log_prob` is the model's (unscaled) log-probability of what was drawn.

Shape legend: B sentences, S source length, R rows (sentences x samples), V vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tformer.config import DecodeConfig
from tformer.decoding.greedy import decode_paths
from tformer.decoding.incremental import check_arguments
from tformer.decoding.search_types import Hypothesis

MASK32 = 0xFFFFFFFF
PRIME31 = 2**31 - 1  # the sentence hash is a polynomial modulo this prime: every product fits in int64
BASE = 1_000_003


def _mul32(x: Tensor, constant: int) -> Tensor:
    """x * constant modulo 2**32 for x in [0, 2**32), in halves so that no int64 product overflows."""
    high, low = constant >> 16, constant & 0xFFFF
    return (x * low + (((x * high) & 0xFFFF) << 16)) & MASK32


def _mix32(x: Tensor) -> Tensor:
    """A bijection of [0, 2**32) whose outputs look random (Wellons' lowbias32 integer hash)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _combine(key: Tensor, value: int | Tensor) -> Tensor:
    """A key that depends on both `key` and (the low 32 bits of) `value`. The key is mixed before `value`
    enters: keys that differ little (rows 0, 1, 2, ...) would otherwise give, with values 0, 1, 2, ..., the
    same inputs to the final mix in another order (row 1 at step 0 is row 0 at step 1)."""
    return _mix32(_mix32(key) ^ (value & MASK32))


def row_keys(src_ids: Tensor, src_pad_mask: Tensor, *, seed: int, paths_per_sentence: int) -> Tensor:
    """One 32-bit key per row (sentence-major, as the search lays rows out), from the seed, the sentence's
    real source ids (its padding and its row in the batch play no part) and the sample's index."""
    S = src_ids.shape[1]
    powers_S = torch.tensor([pow(BASE, s, PRIME31) for s in range(S)], device=src_ids.device)
    terms_BS = ((src_ids + 1) % PRIME31 * powers_S) % PRIME31 * src_pad_mask
    key_B = _combine(_mix32(terms_BS.sum(dim=1) % PRIME31), src_pad_mask.sum(dim=1))
    key_B = _combine(_combine(key_B, seed), seed >> 32)
    n = paths_per_sentence
    sample_R = torch.arange(n, device=src_ids.device).repeat(src_ids.shape[0])
    return _combine(key_B.repeat_interleave(n), sample_R)


class Sampler:
    """Draws one token per row from the shaped distribution, by inverting its cumulative distribution at
    the row's own uniform number of the step (`uniforms`). `keys_R`: one key per original row
    (`row_keys`); each call is one step."""

    def __init__(self, config: DecodeConfig, keys_R: Tensor) -> None:
        self.temperature = config.temperature
        self.top_k = config.top_k
        self.top_p = config.top_p
        self.keys_R = keys_R
        self.step = 0

    def shaped_log_probs(self, logits_RV: Tensor) -> Tensor:
        """The log-probabilities tokens are drawn from: scaled, then truncated to top-k and top-p.
        Logits or log-probabilities give the same result (a per-row shift cancels). The row's largest
        logit is taken away before the division: a tiny temperature (1e-40) made every logit over it -inf,
        and the distribution NaN, drawing token 0 (pad) at every step; shifted, the largest stays 0, and a
        temperature near 0 draws the most probable token, as its limit does (one that the logits' dtype
        holds only as 0 or a subnormal, 1e-46 in float32, divides as its smallest normal number)."""
        temperature = max(self.temperature, torch.finfo(logits_RV.dtype).tiny)
        logits_RV = (logits_RV - logits_RV.amax(dim=-1, keepdim=True)) / temperature
        if 0 < self.top_k < logits_RV.shape[1]:
            kth_R1 = logits_RV.topk(self.top_k, dim=-1).values[:, -1:]
            logits_RV = logits_RV.masked_fill(logits_RV < kth_R1, -float("inf"))
        if self.top_p < 1.0:
            sorted_RV, order_RV = logits_RV.sort(dim=-1, descending=True)
            probs_RV = sorted_RV.softmax(dim=-1)
            # drop a token when the tokens before it already hold top_p of the mass (the first always stays)
            drop_RV = probs_RV.cumsum(dim=-1) - probs_RV >= self.top_p
            logits_RV = logits_RV.scatter(1, order_RV, sorted_RV.masked_fill(drop_RV, -float("inf")))
        return logits_RV.log_softmax(dim=-1)

    def uniforms(self, rows_R: Tensor, step: int) -> Tensor:
        """The rows' numbers in [0, 1) at `step`: 24 random bits each, as torch.rand gives a float32."""
        bits_R = _combine(self.keys_R[rows_R], step)
        return (bits_R >> 8).to(torch.float32) * 2.0**-24

    def __call__(self, logits_RV: Tensor, rows_R: Tensor) -> Tensor:
        """One token for each row; rows_R: which of the original rows they are."""
        cumulative_RV = self.shaped_log_probs(logits_RV).exp().cumsum(dim=-1)
        uniform_R = self.uniforms(rows_R, self.step).to(cumulative_RV.dtype)
        self.step += 1
        target_R1 = uniform_R[:, None] * cumulative_RV[:, -1:]
        # the first token whose cumulative probability passes the target: it has a probability > 0
        token_R = torch.searchsorted(cumulative_RV, target_R1, right=True)[:, 0]
        # rounding may put the target at the total: then the last token with a probability > 0
        last_possible_R = cumulative_RV.argmax(dim=-1)
        return torch.minimum(token_R, last_possible_R)


def sample(
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
    """`config.nbest` samples per sentence, best score first."""
    check_arguments(model, src_ids, src_pad_mask, bos_id=bos_id, eos_id=eos_id, config=config)  # before the Sampler
    mask_BS = torch.ones_like(src_ids, dtype=torch.bool) if src_pad_mask is None else src_pad_mask
    keys_R = row_keys(src_ids, mask_BS, seed=config.seed, paths_per_sentence=config.nbest)
    return decode_paths(
        model,
        src_ids,
        src_pad_mask=src_pad_mask,
        bos_id=bos_id,
        eos_id=eos_id,
        config=config,
        prefix=prefix,
        return_attention=return_attention,
        paths_per_sentence=config.nbest,
        choose=Sampler(config, keys_R),
    )
