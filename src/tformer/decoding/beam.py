"""Batched beam search with per-sentence termination, n-best lists and length/coverage penalties.

Each step, for every sentence (all tensors, no Python loop over hypotheses):
1. add the next-token log-probabilities of its N beams to the beams' scores and take the best 2N of the
   N x V continuations (2N, so that N survive even if N of them end with eos);
2. candidates among the first N that end (eos, or the sentence's maximum length) join the finished list,
   scored log_prob / lp(length) (+ coverage penalty); the N best finished are kept. (Only the first N:
   the textbook beam keeps the N best candidates and those of them that end are finished; the other N
   are there only to refill the running beams. Every candidate of step t has predicted t + 1 tokens,
   its eos included: that is its length);
3. the N best candidates that did not end become the beams; the KV cache follows each to its parent
   beam (`BeamDecoderCache` moves only a table of which slot holds each beam's history);
4. the sentence is done when its maximum length is reached, or when it holds N finished hypotheses and
   the best running beam, normalised at its current length, no longer beats the worst of them (with
   `early_stopping`, as soon as it holds N finished hypotheses).
This is Hugging Face's algorithm (`early_stopping=False`, or True), so with `length_normalization="average"`
the outputs match `generate(num_beams=N, length_penalty=alpha)` token for token. Done sentences leave the
batch at the periodic "all finished?" check, the loop's only host synchronisation (with
`DecodeConfig.static_step` they stay, see decoding/static_step.py, and without an n-gram ban or a
prefix the whole step is one function of fixed buffers, replayed as one CUDA graph on a GPU).

Shape legend: B sentences, N beams, R = B x N rows, K = 2N candidates, V vocabulary, H history
(bos + T steps), T steps, S source length. (K and H are not the head dim and heads of the model files.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from tformer.config import DecodeConfig
from tformer.decoding.constraints import StepConstraints, prefix_tensor
from tformer.decoding.graphed import GraphedFunction
from tformer.decoding.greedy import CHECK_EVERY
from tformer.decoding.incremental import IncrementalDecoder, check_inputs, decoding_capacity, take_rows
from tformer.decoding.lengths import length_penalty, max_output_lengths
from tformer.decoding.search_types import Hypothesis
from tformer.decoding.static_step import CapturedStep, StaticStepDecoder, make_decoder, uses_static_step
from tformer.decoding.top_k import top_k

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


@torch.inference_mode()
def beam_search(
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
    """The `config.nbest` best of `config.beam_size` beams per sentence, best first."""
    src_pad_mask = check_inputs(model, src_ids, src_pad_mask, bos_id=bos_id, eos_id=eos_id, config=config)
    B, S = src_ids.shape
    N = config.beam_size
    src_lengths_B = src_pad_mask.sum(dim=1)
    max_len_B = max_output_lengths(src_lengths_B, config, limit=model.config.max_positions)
    T = int(max_len_B.max())
    use_coverage = config.coverage_penalty > 0
    want_attention = return_attention or use_coverage
    static = uses_static_step(model, config, want_attention=want_attention)
    decoder = make_decoder(
        model,
        src_ids,
        src_pad_mask,
        # all beams are bos at step 0: one row per sentence, widened after it (a static step keeps N rows)
        rows_per_sentence=N if static else 1,
        beams=N,
        capacity=decoding_capacity(model, T),
        want_attention=want_attention,
        static=static,
        reorders_rows=True,
        compile_step=config.compile_step,
    )
    vocab_size = model.config.tgt_vocab_size
    prefix_RP = prefix_tensor(
        prefix, n_sentences=B, rows_per_sentence=N, eos_id=eos_id, vocab_size=vocab_size, device=src_ids.device
    )
    constraints = StepConstraints(config, eos_id=eos_id, vocab_size=vocab_size, prefix_RP=prefix_RP)
    state = _start(B, N, S, T, bos_id, max_len_B, src_pad_mask, use_coverage, return_attention, src_ids.device)
    results: list[list[Hypothesis]] = [[] for _ in range(B)]
    if static and constraints.without_history:  # one function per step: a CUDA graph on a GPU
        state = _search_in_whole_steps(decoder, constraints, state, T, eos_id, config)
    else:
        state = _search_step_by_step(decoder, constraints, state, T, eos_id, config, results, widen=not static)
    _collect(state, results, config)
    return results


def _search_step_by_step(
    decoder: IncrementalDecoder | StaticStepDecoder,
    constraints: StepConstraints,
    state: BeamState,
    T: int,
    eos_id: int,
    config: DecodeConfig,
    results: list[list[Hypothesis]],
    *,
    widen: bool,
) -> BeamState:
    """The decoding loop, one `decoder.step` and one `_step` at a time. `widen`: the decoder starts with
    one row per sentence. Sentences that leave the batch are collected into `results`; returns the
    state of those still in it."""
    N = config.beam_size
    last_R = state.history[:, :, 0].reshape(-1)
    length_1 = torch.zeros(1, dtype=torch.long, device=last_R.device)  # t + 1 during step t, on the device
    for t in range(T):
        if t == 0 and widen:  # one row per sentence, then every beam continues it
            log_probs_RV, attention_RS = _first_step_widened(decoder, last_R, N)
        else:
            log_probs_RV, attention_RS = decoder.step(last_R)
        Bc = state.scores.shape[0]
        history_RT = state.history.view(Bc * N, -1)[:, : t + 1]
        log_probs_RV = constraints.apply(log_probs_RV, t, history_RT, _max_len_per_row(state))
        length_1.add_(1)
        last_R = _step(state, log_probs_RV, attention_RS, length_1, eos_id, config, decoder)
        if (t + 1) % CHECK_EVERY == 0 and t + 1 < T:
            done = state.done.tolist()  # the periodic host synchronisation
            if all(done):
                break
            if any(done) and decoder.can_drop_rows:
                state, last_R = _leave(state, done, last_R, results, config, decoder, constraints)
    return state


def _first_step_widened(decoder: IncrementalDecoder, last_R: Tensor, N: int) -> tuple[Tensor, Tensor | None]:
    """Step 0 on each sentence's first row only (all N beams are bos), then widen the decoder to N rows
    per sentence; the outputs are repeated for the N beams (only the first may expand: see `_start`)."""
    log_probs_BV, attention_BS = decoder.step(last_R[::N])
    decoder.widen(N)
    log_probs_RV = log_probs_BV.repeat_interleave(N, dim=0)
    attention_RS = None if attention_BS is None else attention_BS.repeat_interleave(N, dim=0)
    return log_probs_RV, attention_RS


@dataclass
class WholeStepSearch:
    """The fixed buffers of a beam search whose whole step runs as one function (one CUDA graph): kept
    with the decoder's CapturedStep and reused by the next batch of the same shape and settings."""

    state: BeamState
    length_1: Tensor  # (1,) t + 1 during step t
    graph: GraphedFunction | None = None


