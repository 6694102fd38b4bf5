"""Golden tests: searches over a hand-written table of next-token probabilities, exact tokens and scores.

The fake model's decode returns log-probabilities looked up from the row's history (the tokens after
bos); the first source token picks the table, so sentences of one batch can follow different tables.
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from tformer.config import DecodeConfig
from tformer.decoding import beam_search, generate, greedy_search
from tformer.decoding.constraints import repeated_ngram_mask

PAD, BOS, EOS, A, B, C = 0, 1, 2, 3, 4, 5
V = 6

# history after bos -> {token: probability}; any other token has probability 0
TABLE_ENDS_EARLY = {
    (): {A: 0.6, B: 0.4},
    (A,): {EOS: 0.7, C: 0.3},
    (B,): {C: 0.9, EOS: 0.1},
    (A, C): {EOS: 1.0},
    (B, C): {EOS: 0.8, A: 0.2},
    (B, C, A): {EOS: 1.0},
}
TABLE_NO_EOS = {(): {A: 0.5, B: 0.3, C: 0.2}, (A,): {B: 0.6, C: 0.4}, (B,): {A: 0.9, C: 0.1}, (C,): {A: 1.0}}
TABLE_REPEATS = {(): {A: 0.9, B: 0.1}, (A,): {A: 0.8, B: 0.2}, (A, B): {A: 0.7, C: 0.3}, (A, B, C): {EOS: 1.0}}
TABLES = [TABLE_ENDS_EARLY, TABLE_NO_EOS, TABLE_REPEATS]


class FakeCache:
    def __init__(self) -> None:
        self.tokens: torch.Tensor | None = None
        self.memory_kv: list[torch.Tensor] = []

    @property
    def length(self) -> int:
        return 0 if self.tokens is None else self.tokens.shape[1]

    def reorder(self, indices):
        self.tokens = self.tokens.index_select(0, indices)

    def select(self, indices):
        self.reorder(indices)

    def select_memory(self, indices):
        self.memory_kv = [m.index_select(0, indices) for m in self.memory_kv]


class TableModel:
    """Encode/decode surface of a Transformer, answering from TABLES[src[:, 0]]."""

    training = False
    config = SimpleNamespace(max_positions=32, pad_id=PAD, tgt_vocab_size=V)

    def encode(self, src_ids, *, src_pad_mask):
        return src_ids[:, :1].clone()  # "memory": which table the sentence follows

    def project_memory(self, memory):
        return [memory]

    def new_cache(self, *, batch_size, capacity):
        return FakeCache()

    def decode(self, tgt_ids, *, memory, src_pad_mask, cache, return_attention=False):
        cache.tokens = tgt_ids if cache.tokens is None else torch.cat([cache.tokens, tgt_ids], dim=1)
        rows = []
        tables = cache.memory_kv[0][:, 0].repeat_interleave(len(cache.tokens) // len(cache.memory_kv[0]))
        for table_id, history in zip(tables.tolist(), cache.tokens.tolist(), strict=True):
            probs = TABLES[table_id].get(tuple(history[1:]), {EOS: 1.0})
            rows.append([math.log(probs[token]) if token in probs else -math.inf for token in range(V)])
        return torch.tensor(rows, dtype=torch.float64)[:, None, :]


def run(search, config, tables=(0,), prefix=None):
    src = torch.tensor([[table, EOS] for table in tables])
    return search(TableModel(), src, src_pad_mask=None, bos_id=BOS, eos_id=EOS, config=config, prefix=prefix)


def beam_config(**overrides) -> DecodeConfig:
    return DecodeConfig(**{"beam_size": 2, "nbest": 2, "max_len_a": 0.0, "max_len_b": 6, **overrides})


def check(hypotheses, expected):
    assert [h.tokens for h in hypotheses] == [tokens for tokens, _, _ in expected]
    assert [h.log_prob for h in hypotheses] == pytest.approx([math.log(p) for _, p, _ in expected], abs=1e-6)
    assert [h.score for h in hypotheses] == pytest.approx([score for _, _, score in expected], abs=1e-6)


def test_beam_finishes_one_hypothesis_early_and_keeps_searching():
    # step 1: "a eos" (p .42) ranks first and ends; the search goes on with "b c" (.36) and "a c" (.18);
    # step 2: "b c eos" (.288) and "a c eos" (.18) end; the two best finished are kept; "b c a" (.072)
    # cannot beat them, so the sentence is done.
    (hypotheses,) = run(beam_search, beam_config(length_normalization="none"))
    check(hypotheses, [([A], 0.42, math.log(0.42)), ([B, C], 0.288, math.log(0.288))])


def test_length_normalisation_changes_the_winner():
    # average, alpha 1: score = log p / (tokens + eos): "a" -0.868/2 = -0.434 < "b c" -1.245/3 = -0.415
    (hypotheses,) = run(beam_search, beam_config(length_normalization="average", length_penalty=1.0))
    check(hypotheses, [([B, C], 0.288, math.log(0.288) / 3), ([A], 0.42, math.log(0.42) / 2)])


def test_gnmt_length_penalty():
    # lp(n) = ((5 + n) / 6) ** alpha; with alpha 1 "a" (n=2) keeps the lead over "b c" (n=3)
    (hypotheses,) = run(beam_search, beam_config(length_normalization="gnmt", length_penalty=1.0))
    check(hypotheses, [([A], 0.42, math.log(0.42) / (7 / 6)), ([B, C], 0.288, math.log(0.288) / (8 / 6))])


def test_maximum_length_ends_hypotheses_without_eos():
    # never any eos: at the maximum length (2) the two best beams are finalised; length = 2 tokens
    (hypotheses,) = run(
        beam_search, beam_config(max_len_b=2, length_normalization="average", length_penalty=1.0), tables=(1,)
    )
    check(hypotheses, [([A, B], 0.30, math.log(0.30) / 2), ([B, A], 0.27, math.log(0.27) / 2)])


def test_greedy_min_len_prefix_and_ngram_on_the_table():
    config = DecodeConfig(beam_size=1, max_len_a=0.0, max_len_b=6, length_normalization="none")
    check(run(greedy_search, config)[0], [([A], 0.42, math.log(0.42))])
    # eos banned for 2 steps: "a" then "c" (p .3, not renormalised), then eos
    check(run(greedy_search, beam_config(beam_size=1, nbest=1, min_len=2, length_normalization="none"))[0],
          [([A, C], 0.18, math.log(0.18))])  # fmt: skip
    # forced first token "b", then free: "c", eos
    check(run(greedy_search, config, prefix=[[B]])[0], [([B, C], 0.288, math.log(0.288))])
    # without the ban greedy repeats "a" (then unknown history -> eos); with no-repeat-1 it must go a, b, c
    check(run(greedy_search, config, tables=(2,))[0], [([A, A], 0.72, math.log(0.72))])
    no_repeat = beam_config(beam_size=1, nbest=1, no_repeat_ngram_size=1, length_normalization="none")
    check(run(greedy_search, no_repeat, tables=(2,))[0], [([A, B, C], 0.9 * 0.2 * 0.3, math.log(0.054))])


def test_sentences_of_one_batch_follow_their_own_tables_and_end_independently():
    config = beam_config(length_normalization="average", length_penalty=1.0, max_len_b=3)
    together = run(generate, config, tables=(0, 1, 2))
    for index, table in enumerate((0, 1, 2)):
        alone = run(generate, config, tables=(table,))[0]
        assert [h.tokens for h in together[index]] == [h.tokens for h in alone]
        assert [h.score for h in together[index]] == pytest.approx([h.score for h in alone])


def test_beam_with_forced_prefix():
    (hypotheses,) = run(beam_search, beam_config(length_normalization="none"), prefix=[[B]])
    # "b eos" (.04) ends at step 1 (rank 2 of 2), "b c eos" (.288) at step 2; the running "b c a" (.072) still
    # beats the worst finished, so the search goes on and "b c a eos" (.072) replaces "b eos"
    check(hypotheses, [([B, C], 0.288, math.log(0.288)), ([B, C, A], 0.072, math.log(0.072))])


def test_repeated_ngram_mask():
    history = torch.tensor([[BOS, A, B, A], [BOS, A, B, C]])
    banned = repeated_ngram_mask(history, 2, V)  # last token a: "a b" exists -> b banned; last c: nothing
    assert banned[0].nonzero().flatten().tolist() == [B]
    assert banned[1].nonzero().flatten().tolist() == []


def test_prefix_errors_are_value_errors():
    with pytest.raises(ValueError, match="one list per sentence"):
        run(beam_search, beam_config(), prefix=[[A], [B]])
    with pytest.raises(ValueError, match="not eos"):
        run(beam_search, beam_config(), prefix=[[EOS]])


def test_decode_config_rejects_negative_values():
    with pytest.raises(ValueError, match="min_len must be at least 0"):
        DecodeConfig(min_len=-1)
    with pytest.raises(ValueError, match="nbest"):
        DecodeConfig(beam_size=2, nbest=3)


@pytest.mark.parametrize("search", [greedy_search, beam_search])
def test_a_forced_prefix_wins_over_banned_ids_and_the_ngram_ban(search):
    """The user forces "b" although it is banned (or would repeat an n-gram): it is kept, with the
    model's log-probability, and the bans apply again once the prefix has ended."""
    config = beam_config(beam_size=1 if search is greedy_search else 2, nbest=1, length_normalization="none")
    (banned,) = run(search, dataclasses.replace(config, banned_ids=(B,)), prefix=[[B]])
    check(banned, [([B, C], 0.288, math.log(0.288))])
    # "a a" repeats the 1-gram "a": forced anyway (p .9 x .8); after "a a" the table knows only eos
    (repeated,) = run(search, dataclasses.replace(config, no_repeat_ngram_size=1), tables=(2,), prefix=[[A, A]])
    check(repeated, [([A, A], 0.72, math.log(0.72))])


@pytest.mark.parametrize("search", [greedy_search, beam_search])
def test_forced_eos_ends_every_hypothesis_at_the_limit_with_eos_at_no_cost(search):
    """Table 1 never ends by itself at step 2 ("a" is followed by "b" or "c"); with forced_eos and a limit of 2
    the second token is eos, at probability 1 by force, and counts for the length penalty."""
    config = beam_config(
        beam_size=1 if search is greedy_search else 2, nbest=1, max_len_b=2, forced_eos=True,
        length_normalization="average", length_penalty=1.0,
    )  # fmt: skip
    (hypotheses,) = run(search, config, tables=(1,))
    check(hypotheses, [([A], 0.5, math.log(0.5) / 2)])
    # without it: "a b" (p .3) is cut at the limit, two tokens and no eos
    (cut,) = run(search, dataclasses.replace(config, forced_eos=False), tables=(1,))
    check(cut, [([A, B], 0.3, math.log(0.3) / 2)])
