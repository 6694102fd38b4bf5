"""Greedy search, and the single-path loop that sampling shares with it.

Every row follows one path: at each step a `choose` function picks one token per row (argmax for
greedy, a draw for sampling), told which original rows are still in the batch. Finished rows keep
running until the periodic check, where the loop ends if every row is finished, and otherwise finished
rows leave the batch (unless the decoder is the fixed-shape static step, whose rows stay to the end).
That check is the loop's only host synchronisation.

The textbook loop (run the decoder on <s> and the tokens chosen so far, take the most probable token
at the last position, stop at </s>) is written out in `tformer.explain.decoding_steps`. This loop makes
the same choices with one new position per step (`decoder.step`, over a KV cache), for a batch:
tests/test_decoding_equivalence.py checks it against search without a cache.

Shape legend: B sentences, R rows (sentences x samples), T steps, H history (bos + T), S source, V vocab,
P longest prefix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tformer.config import DecodeConfig
from tformer.decoding.constraints import StepConstraints, prefix_tensor
from tformer.decoding.incremental import IncrementalDecoder, check_inputs, decoding_capacity, take_rows
from tformer.decoding.lengths import length_penalty, max_output_lengths
from tformer.decoding.search_types import Hypothesis
from tformer.decoding.static_step import StaticStepDecoder, make_decoder, uses_static_step

CHECK_EVERY = 4  # steps between "all finished?" checks, the loop's only host synchronisations


@dataclass
class PathState:
    row: Tensor  # R      original row index
    max_len: Tensor  # R
    history: Tensor  # R H    bos, then the tokens
    log_prob: Tensor  # R
    n_tokens: Tensor  # R    predicted tokens, eos excluded
    ended_eos: Tensor  # R
    finished: Tensor  # R
    attention: Tensor  # R T S (empty when not asked for)


def greedy_search(
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
    """The most probable token at every step; one hypothesis per sentence."""
    return decode_paths(
        model,
        src_ids,
        src_pad_mask=src_pad_mask,
        bos_id=bos_id,
        eos_id=eos_id,
        config=config,
        prefix=prefix,
        return_attention=return_attention,
        paths_per_sentence=1,
        choose=lambda log_probs_RV, rows_R: log_probs_RV.argmax(dim=-1),
    )


@torch.inference_mode()
def decode_paths(
    model: Any,
    src_ids: Tensor,
    *,
    src_pad_mask: Tensor | None,
    bos_id: int,
    eos_id: int,
    config: DecodeConfig,
    prefix: list[list[int]] | None,
    return_attention: bool,
    paths_per_sentence: int,
    choose: Callable[[Tensor, Tensor], Tensor],
) -> list[list[Hypothesis]]:
    """Follow `paths_per_sentence` independent paths per sentence, each token picked by `choose`."""
    src_pad_mask = check_inputs(model, src_ids, src_pad_mask, bos_id=bos_id, eos_id=eos_id, config=config)
    B, S = src_ids.shape
    n = paths_per_sentence
    src_lengths_B = src_pad_mask.sum(dim=1)
    max_len_R = max_output_lengths(src_lengths_B, config, limit=model.config.max_positions).repeat_interleave(n)
    T = int(max_len_R.max())
    decoder = make_decoder(
        model,
        src_ids,
        src_pad_mask,
        rows_per_sentence=n,
        capacity=decoding_capacity(model, T),
        want_attention=return_attention,
        static=uses_static_step(model, config, want_attention=return_attention),
        reorders_rows=False,
        compile_step=config.compile_step,
    )
    vocab_size = model.config.tgt_vocab_size
    prefix_RP = prefix_tensor(
        prefix, n_sentences=B, rows_per_sentence=n, eos_id=eos_id, vocab_size=vocab_size, device=src_ids.device
    )
    constraints = StepConstraints(config, eos_id=eos_id, vocab_size=vocab_size, prefix_RP=prefix_RP)
    state = _start(max_len_R, T, S, bos_id, eos_id, with_attention=return_attention)
    done = _follow_paths(decoder, constraints, state, T, eos_id, choose)
    return _hypotheses(
        done, src_lengths_B, config, n_sentences=B, paths_per_sentence=n, with_attention=return_attention
    )


def _start(max_len_R: Tensor, T: int, S: int, bos_id: int, eos_id: int, *, with_attention: bool) -> PathState:
    """Every row at bos, with nothing chosen or scored yet."""
    R = max_len_R.shape[0]
    device = max_len_R.device
    history_RH = torch.full((R, T + 1), eos_id, dtype=torch.long, device=device)
    history_RH[:, 0] = bos_id
    return PathState(
        row=torch.arange(R, device=device),
        max_len=max_len_R,
        history=history_RH,
        log_prob=torch.zeros(R, dtype=torch.float32, device=device),
        n_tokens=torch.zeros(R, dtype=torch.long, device=device),
        ended_eos=torch.zeros(R, dtype=torch.bool, device=device),
        finished=torch.zeros(R, dtype=torch.bool, device=device),
        attention=torch.zeros((R, T, S) if with_attention else (R, 0, 0), dtype=torch.float32, device=device),
    )


def _follow_paths(
    decoder: IncrementalDecoder | StaticStepDecoder,
    constraints: StepConstraints,
    state: PathState,
    T: int,
    eos_id: int,
    choose: Callable[[Tensor, Tensor], Tensor],
) -> list[PathState]:
    """The decoding loop: up to T steps of one token per row. Returns the states of every row, in the
    groups in which they left the batch (the last group: the rows still there at the end)."""
    done: list[PathState] = []  # states of rows that left the batch
    last_R = state.history[:, 0]
    for t in range(T):
        log_probs_RV, attention_RS = decoder.step(last_R)
        log_probs_RV = constraints.apply(log_probs_RV, t, state.history[:, : t + 1], state.max_len)
        last_R = choose(log_probs_RV, state.row)
        _extend(state, t, last_R, log_probs_RV, attention_RS, eos_id)
        if (t + 1) % CHECK_EVERY == 0 and t + 1 < T:
            finished = state.finished.tolist()  # the periodic host synchronisation
            if all(finished):
                break
            if any(finished) and decoder.can_drop_rows:
                state, last_R = _leave(state, finished, last_R, done, decoder, constraints)
    done.append(state)
    return done


def _extend(
    state: PathState, t: int, token_R: Tensor, log_probs_RV: Tensor, attention_RS: Tensor | None, eos_id: int
) -> None:
    """Step t's chosen tokens into `state`, in place. A finished row stays as it was: its history gets
    eos (already there), its score and length do not change."""
    active_R = ~state.finished
    is_eos_R = token_R == eos_id
    state.log_prob += torch.where(active_R, log_probs_RV.gather(1, token_R[:, None])[:, 0], 0.0)
    state.history[:, t + 1] = torch.where(active_R, token_R, eos_id)
    state.n_tokens += active_R & ~is_eos_R
    state.ended_eos |= active_R & is_eos_R
    if attention_RS is not None:
        state.attention[:, t] = attention_RS
    state.finished |= active_R & (is_eos_R | (t + 1 >= state.max_len))


def _leave(
    state: PathState,
    finished: list[bool],
    last_R: Tensor,
    done: list[PathState],
    decoder: IncrementalDecoder | StaticStepDecoder,
    constraints: StepConstraints,
) -> tuple[PathState, Tensor]:
    """Move the finished rows' states to `done` and drop their rows from the batch (and the decoder's
    cache). Returns the remaining rows' state and last tokens."""
    device = last_R.device
    keep = torch.tensor([i for i, f in enumerate(finished) if not f], device=device)
    leave = torch.tensor([i for i, f in enumerate(finished) if f], device=device)
    done.append(take_rows(state, leave))
    state = take_rows(state, keep)
    decoder.select(keep)
    constraints.select(keep)
    return state, last_R.index_select(0, keep)