def _search_in_whole_steps(
    decoder: StaticStepDecoder,
    constraints: StepConstraints,
    fresh: BeamState,
    T: int,
    eos_id: int,
    config: DecodeConfig,
) -> BeamState:
    """Beam search on the static step in which one step is a single function of fixed buffers: the
    decoder, the constraints, the beam update and the next tokens. On a GPU it is recorded once as a
    CUDA graph and each step is one replay; the host only checks "all finished?" every CHECK_EVERY steps.
    Returns the state that holds the finished lists."""
    decoder.check_room(T)  # its steps run in one recorded function, never through decoder.step
    buffers = decoder.step_buffers
    search = _whole_step_search(buffers, fresh, eos_id, config)

    def whole_step() -> None:
        search.length_1.add_(1)
        max_len_R = _max_len_per_row(search.state)
        log_probs_RV = constraints.apply_at(decoder.step_in_place(), search.length_1, max_len_R)
        buffers.tokens_R.copy_(_step(search.state, log_probs_RV, None, search.length_1, eos_id, config, decoder))

    on_gpu = buffers.tokens_R.device.type == "cuda"
    if on_gpu and search.graph is not None:  # this shape's step is recorded: replay it
        run_step = search.graph.replay
    else:
        # compiled: the decoder's and the search's element-wise work fused into fewer kernels
        run_step = torch.compile(whole_step, dynamic=False) if config.compile_step else whole_step
        if on_gpu:
            state_tensors = [getattr(search.state, item.name) for item in dataclasses.fields(BeamState)]
            mutable = [*state_tensors, search.length_1, buffers.tokens_R, *buffers.mutable()]
            search.graph = GraphedFunction(run_step, mutable=mutable, device=buffers.tokens_R.device)
            run_step = search.graph.replay
    for t in range(T):
        run_step()
        if (t + 1) % CHECK_EVERY == 0 and t + 1 < T and all(search.state.done.tolist()):
            break
    return search.state


