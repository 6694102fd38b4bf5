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

This file holds the search loops (step by step, or in whole steps of fixed buffers) and the dropping of
done sentences; the state, its start and its collection are in decoding/beam_state.py, and one step
(items 1-4) is `search_step` in decoding/beam_step.py.

Shape legend: B sentences, N beams, R = B x N rows, K = 2N candidates, V vocabulary, H history
(bos + T steps), T steps, S source length, P longest prefix. (K and H are not the head dim and heads of the
model files.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tformer.config import DecodeConfig
from tformer.decoding.beam_state import BeamState, collect_finished, max_len_per_row, start_state
from tformer.decoding.beam_step import search_step
from tformer.decoding.constraints import StepConstraints, prefix_tensor
from tformer.decoding.graphed import GraphedFunction
from tformer.decoding.greedy import CHECK_EVERY
from tformer.decoding.incremental import IncrementalDecoder, check_inputs, decoding_capacity, take_rows
from tformer.decoding.lengths import max_output_lengths
from tformer.decoding.search_types import Hypothesis
from tformer.decoding.static_step import (
    CapturedStep,
    StaticStepDecoder,
    compiled_step,
    make_decoder,
    uses_static_step,
)


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
    state = start_state(B, N, S, T, bos_id, max_len_B, src_pad_mask, use_coverage, return_attention, src_ids.device)
    results: list[list[Hypothesis]] = [[] for _ in range(B)]
    if static and constraints.without_history:  # one function per step: a CUDA graph on a GPU
        state = _search_in_whole_steps(decoder, constraints, state, T, eos_id, config)
    else:
        state = _search_step_by_step(decoder, constraints, state, T, eos_id, config, results, widen=not static)
    collect_finished(state, results, config)
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
    """The decoding loop, one `decoder.step` and one `search_step` at a time. `widen`: the decoder starts with
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
        log_probs_RV = constraints.apply(log_probs_RV, t, history_RT, max_len_per_row(state))
        length_1.add_(1)
        last_R = search_step(state, log_probs_RV, attention_RS, length_1, eos_id, config, decoder)
        if (t + 1) % CHECK_EVERY == 0 and t + 1 < T:
            done = state.done.tolist()  # the periodic host synchronisation
            if all(done):
                break
            if any(done) and decoder.can_drop_rows:
                state, last_R = _leave(state, done, last_R, results, config, decoder, constraints)
    return state


def _first_step_widened(decoder: IncrementalDecoder, last_R: Tensor, N: int) -> tuple[Tensor, Tensor | None]:
    """Step 0 on each sentence's first row only (all N beams are bos), then widen the decoder to N rows
    per sentence; the outputs are repeated for the N beams (only the first may expand: see `start_state`)."""
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
        max_len_R = max_len_per_row(search.state)
        log_probs_RV = constraints.apply_at(decoder.step_in_place(), search.length_1, max_len_R)
        buffers.tokens_R.copy_(search_step(search.state, log_probs_RV, None, search.length_1, eos_id, config, decoder))

    on_gpu = buffers.tokens_R.device.type == "cuda"
    if on_gpu and search.graph is not None:  # this shape's step is recorded: replay it
        run_step = search.graph.replay
    else:
        # compiled: the decoder's and the search's element-wise work fused into fewer kernels
        run_step = compiled_step(whole_step, buffers.tokens_R.device) if config.compile_step else whole_step
        if on_gpu:
            state_tensors = [getattr(search.state, item.name) for item in dataclasses.fields(BeamState)]
            mutable = [*state_tensors, search.length_1, buffers.tokens_R, *buffers.mutable()]
            search.graph = GraphedFunction(run_step, mutable=mutable, device=buffers.tokens_R.device)
            run_step = search.graph.replay
    for t in range(T):
        if not on_gpu:  # no graph to keep one shape: step t reads only the positions written, 0 .. t
            decoder.cache.show(t + 1)
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
    finished = torch.tensor([i for i, d in enumerate(done) if d], device=device)
    collect_finished(take_rows(state, finished), results, config)
    keep = torch.tensor([i for i, d in enumerate(done) if not d], device=device)
    rows = (keep[:, None] * N + torch.arange(N, device=device)).reshape(-1)
    decoder.select(rows)
    constraints.select(rows)
    return take_rows(state, keep), last_R.index_select(0, rows)
