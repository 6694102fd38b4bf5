"""Sampling: reproducible under a seed, and temperature / top-k / top-p shape the distribution as documented."""

from __future__ import annotations

import math

import pytest
import torch
from test_decoding_equivalence import BOS, EOS, padded_batch, peaked_model

from tformer.config import DecodeConfig
from tformer.decoding import generate
from tformer.decoding.sampling import Sampler, row_keys

PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]])


def sampling(**overrides) -> DecodeConfig:
    return DecodeConfig(**{"sampling": True, "beam_size": 3, "nbest": 3, "max_len_b": 8, **overrides})


def shaped(**overrides) -> torch.Tensor:
    return Sampler(sampling(**overrides), torch.arange(1)).shaped_log_probs(PROBS.log()).exp()


def test_same_seed_same_samples_other_seed_other_samples():
    model = peaked_model()
    src, mask = padded_batch([7, 4, 9, 5], seed=3)
    config = sampling(temperature=3.0, seed=7)

    def run(config):
        result = generate(model, src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=config)
        return [[h.tokens for h in n] for n in result]

    first = run(config)
    assert first == run(config)
    assert first != run(sampling(temperature=3.0, seed=8))
    assert all(len(n) == 3 for n in first)


def test_the_number_of_samples_is_not_bounded_by_the_beam():
    """Sampling draws nbest paths per sentence; beam_size plays no part, so it does not bound nbest (beam
    search keeps its bound)."""
    model = peaked_model()
    src, mask = padded_batch([7, 4, 9], seed=3)
    config = sampling(beam_size=1, nbest=5, temperature=3.0)
    result = generate(model, src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=config)
    assert [len(n) for n in result] == [5, 5, 5]
    beam_5 = sampling(beam_size=5, nbest=5, temperature=3.0)
    with_beam = generate(model, src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=beam_5)
    assert [[h.tokens for h in n] for n in result] == [[h.tokens for h in n] for n in with_beam]  # the same draws
    with pytest.raises(ValueError, match=r"nbest must be between 1 and beam_size \(1\), got 5"):
        DecodeConfig(beam_size=1, nbest=5)
    with pytest.raises(ValueError, match="nbest must be at least 1"):
        sampling(nbest=0)


def test_top_k_one_is_greedy():
    model = peaked_model()
    src, mask = padded_batch([7, 4, 9, 5], seed=3)
    greedy = generate(
        model, src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=DecodeConfig(beam_size=1, max_len_b=8)
    )
    sampled = generate(
        model, src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=sampling(top_k=1, temperature=5.0, nbest=1)
    )
    assert [n[0].tokens for n in sampled] == [n[0].tokens for n in greedy]
    assert [n[0].log_prob for n in sampled] == pytest.approx([n[0].log_prob for n in greedy], abs=1e-5)


def test_temperature_top_k_top_p_shapes():
    torch.testing.assert_close(shaped(), PROBS)
    hot = PROBS.pow(0.5) / PROBS.pow(0.5).sum()
    torch.testing.assert_close(shaped(temperature=2.0), hot)
    torch.testing.assert_close(shaped(top_k=2), torch.tensor([[0.5, 0.3, 0, 0]]) / 0.8)
    # top_p 0.6: "a" (0.5) is not enough, "a b" (0.8) is: the rest is cut
    torch.testing.assert_close(shaped(top_p=0.6), torch.tensor([[0.5, 0.3, 0, 0]]) / 0.8)
    torch.testing.assert_close(shaped(top_p=0.5), torch.tensor([[1.0, 0, 0, 0]]))
    torch.testing.assert_close(shaped(top_p=0.81), torch.tensor([[0.5, 0.3, 0.15, 0]]) / 0.95)


@pytest.mark.parametrize("temperature", [1e-40, 1e-46, 1e-300])
def test_a_temperature_near_zero_draws_the_most_probable_token(temperature):
    """Divided by 1e-40 every float32 log-probability was -inf: the distribution was NaN and every draw
    token 0 (pad); 1e-46 is 0 in float32. The limit of a temperature going to 0 is greedy search."""
    torch.testing.assert_close(shaped(temperature=temperature), torch.tensor([[1.0, 0, 0, 0]]), atol=0, rtol=0)
    sampler = Sampler(sampling(temperature=temperature), torch.arange(50))
    assert sampler(PROBS.log().expand(50, -1).contiguous(), torch.arange(50)).tolist() == [0] * 50
    sampler = Sampler(sampling(temperature=temperature), torch.arange(50))
    assert sampler(PROBS.log().flip(1).expand(50, -1).contiguous(), torch.arange(50)).tolist() == [3] * 50


def test_draws_follow_the_shaped_distribution():
    sampler = Sampler(sampling(top_k=3, seed=1), torch.arange(20000))
    draws = sampler(PROBS.log().expand(20000, -1).contiguous(), torch.arange(20000))
    frequencies = torch.bincount(draws, minlength=4).float() / len(draws)
    expected = torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95
    assert torch.allclose(frequencies, expected, atol=0.015), frequencies
    assert math.isclose(frequencies[3].item(), 0.0)


