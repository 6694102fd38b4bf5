"""What every returned hypothesis must satisfy, over random combinations of the decoding options.

The other decoding tests pin each option on its own (tests/test_decoding_golden.py), or the options
Hugging Face also has (tests/test_decoding_hf_fuzz.py); here they are combined, prefixes, the coverage
penalty and the static step included, and each hypothesis is checked against the rules of
docs/decoding.md: its log-probability is what a full teacher-forced pass gives, its score that over the
length penalty (plus the coverage penalty), its length within [min_len, max_len], its prefix forced, no
banned token or repeated n-gram after it, n-best lists sorted and distinct, and the same output for a
sentence alone, in a padded batch, and on the static step.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from helpers import perturbed
from hypothesis import given, settings
from hypothesis import strategies as st

from tformer.config import DecodeConfig, preset
from tformer.decoding import generate
from tformer.decoding.lengths import length_penalty
from tformer.model import Transformer

BOS, EOS, PAD = 1, 2, 0
VOCAB = 24
LIMIT = 24  # max_positions: max_len_b = 30 is clamped to it


def _model() -> Transformer:
    config = preset("tiny", src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, max_positions=LIMIT, final_logits_bias=True)
    model = perturbed(Transformer(config, seed=1), scale=0.5).double().eval()
    with torch.no_grad():
        model.final_logits_bias[EOS] += 2.0  # some outputs end early, some at the maximum length
    return model


MODEL = _model()

configs = st.builds(
    DecodeConfig,
    beam_size=st.sampled_from([1, 2, 3, 5]),
    max_len_a=st.sampled_from([0.0, 0.5, 1.0]),
    max_len_b=st.sampled_from([1, 3, 8, 30]),
    min_len=st.sampled_from([0, 2, 4]),
    length_penalty=st.sampled_from([0.0, 0.6, 1.5]),
    length_normalization=st.sampled_from(["gnmt", "average", "none"]),
    no_repeat_ngram_size=st.sampled_from([0, 1, 2, 3]),
    banned_ids=st.sampled_from([(), (7,)]),
    forced_eos=st.booleans(),
    early_stopping=st.booleans(),
    coverage_penalty=st.sampled_from([0.0, 0.4]),
)
sentences = st.lists(
    st.tuples(st.integers(2, 9), st.lists(st.integers(3, VOCAB - 1), max_size=3)), min_size=1, max_size=3
)


def _teacher_forced_log_prob(src_S: torch.Tensor, tokens: list[int], ended: bool, forced_eos_at: int | None) -> float:
    target = [BOS, *tokens, *([EOS] if ended else [])]
    with torch.no_grad():
        logits = MODEL(src_S[None], torch.tensor([target[:-1]]), src_pad_mask=(src_S != PAD)[None])
    log_probs = logits[0].log_softmax(dim=-1)
    # a forced eos comes at log-probability 0
    picked_T = log_probs.gather(1, torch.tensor(target[1:])[:, None])[:, 0]
    if forced_eos_at is not None:
        picked_T[forced_eos_at] = 0.0
    return picked_T.sum().item()


@settings(max_examples=20, derandomize=True, database=None, deadline=None)
@given(config=configs, batch=sentences, data=st.data())
def test_every_hypothesis_follows_the_rules_under_combined_options(config, batch, data):
    config = dataclasses.replace(config, nbest=data.draw(st.integers(1, config.beam_size)))
    generator = torch.Generator().manual_seed(len(batch))
    lengths = [length for length, _ in batch]
    prefix = [forced for _, forced in batch]
    src = torch.full((len(batch), max(lengths) + 2), PAD, dtype=torch.long)  # more padding than needed
    for row, length in enumerate(lengths):
        src[row, : length - 1] = torch.randint(3, VOCAB, (length - 1,), generator=generator)
        src[row, length - 1] = EOS
    kwargs = dict(bos_id=BOS, eos_id=EOS, config=config)
    with_attention = config.coverage_penalty > 0
    output = generate(MODEL, src, src_pad_mask=src != PAD, prefix=prefix, return_attention=with_attention, **kwargs)
    static = dataclasses.replace(config, static_step=True)
    on_static_step = generate(MODEL, src, src_pad_mask=src != PAD, prefix=prefix, **{**kwargs, "config": static})
    for row, (nbest, length) in enumerate(zip(output, lengths, strict=True)):
        max_len = min(max(math.floor(config.max_len_a * length) + config.max_len_b, 1), LIMIT)
        alone = generate(MODEL, src[row : row + 1, :length], src_pad_mask=None, prefix=[prefix[row]], **kwargs)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in nbest] == [h.tokens for h in on_static_step[row]]
        for a, b, c in zip(alone, nbest, on_static_step[row], strict=True):
            assert math.isclose(a.score, b.score, rel_tol=1e-6, abs_tol=1e-6)
            assert math.isclose(c.score, b.score, rel_tol=1e-6, abs_tol=1e-6)
        assert 1 <= len(nbest) <= config.nbest
        assert [h.score for h in nbest] == sorted((h.score for h in nbest), reverse=True)
        assert len({tuple(h.tokens) for h in nbest}) == len(nbest)
        forced = prefix[row][: max_len - 1 if config.forced_eos else max_len]
        for h in nbest:
            n = len(h.tokens)
            ended = config.forced_eos or n < max_len  # a hypothesis without eos is cut at the maximum length
            forced_eos_at = max_len - 1 if config.forced_eos and n == max_len - 1 else None
            assert EOS not in h.tokens and n <= max_len - int(config.forced_eos)
            assert h.tokens[: len(forced)] == forced
            free = h.tokens[len(forced) :]
            assert not set(free) & set(config.banned_ids)
            if ended and forced_eos_at is None:
                assert n >= config.min_len
            size = config.no_repeat_ngram_size
            if size:
                history = [BOS, *h.tokens, *([EOS] if ended and forced_eos_at is None else [])]
                grams = [tuple(history[i : i + size]) for i in range(len(history) - size + 1)]
                for i, gram in enumerate(grams):  # gram i ends with history[i + size - 1], token i + size - 2
                    assert i + size - 2 < len(forced) or gram not in grams[:i], (gram, history)
            log_prob = _teacher_forced_log_prob(src[row, :length], h.tokens, ended, forced_eos_at)
            assert math.isclose(h.log_prob, log_prob, rel_tol=1e-5, abs_tol=1e-5)
            score = h.log_prob / length_penalty(float(n + int(ended)), config)
            if with_attention and config.beam_size > 1:  # the coverage penalty, from the returned attention
                coverage = h.attention.sum(dim=0).clamp(min=1e-6, max=1.0).log().sum().item()
                score += config.coverage_penalty * coverage
            assert math.isclose(h.score, score, rel_tol=1e-5, abs_tol=1e-5)


def test_the_same_hypotheses_whatever_torch_s_default_dtype(tiny_model: Transformer) -> None:
    """Under torch.set_default_dtype(torch.float64) (a notebook's), the length penalty and the searches'
    score tables were float64: scores differed in the last digits, and a beam search with attention failed
    deep in torch (index_copy_ of a float32 row into a float64 table)."""
    src_BS = torch.randint(3, 40, (4, 7), generator=torch.Generator().manual_seed(0))

    def hypotheses(config: DecodeConfig) -> list:
        nbests = generate(
            tiny_model, src_BS, src_pad_mask=None, bos_id=1, eos_id=2, config=config, return_attention=True
        )
        return [(h.tokens, h.score, h.log_prob, h.attention.dtype, h.attention.tolist()) for n in nbests for h in n]

    configs = [DecodeConfig(beam_size=1), DecodeConfig(beam_size=3, nbest=2, coverage_penalty=0.2)]
    expected = [hypotheses(config) for config in configs]
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = [hypotheses(config) for config in configs]
    finally:
        torch.set_default_dtype(before)
    assert got == expected
