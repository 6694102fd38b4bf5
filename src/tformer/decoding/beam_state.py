"""The state of a batched beam search, how it starts, and how its finished lists become results.

`BeamState` is every tensor a beam search carries from one step to the next: the running beams and
their scores, and each sentence's N best finished hypotheses so far. `start_state` makes the state of
step 0 (all beams are bos; only the first may expand) and `collect_finished` turns the finished lists
into `Hypothesis` objects at the end (or when a sentence leaves the batch). The search loops are in
decoding/beam.py, one step's update of this state in decoding/beam_step.py.

Shape legend: B sentences, N beams, R = B x N rows, H history (bos + T steps), T steps, S source length.
(H is not the heads of the model files.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tformer.config import DecodeConfig
from tformer.decoding.search_types import Hypothesis

NEG_INF = -float("inf")


@dataclass
class BeamState:
    sentence: Tensor  # B      original sentence index
    max_len: Tensor  # B
    src_mask: Tensor  # B S
    done: Tensor  # B
    history: Tensor  # B N H  running beams: bos, then tokens
    scores: Tensor  # B N    their log-probabilities
    coverage: Tensor  # B N S  summed cross-attention (coverage penalty only)
    attention: Tensor  # B N T S (return_attention only)
    fin_history: Tensor  # B N H  finished hypotheses, best first
    fin_scores: Tensor  # B N    normalised scores (-inf: empty slot)
    fin_log_probs: Tensor  # B N
    fin_n_tokens: Tensor  # B N    tokens, eos excluded
    fin_eos: Tensor  # B N    ended with eos
    fin_attention: Tensor  # B N T S


def start_state(B, N, S, T, bos_id, max_len_B, src_mask_BS, use_coverage, return_attention, device) -> BeamState:
    history_BNH = torch.zeros((B, N, T + 1), dtype=torch.long, device=device)
    history_BNH[:, :, 0] = bos_id
    scores_BN = torch.zeros((B, N), dtype=torch.float32, device=device)
    scores_BN[:, 1:] = NEG_INF  # all beams start equal: only the first may expand at step 0
    attention_shape = (B, N, T, S) if return_attention else (B, N, 0, 0)
    return BeamState(
        sentence=torch.arange(B, device=device),
        max_len=max_len_B,
        src_mask=src_mask_BS,
        done=torch.zeros(B, dtype=torch.bool, device=device),
        history=history_BNH,
        scores=scores_BN,
        coverage=torch.zeros((B, N, S) if use_coverage else (B, N, 0), dtype=torch.float32, device=device),
        attention=torch.zeros(attention_shape, dtype=torch.float32, device=device),
        fin_history=history_BNH.clone(),
        fin_scores=torch.full((B, N), NEG_INF, dtype=torch.float32, device=device),
        fin_log_probs=torch.zeros((B, N), dtype=torch.float32, device=device),
        fin_n_tokens=torch.zeros((B, N), dtype=torch.long, device=device),
        fin_eos=torch.zeros((B, N), dtype=torch.bool, device=device),
        fin_attention=torch.zeros(attention_shape, dtype=torch.float32, device=device),
    )


def max_len_per_row(state: BeamState) -> Tensor:
    """(R,) each beam's maximum length: its sentence's, for the step constraints (which work on rows)."""
    B, N = state.scores.shape
    return state.max_len[:, None].expand(B, N).reshape(-1)


def collect_finished(state: BeamState, results: list[list[Hypothesis]], config: DecodeConfig) -> None:
    """Turn the finished lists of `state`'s sentences into Hypothesis objects, best first."""
    sentences = state.sentence.tolist()
    scores, log_probs = state.fin_scores.tolist(), state.fin_log_probs.tolist()
    n_tokens, ended = state.fin_n_tokens.tolist(), state.fin_eos.tolist()
    src_lengths = state.src_mask.sum(dim=1).tolist()
    history = state.fin_history.cpu()
    attention = state.fin_attention.cpu() if state.fin_attention.shape[2] > 0 else None
    for b, sentence in enumerate(sentences):
        for k in range(config.nbest):
            if scores[b][k] == NEG_INF:
                break
            steps = n_tokens[b][k] + int(ended[b][k])
            results[sentence].append(
                Hypothesis(
                    tokens=history[b, k, 1 : 1 + n_tokens[b][k]].tolist(),
                    score=scores[b][k],
                    log_prob=log_probs[b][k],
                    attention=None if attention is None else attention[b, k, :steps, : src_lengths[b]].clone(),
                )
            )