def _whole_step_search(buffers: CapturedStep, fresh: BeamState, eos_id: int, config: DecodeConfig) -> WholeStepSearch:
    """The buffers of this shape and these settings (made at their first use), loaded with `fresh`, the
    start state of a new batch, and with bos as the next input tokens."""
    key = (*fresh.history.shape, eos_id, config.length_penalty, config.length_normalization, config.min_len)
    key += (config.forced_eos, config.early_stopping)
    key += tuple(config.banned_ids)
    search = buffers.searches.get(key)
    if search is None:
        # the search owns its buffers: `fresh` may hold the caller's tensors (the source mask), which the
        # next batch of this shape must not overwrite
        owned = BeamState(**{item.name: getattr(fresh, item.name).clone() for item in dataclasses.fields(BeamState)})
        search = buffers.searches[key] = WholeStepSearch(
            owned, torch.zeros(1, dtype=torch.long, device=fresh.done.device)
        )
    for item in dataclasses.fields(BeamState):  # a new batch: its start state into the buffers
        getattr(search.state, item.name).copy_(getattr(fresh, item.name))
    search.length_1.zero_()
    buffers.tokens_R.copy_(fresh.history[:, :, 0].reshape(-1))  # bos
    return search


def _leave(state, done, last_R, results, config, decoder, constraints) -> tuple[BeamState, Tensor]:
    """Collect the done sentences and drop them (and their beams' rows) from the batch."""
    N = config.beam_size
    device = last_R.device
    _collect(take_rows(state, torch.tensor([i for i, d in enumerate(done) if d], device=device)), results, config)
    keep = torch.tensor([i for i, d in enumerate(done) if not d], device=device)
    rows = (keep[:, None] * N + torch.arange(N, device=device)).reshape(-1)
    decoder.select(rows)
    constraints.select(rows)
    return take_rows(state, keep), last_R.index_select(0, rows)


def _start(B, N, S, T, bos_id, max_len_B, src_mask_BS, use_coverage, return_attention, device) -> BeamState:
    history_BNH = torch.zeros((B, N, T + 1), dtype=torch.long, device=device)
    history_BNH[:, :, 0] = bos_id
    scores_BN = torch.zeros((B, N), device=device)
    scores_BN[:, 1:] = NEG_INF  # all beams start equal: only the first may expand at step 0
    attention_shape = (B, N, T, S) if return_attention else (B, N, 0, 0)
    return BeamState(
        sentence=torch.arange(B, device=device),
        max_len=max_len_B,
        src_mask=src_mask_BS,
        done=torch.zeros(B, dtype=torch.bool, device=device),
        history=history_BNH,
        scores=scores_BN,
        coverage=torch.zeros((B, N, S) if use_coverage else (B, N, 0), device=device),
        attention=torch.zeros(attention_shape, device=device),
        fin_history=history_BNH.clone(),
        fin_scores=torch.full((B, N), NEG_INF, device=device),
        fin_log_probs=torch.zeros((B, N), device=device),
        fin_n_tokens=torch.zeros((B, N), dtype=torch.long, device=device),
        fin_eos=torch.zeros((B, N), dtype=torch.bool, device=device),
        fin_attention=torch.zeros(attention_shape, device=device),
    )


def _max_len_per_row(state: BeamState) -> Tensor:
    """(R,) each beam's maximum length: its sentence's, for the step constraints (which work on rows)."""
    B, N = state.scores.shape
    return state.max_len[:, None].expand(B, N).reshape(-1)


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


def _step(
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
    done (the numbered steps of the module docstring). The tensors of `state` are updated in place (they
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


def _collect(state: BeamState, results: list[list[Hypothesis]], config: DecodeConfig) -> None:
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
