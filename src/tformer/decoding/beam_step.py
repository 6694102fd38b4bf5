"""One beam-search step: extend every beam, move the candidates that end into the finished lists,
continue the N best that go on, and mark the sentences that are done.

`search_step` is items 1-4 of the algorithm in decoding/beam.py's docstring, one function each
(`_candidates`, `_finished_scores` and `_keep_best_finished`, `_continue_beams`, `_update_done`). All
of it is tensor work on a `BeamState` (decoding/beam_state.py), updated in place, with no host
synchronisation, so that the same step can run eagerly, compiled, or replayed as one CUDA graph.

Shape legend: B sentences, N beams, R = B x N rows, K = 2N candidates, V vocabulary, H history
(bos + T steps), T steps, S source length, M = N + K finished hypotheses and candidates merged. (K and H
are not the head dim and heads of the model files.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from tformer.config import DecodeConfig
from tformer.decoding.beam_state import NEG_INF, BeamState
from tformer.decoding.incremental import IncrementalDecoder
from tformer.decoding.lengths import length_penalty
from tformer.decoding.static_step import StaticStepDecoder
from tformer.decoding.top_k import top_k


def _gather_beams(x_BN_: Tensor, index_BK: Tensor) -> Tensor:
    """x[b, index[b, k], ...] for every b, k."""
    index = index_BK.view(*index_BK.shape, *([1] * (x_BN_.dim() - 2))).expand(-1, -1, *x_BN_.shape[2:])
    return x_BN_.gather(1, index)


class Candidates(NamedTuple):
    """A step's 2N best continuations of each sentence, best first."""

    scores_BK: Tensor  # log-probabilities: the beam's score + the new token's
    beam_BK: Tensor  # the beam each one continues
    token_BK: Tensor  # its new token
    history_BKH: Tensor  # the beam's history, with the new token at position t + 1


def search_step(
    state: BeamState,
    log_probs_RV: Tensor,
    attention_RS: Tensor | None,
    length_1: Tensor,
    eos_id: int,
    config: DecodeConfig,
    decoder: IncrementalDecoder | StaticStepDecoder,
) -> Tensor:
    """One beam-search step t on `state`: extend every beam by one token, move the candidates that end
    into the finished lists, keep the N best that go on as the new beams, and mark the sentences that are
    done (the numbered steps of decoding/beam.py's module docstring). The tensors of `state` are updated in place (they
    may be the fixed buffers of a CUDA graph); `length_1` holds t + 1 on the device. Returns the next
    input tokens (R,)."""
    N = state.scores.shape[1]
    # 1. the best 2N continuations of each sentence
    candidates = _candidates(state, log_probs_RV, length_1)
    # 2. candidates among the first N that end here (eos, or the maximum length) join the finished lists
    # (the first N are the textbook beam; the other N only refill the running beams, as in Hugging Face);
    # a -inf candidate (a banned token) and a sentence already done add nothing
    is_eos_BK = candidates.token_BK == eos_id
    ends_BK = is_eos_BK | (state.max_len <= length_1)[:, None]
    rank_K = torch.arange(2 * N, device=candidates.scores_BK.device)
    finalise_BK = ends_BK & (rank_K < N) & (candidates.scores_BK > NEG_INF) & ~state.done[:, None]
    # every candidate of step t has predicted t + 1 tokens (its eos included): lp(t + 1) divides them all
    penalty_1 = length_penalty(length_1, config)
    penalised_BK, attention_BKTS = _finished_scores(state, candidates, attention_RS, penalty_1, length_1, config)
    finished_BK = penalised_BK.masked_fill(~finalise_BK, NEG_INF)
    _keep_best_finished(state, candidates, finished_BK, is_eos_BK, attention_BKTS, length_1)
    # 3. the N best continuations that go on become the beams
    running_scores_BN, tokens_R = _continue_beams(state, candidates, ends_BK, decoder)
    # 4. per-sentence termination
    _update_done(state, running_scores_BN, penalty_1, length_1, config)
    return tokens_R


def _candidates(state: BeamState, log_probs_RV: Tensor, length_1: Tensor) -> Candidates:
    """The best 2N continuations of each sentence: per beam first (the beam's score shifts its whole
    row, so it is added after the top-k), then across its beams."""
    B, N = state.scores.shape
    V = log_probs_RV.shape[1]
    per_beam_log_probs_RK, per_beam_tokens_RK = top_k(log_probs_RV, min(2 * N, V))
    per_beam_log_probs_BNK = per_beam_log_probs_RK.view(B, N, -1)
    per_beam_tokens_BNK = per_beam_tokens_RK.view(B, N, -1)
    per_beam_scores_BNK = per_beam_log_probs_BNK + state.scores[:, :, None]
    scores_BK, flat_BK = per_beam_scores_BNK.view(B, -1).topk(2 * N, dim=-1)
    beam_BK = torch.div(flat_BK, per_beam_scores_BNK.shape[2], rounding_mode="floor")
    token_BK = per_beam_tokens_BNK.view(B, -1).gather(1, flat_BK)
    history_BKH = _gather_beams(state.history, beam_BK)
    history_BKH.index_copy_(2, length_1, token_BK[:, :, None])
    return Candidates(scores_BK, beam_BK, token_BK, history_BKH)


