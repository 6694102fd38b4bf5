"""Sampling: reproducible under a seed, and temperature / top-k / top-p shape the distribution as documented."""

from __future__ import annotations

import math

import pytest
import torch
from test_decoding_equivalence import BOS, EOS, padded_batch, peaked_model

from tformer.config import DecodeConfig
from tformer.decoding import generate
from tformer.decoding.sampling import Sampler

PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]])


def sampling(**overrides) -> DecodeConfig:
    return DecodeConfig(**{"sampling": True, "beam_size": 3, "nbest": 3, "max_len_b": 8, **overrides})


def shaped(**overrides) -> torch.Tensor:
    return Sampler(sampling(**overrides), torch.device("cpu")).shaped_log_probs(PROBS.log()).exp()


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


def test_draws_follow_the_shaped_distribution():
    sampler = Sampler(sampling(top_k=3, seed=1), torch.device("cpu"))
    draws = sampler(PROBS.log().expand(20000, -1).contiguous())
    frequencies = torch.bincount(draws, minlength=4).float() / len(draws)
    expected = torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95
    assert torch.allclose(frequencies, expected, atol=0.015), frequencies
    assert math.isclose(frequencies[3].item(), 0.0)
