"""A search too large for the machine's memory (`--beam 100000`) is refused in one line before anything is
decoded, instead of being killed by the out-of-memory killer; a batch too large is decoded a few sentences
at a time, with the same results. The machine's memory is faked small here: nothing large is allocated."""

from __future__ import annotations

import pytest
import torch
from test_decoding_equivalence import BOS, EOS, peaked_model
from test_decoding_pipeline import LINES, CharTokenizer

import tformer.decoding as decoding
from tformer.config import DecodeConfig
from tformer.decoding import DecodingError, generate
from tformer.decoding.memory import decoding_bytes, sentences_per_batch
from tformer.decoding.pipeline import Translator


def fake_memory(monkeypatch, total: int | None) -> None:
    """Make `total` bytes the memory decoding sees (None: unknown)."""
    monkeypatch.setattr("tformer.decoding.memory.memory_here", lambda: total)


def counted_searches(monkeypatch) -> list[int]:
    """The batch size of every beam search `generate` runs."""
    sizes: list[int] = []
    search = decoding.beam_search

    def counting(model, src_ids, **kwargs):
        sizes.append(src_ids.shape[0])
        return search(model, src_ids, **kwargs)

    monkeypatch.setattr(decoding, "beam_search", counting)
    return sizes


def test_a_beam_too_large_for_the_memory_is_refused_in_one_line_before_decoding(monkeypatch):
    fake_memory(monkeypatch, 2**30)
    model = peaked_model()
    monkeypatch.setattr(model, "encode", lambda *args, **kwargs: pytest.fail("decoding started"))
    translator = Translator(model, CharTokenizer(), DecodeConfig(beam_size=100_000, nbest=1))
    with pytest.raises(DecodingError, match=r"beam 100000 \(DecodeConfig.beam_size\) needs about [\d,.]+ GiB") as error:
        translator.translate_texts(["hello world"])
    message = str(error.value)
    assert "\n" not in message
    assert "0.5 GiB decoding may use (half of the 1.0 GiB" in message
    assert message.endswith("use a smaller DecodeConfig.beam_size")
    src = torch.tensor([[4, 5, EOS]])
    with pytest.raises(DecodingError, match=r"DecodeConfig\.beam_size"):  # generate refuses too (attention's path)
        generate(model, src, src_pad_mask=None, bos_id=BOS, eos_id=EOS, config=DecodeConfig(beam_size=100_000))
    sampled = DecodeConfig(sampling=True, nbest=10_000_000)
    expected = r"nbest 10000000 \(DecodeConfig\.nbest\) samples .* use a smaller DecodeConfig\.nbest$"
    with pytest.raises(DecodingError, match=expected):
        generate(model, src, src_pad_mask=None, bos_id=BOS, eos_id=EOS, config=sampled)


def test_a_batch_too_large_for_the_memory_is_decoded_in_smaller_batches_with_the_same_results(monkeypatch):
    model = peaked_model()
    config = DecodeConfig(beam_size=3, nbest=2, max_len_b=6)
    lines = [line for line in LINES if line]
    expected = [
        [(t.tokens, t.score) for t in nbest] for nbest in Translator(model, CharTokenizer(), config).translate(lines)
    ]
    longest = max(len(line) for line in lines) + 1
    one = decoding_bytes(model, config, source_length=longest)
    fake_memory(monkeypatch, 2 * (2 * one + one // 2))  # decoding may use room for 2 sentences and a half
    assert sentences_per_batch(model, config, source_length=longest, device="cpu") == 2
    sizes = counted_searches(monkeypatch)
    results = [
        [(t.tokens, t.score) for t in nbest] for nbest in Translator(model, CharTokenizer(), config).translate(lines)
    ]
    assert [[tokens for tokens, _ in nbest] for nbest in results] == [
        [tokens for tokens, _ in nbest] for nbest in expected
    ]
    scores = [score for nbest in results for _, score in nbest]
    assert scores == pytest.approx([score for nbest in expected for _, score in nbest], abs=1e-4)  # float noise only
    assert max(sizes) <= 2 and sum(sizes) == len(lines)


@pytest.mark.parametrize("beam", [1, 4, 12])
def test_normal_beams_and_batches_are_decoded_in_one_batch_as_before(monkeypatch, beam):
    fake_memory(monkeypatch, 8 * 2**30)  # a small laptop
    model = peaked_model()
    sizes = counted_searches(monkeypatch)
    src = torch.randint(4, 30, (64, 40), generator=torch.Generator().manual_seed(0))
    config = DecodeConfig(beam_size=beam, max_len_b=2)
    assert sentences_per_batch(model, config, source_length=40, device="cpu") > 1000
    if beam > 1:
        generate(model, src, src_pad_mask=None, bos_id=BOS, eos_id=EOS, config=config)
        assert sizes == [64]


def test_where_the_memory_is_unknown_nothing_is_checked(monkeypatch):
    fake_memory(monkeypatch, None)
    assert sentences_per_batch(peaked_model(), DecodeConfig(beam_size=100_000), source_length=9, device="cpu") is None


def _tensor_bytes(tree) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    return sum(_tensor_bytes(item) for item in tree)


def test_the_estimate_for_sampling_holds_one_copy_of_the_source_memory_per_sample():
    """Samples do not share their sentence's encoder memory (each row reads its own entry): n samples of a
    long source hold n copies of its keys and values, more than the rest of a one-token search."""
    from tformer.decoding.incremental import IncrementalDecoder

    model = peaked_model()
    S, n = 50, 8
    config = DecodeConfig(sampling=True, beam_size=n, nbest=n, max_len_a=0.0, max_len_b=1)
    src = torch.randint(4, 40, (1, S), generator=torch.Generator().manual_seed(0))
    decoder = IncrementalDecoder(
        model, src, torch.ones_like(src, dtype=torch.bool), rows_per_sentence=n, capacity=1, want_attention=False,
        shared_memory=False,
    )  # fmt: skip
    assert _tensor_bytes(decoder.cache.memory_kv) <= decoding_bytes(model, config, source_length=S)


def test_a_search_that_just_fits_is_decoded_one_sentence_at_a_time_and_one_byte_more_is_refused(monkeypatch):
    """Half of the memory is decoding's: a sentence needing exactly that fits alone; a byte less is refused
    (not a batch of 0 sentences)."""
    model = peaked_model()
    config = DecodeConfig(beam_size=4)
    one = decoding_bytes(model, config, source_length=9)
    fake_memory(monkeypatch, 2 * one)
    assert sentences_per_batch(model, config, source_length=9, device="cpu") == 1
    fake_memory(monkeypatch, 2 * one - 2)
    with pytest.raises(DecodingError, match=r"DecodeConfig\.beam_size"):
        sentences_per_batch(model, config, source_length=9, device="cpu")