def _hypotheses(
    states: list[PathState],
    src_lengths_B: Tensor,
    config: DecodeConfig,
    *,
    n_sentences: int,
    paths_per_sentence: int,
    with_attention: bool,
) -> list[list[Hypothesis]]:
    results: list[list[Hypothesis]] = [[] for _ in range(n_sentences)]
    src_lengths = src_lengths_B.tolist()
    for state in states:
        scores = (state.log_prob / length_penalty(state.n_tokens + state.ended_eos, config)).tolist()
        rows, log_probs = state.row.tolist(), state.log_prob.tolist()
        n_tokens, ended = state.n_tokens.tolist(), state.ended_eos.tolist()
        history = state.history.cpu()
        attention = state.attention.cpu() if with_attention else None
        for i, row in enumerate(rows):
            sentence = row // paths_per_sentence
            steps = n_tokens[i] + int(ended[i])
            results[sentence].append(
                Hypothesis(
                    tokens=history[i, 1 : 1 + n_tokens[i]].tolist(),
                    score=scores[i],
                    log_prob=log_probs[i],
                    attention=None if attention is None else attention[i, :steps, : src_lengths[sentence]].clone(),
                )
            )
    for hypotheses in results:
        hypotheses.sort(key=lambda h: h.score, reverse=True)
    return results