def _finished_scores(
    state: BeamState,
    candidates: Candidates,
    attention_RS: Tensor | None,
    penalty_1: Tensor,
    length_1: Tensor,
    config: DecodeConfig,
) -> tuple[Tensor, Tensor | None]:
    """The candidates' scores as finished hypotheses, log_prob / lp(length) (+ coverage penalty), and
    their attention maps (None unless asked for). The step's cross-attention (`attention_RS`, made while
    reading the beams' last tokens) is added to the beams' coverage and attention maps in `state`."""
    B, N = state.scores.shape
    penalised_BK = candidates.scores_BK / penalty_1
    if attention_RS is None:
        return penalised_BK, None
    attention_BKTS = None
    parent_attention_BNS = attention_RS.view(B, N, -1)
    if config.coverage_penalty > 0:
        coverage_BNS = state.coverage + parent_attention_BNS
        coverage_BKS = _gather_beams(coverage_BNS, candidates.beam_BK)
        penalised_BK = penalised_BK + _coverage_penalty(coverage_BKS, state, config)
        state.coverage.copy_(coverage_BNS)
    if state.attention.shape[2] > 0:
        state.attention.index_copy_(2, length_1 - 1, parent_attention_BNS[:, :, None])
        attention_BKTS = _gather_beams(state.attention, candidates.beam_BK)
    return penalised_BK, attention_BKTS


def _keep_best_finished(
    state: BeamState,
    candidates: Candidates,
    finished_BK: Tensor,
    is_eos_BK: Tensor,
    attention_BKTS: Tensor | None,
    length_1: Tensor,
) -> None:
    """Merge the candidates that finish (score > -inf in `finished_BK`) into each sentence's finished
    list and keep its N best, best first."""
    N = state.fin_scores.shape[1]
    merged_BM = torch.cat([state.fin_scores, finished_BK], dim=1)
    fin_scores_BN, keep_BN = merged_BM.topk(N, dim=1)
    state.fin_scores.copy_(fin_scores_BN)
    state.fin_history.copy_(_gather_beams(torch.cat([state.fin_history, candidates.history_BKH], dim=1), keep_BN))
    state.fin_log_probs.copy_(torch.cat([state.fin_log_probs, candidates.scores_BK], dim=1).gather(1, keep_BN))
    n_tokens_BK = length_1 - is_eos_BK.long()
    state.fin_n_tokens.copy_(torch.cat([state.fin_n_tokens, n_tokens_BK], dim=1).gather(1, keep_BN))
    state.fin_eos.copy_(torch.cat([state.fin_eos, is_eos_BK], dim=1).gather(1, keep_BN))
    if attention_BKTS is not None:
        state.fin_attention.copy_(_gather_beams(torch.cat([state.fin_attention, attention_BKTS], dim=1), keep_BN))


def _continue_beams(
    state: BeamState, candidates: Candidates, ends_BK: Tensor, decoder: IncrementalDecoder | StaticStepDecoder
) -> tuple[Tensor, Tensor]:
    """The N best candidates that do not end become the beams; the decoder's rows (its KV cache) follow
    their parents. Returns the new beams' scores (B, N) and tokens, the next inputs (R,)."""
    B, N = state.scores.shape
    running_scores_BN, chosen_BN = candidates.scores_BK.masked_fill(ends_BK, NEG_INF).topk(N, dim=1)
    parent_BN = candidates.beam_BK.gather(1, chosen_BN)
    rows_R = (parent_BN + torch.arange(B, device=parent_BN.device)[:, None] * N).view(-1)
    decoder.reorder(rows_R)
    state.history.copy_(_gather_beams(candidates.history_BKH, chosen_BN))
    state.scores.copy_(running_scores_BN)
    if state.coverage.shape[2] > 0:
        state.coverage.copy_(_gather_beams(state.coverage, parent_BN))
    if state.attention.shape[2] > 0:
        state.attention.copy_(_gather_beams(state.attention, parent_BN))
    return running_scores_BN, candidates.token_BK.gather(1, chosen_BN).view(-1)


def _update_done(
    state: BeamState, running_scores_BN: Tensor, penalty_1: Tensor, length_1: Tensor, config: DecodeConfig
) -> None:
    """A sentence is done at its maximum length, or when it holds N finished hypotheses and (unless
    `early_stopping`) its best running beam, normalised at its current length, does not beat the worst.

    Finished scores are sorted best first, so slot N-1 (`fin_scores[:, -1]`) is the worst kept, and it is
    finite only once all N slots are filled."""
    best_running_B = running_scores_BN[:, 0] / penalty_1
    full_B = state.fin_scores[:, -1] > NEG_INF
    settled_B = full_B if config.early_stopping else full_B & (best_running_B <= state.fin_scores[:, -1])
    state.done |= (state.max_len <= length_1) | settled_B


def _coverage_penalty(coverage_BKS: Tensor, state: BeamState, config: DecodeConfig) -> Tensor:
    """beta * sum over real source tokens of log(min(coverage, 1)) (GNMT), floored at log(1e-6) each."""
    logs_BKS = coverage_BKS.clamp(min=1e-6, max=1.0).log()
    return config.coverage_penalty * logs_BKS.masked_fill(~state.src_mask[:, None, :], 0.0).sum(dim=-1)
