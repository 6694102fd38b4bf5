"""Ancestral sampling with temperature, top-k and top-p (nucleus), reproducible under a seed.

Each sentence gets `config.nbest` independent samples, best score first. Draws come from a
`torch.Generator` seeded with `config.seed`, never from torch's global random state, so the same batch
with the same seed gives the same samples. Every step draws one uniform number for each of the batch's
original rows, and a row takes its own, so a path's draws do not depend on which other paths have
finished and left the batch (the default step) or stayed in it (the static step). Temperature, top-k
and top-p shape only the distribution a token is drawn from; `Hypothesis.log_prob` is the model's
(unscaled) log-probability of what was drawn.

Shape legend: R rows (sentences x samples), V vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tformer.config import DecodeConfig
from tformer.decoding.greedy import decode_paths
from tformer.decoding.incremental import check_arguments
from tformer.decoding.search_types import Hypothesis


class Sampler:
    """Draws one token per row from the shaped distribution, by inverting its cumulative distribution at
    the row's own uniform draw of the step."""

    def __init__(self, config: DecodeConfig, device: torch.device, *, rows: int) -> None:
        self.temperature = config.temperature
        self.top_k = config.top_k
        self.top_p = config.top_p
        self.rows = rows  # the batch's original rows: each step draws one number for each
        self.generator = torch.Generator(device=device).manual_seed(config.seed)

    def shaped_log_probs(self, logits_RV: Tensor) -> Tensor:
        """The log-probabilities tokens are drawn from: scaled, then truncated to top-k and top-p.
        Logits or log-probabilities give the same result (a per-row shift cancels)."""
        logits_RV = logits_RV / self.temperature
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

    def __call__(self, logits_RV: Tensor, rows_R: Tensor) -> Tensor:
        """One token for each row; rows_R: which of the original rows they are."""
        cumulative_RV = self.shaped_log_probs(logits_RV).exp().cumsum(dim=-1)
        uniform_R = torch.rand(self.rows, generator=self.generator, device=logits_RV.device)[rows_R]
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
        choose=Sampler(config, src_ids.device, rows=src_ids.shape[0] * config.nbest),
    )
