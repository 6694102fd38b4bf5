"""Beam search's exact chunked top-k (tformer.decoding.top_k) against torch.topk."""

from __future__ import annotations

import pytest
import torch

import tformer.decoding.beam_step as beam_step_module
from tformer.config import DecodeConfig, preset
from tformer.decoding import generate
from tformer.decoding.top_k import CHUNK, MIN_CHUNKS_PER_KEPT, top_k
from tformer.model import Transformer


def chunked_sizes(k: int) -> list[int]:
    """Vocabularies that take the chunked path: a multiple of CHUNK, and one with a partial last chunk."""
    smallest = MIN_CHUNKS_PER_KEPT * k * CHUNK
    return [smallest, smallest + 37, 3 * smallest + 5]


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
@pytest.mark.parametrize("k", [1, 4, 8])
def test_top_k_equals_torch_topk_on_distinct_values(k: int, device: str) -> None:
    generator = torch.Generator().manual_seed(k)
    for V in chunked_sizes(k):
        values_RV = torch.randn(13, V, generator=generator, dtype=torch.float64).float().log_softmax(dim=-1)
        values_RV = values_RV.to(device)
        expected = values_RV.topk(k, dim=-1)
        best, index = top_k(values_RV, k)
        assert torch.equal(best, expected.values)
        assert torch.equal(index, expected.indices)


def test_top_k_finds_winners_crowded_into_one_chunk_or_the_partial_last_chunk() -> None:
    k = 8
    V = MIN_CHUNKS_PER_KEPT * k * CHUNK + 40
    values_RV = torch.zeros(3, V)
    values_RV[0, 5 * CHUNK : 5 * CHUNK + k] = torch.arange(1.0, k + 1)  # all in one chunk
    values_RV[1, V - k :] = torch.arange(1.0, k + 1)  # all in the partial last chunk
    values_RV[2, :: V // k][:k] = torch.arange(1.0, k + 1)  # spread out
    best, index = top_k(values_RV, k)
    expected = values_RV.topk(k, dim=-1)
    assert torch.equal(best, expected.values)
    assert torch.equal(index, expected.indices)


@pytest.mark.parametrize("k", [1, 4])
def test_top_k_finds_the_winner_alone_in_a_last_chunk_of_one_entry(k: int) -> None:
    V = MIN_CHUNKS_PER_KEPT * k * CHUNK + 1
    values_RV = -torch.arange(V, dtype=torch.float32)[None].repeat(2, 1)
    values_RV[0, -1] = 1.0  # the last entry, alone in its chunk, is the best
    values_RV[1, -1] = -0.5  # the second best
    best, index = top_k(values_RV, k)
    expected = values_RV.topk(k, dim=-1)
    assert torch.equal(best, expected.values)
    assert torch.equal(index, expected.indices)


def test_top_k_with_ties_keeps_the_same_values_and_indices_that_hold_them() -> None:
    """Rows of many equal values (a forced prefix leaves one finite entry; integers repeat): the values
    are torch.topk's; the indices, possibly others among equal values, are distinct and hold them."""
    k = 8
    V = MIN_CHUNKS_PER_KEPT * k * CHUNK + 3
    generator = torch.Generator().manual_seed(0)
    forced = torch.full((2, V), -float("inf"))
    forced[0, 4000] = -0.5
    forced[1, 17] = -2.0
    repeated = torch.randint(0, 5, (4, V), generator=generator).float()
    for values_RV in (forced, repeated, torch.zeros(2, V)):
        best, index = top_k(values_RV, k)
        assert torch.equal(best, values_RV.topk(k, dim=-1).values)
        assert torch.equal(values_RV.gather(1, index), best)
        assert all(len(set(row.tolist())) == k for row in index)


def test_beam_search_over_a_large_vocabulary_equals_the_search_with_torch_topk(monkeypatch) -> None:
    vocab = 6000  # chunked for 2 x beam 4 = 8 candidates per beam
    assert vocab >= MIN_CHUNKS_PER_KEPT * 8 * CHUNK
    config = preset("tiny", src_vocab_size=50, tgt_vocab_size=vocab, share_embeddings=False)
    model = Transformer(config, seed=1).eval()
    src = torch.randint(4, 50, (5, 9), generator=torch.Generator().manual_seed(2))
    decode = DecodeConfig(beam_size=4, nbest=4, max_len_a=0.0, max_len_b=12, length_penalty=0.6)

    def search() -> list[list[tuple[list[int], float]]]:
        results = generate(model, src, src_pad_mask=None, bos_id=1, eos_id=2, config=decode)
        return [[(h.tokens, h.score) for h in nbest] for nbest in results]

    chunked = search()
    monkeypatch.setattr(beam_step_module, "top_k", lambda values_RV, k: values_RV.topk(k, dim=-1))
    assert search() == chunked