def test_a_rows_draw_does_not_depend_on_the_other_rows_in_the_batch():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    config = sampling(seed=4, temperature=2.0)
    all_rows = Sampler(config, torch.arange(6))(logits, torch.arange(6))
    some = torch.tensor([1, 4, 5])
    fewer_rows = Sampler(config, torch.arange(6))(logits[some], some)
    assert torch.equal(fewer_rows, all_rows[some])


def test_draws_never_pick_a_token_that_top_k_cut():
    """Inverting the cumulative distribution lands only on tokens with a probability: never on the cut
    first token (cumulative 0) nor on the cut last one (its cumulative equals the one before)."""
    sampler = Sampler(sampling(top_k=2, seed=0), torch.arange(4000))
    log_probs = torch.tensor([[0.1, 0.6, 0.3, 1e-9]]).log().expand(4000, -1).contiguous()
    draws = sampler(log_probs, torch.arange(4000))
    assert set(draws.tolist()) == {1, 2}


@pytest.mark.parametrize("across", ["steps", "samples", "sentences"])
def test_the_hashed_uniform_numbers_are_evenly_spread(across):
    """A row's number at a step is a hash, not a generator's draw: 20,000 of them, over one path's steps,
    over the samples of one sentence or over sentences, fall evenly into 20 bins (chi-square below its
    1e-6 quantile for 19 degrees of freedom, 64.4) and hardly repeat (24 bits: a few collisions expected)."""
    n = 20_000
    if across == "steps":
        keys_R = row_keys(torch.tensor([[5, 9, 2]]), torch.ones(1, 3, dtype=torch.bool), seed=3, paths_per_sentence=1)
        sampler = Sampler(sampling(), keys_R)
        uniform = torch.cat([sampler.uniforms(torch.tensor([0]), step) for step in range(n)])
    elif across == "samples":
        keys_R = row_keys(torch.tensor([[5, 9, 2]]), torch.ones(1, 3, dtype=torch.bool), seed=3, paths_per_sentence=n)
        uniform = Sampler(sampling(), keys_R).uniforms(torch.arange(n), 0)
    else:
        src = torch.stack([torch.arange(n) // 100, torch.arange(n) % 100, torch.full((n,), EOS)], dim=1)
        keys_R = row_keys(src, torch.ones(n, 3, dtype=torch.bool), seed=3, paths_per_sentence=1)
        uniform = Sampler(sampling(), keys_R).uniforms(torch.arange(n), 0)
    assert uniform.min() >= 0.0 and uniform.max() < 1.0
    counts = torch.bincount((uniform * 20).long(), minlength=20).double()
    assert ((counts - n / 20) ** 2 / (n / 20)).sum() < 64.4
    assert len(set(uniform.tolist())) > 0.99 * n


def test_a_sentences_samples_come_best_first():
    model = peaked_model()
    src, mask = padded_batch([7, 4, 9, 5], seed=3)
    result = generate(model, src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=sampling(temperature=3.0, seed=7))
    scores = [[h.score for h in nbest] for nbest in result]
    assert scores == [sorted(row, reverse=True) for row in scores]
    assert any(row[0] > row[-1] for row in scores)  # not all ties: the order was tested


def test_a_temperature_near_zero_draws_the_most_probable_of_many_unlikely_tokens():
    """Log-probabilities below about -4 (every token of a flat distribution over 100) divided by a
    temperature near 0 overflow to -inf unless the row's largest is taken away first: the row was NaN."""
    probs_RV = torch.full((1, 100), 1.0)
    probs_RV[0, 7] = 1.5
    log_probs_RV = (probs_RV / probs_RV.sum()).log()
    sampler = Sampler(sampling(temperature=1e-40), torch.arange(1))
    expected = torch.zeros(1, 100)
    expected[0, 7] = 1.0
    torch.testing.assert_close(sampler.shaped_log_probs(log_probs_RV).exp(), expected, atol=0, rtol=0)
    assert sampler(log_probs_RV, torch.arange(1)).tolist() == [7]


def test_seeds_that_differ_only_above_32_bits_give_other_samples():
    """The seed is a 64-bit number: its high half enters the rows' keys too, so 7 and 7 + 2**32 do not
    draw the same samples."""
    src, mask = padded_batch([7, 4, 9], seed=3)
    keys = [row_keys(src, mask, seed=seed, paths_per_sentence=2) for seed in (7, 7 + 2**32, 7 + 2**62)]
    assert not torch.equal(keys[0], keys[1]) and not torch.equal(keys[0], keys[2])
    model = peaked_model()
    samples = [
        generate(model, src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=sampling(temperature=3.0, seed=seed))
        for seed in (7, 7 + 2**32)
    ]
    assert [[h.tokens for h in n] for n in samples[0]] != [[h.tokens for h in n] for n in samples[1]]
