"""Parity with Hugging Face: after `to_marian`, our greedy and beam outputs equal `generate()` token for
token (n-best lists and scores included), with `length_normalization="average"` standing for HF's
`length_penalty` (score = sum of log-probs / length ** alpha, eos counted in the length)."""

from __future__ import annotations

import pytest
import torch
from test_decoding_equivalence import BOS, EOS, PAD, padded_batch, peaked_model

from tformer.config import DecodeConfig
from tformer.decoding import generate

transformers = pytest.importorskip("transformers")
from tformer.interop.marian import SpecialIds, to_marian  # noqa: E402

MAX_NEW = 12


def hf_tokens(sequence: list[int]) -> list[int]:
    """Strip the decoder start token, and everything from eos on."""
    tokens = sequence[1:]
    return tokens[: tokens.index(EOS)] if EOS in tokens else tokens


@pytest.fixture(scope="module")
def models():
    model = peaked_model(eos_bias=16.0)  # more outputs end with eos
    return model, to_marian(model, SpecialIds(bos_id=BOS, eos_id=EOS, pad_id=PAD))


@pytest.mark.parametrize("ngram", [0, 2])
def test_greedy_matches_hf(models, ngram):
    model, hf_model = models
    src, mask = padded_batch([7, 4, 9, 5, 2, 8], seed=11)
    config = DecodeConfig(beam_size=1, max_len_a=0.0, max_len_b=MAX_NEW, no_repeat_ngram_size=ngram)
    ours = generate(model, src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=config)
    with torch.no_grad():
        theirs = hf_model.generate(
            input_ids=src, attention_mask=mask.long(), num_beams=1, do_sample=False, max_new_tokens=MAX_NEW,
            no_repeat_ngram_size=ngram,
        )  # fmt: skip
    assert [n[0].tokens for n in ours] == [hf_tokens(row) for row in theirs.tolist()]


@pytest.mark.parametrize(("alpha", "ngram", "min_len"), [(1.0, 0, 0), (0.6, 0, 3), (1.0, 2, 0), (0.0, 0, 0)])
def test_beam_matches_hf(models, alpha, ngram, min_len):
    model, hf_model = models
    src, mask = padded_batch([7, 4, 9, 5, 2, 8], seed=12)
    beams = 4
    config = DecodeConfig(
        beam_size=beams, nbest=beams, max_len_a=0.0, max_len_b=MAX_NEW, length_normalization="average",
        length_penalty=alpha, no_repeat_ngram_size=ngram, min_len=min_len,
    )  # fmt: skip
    ours = generate(model, src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=config)
    with torch.no_grad():
        theirs = hf_model.generate(
            input_ids=src, attention_mask=mask.long(), num_beams=beams, num_return_sequences=beams, do_sample=False,
            max_new_tokens=MAX_NEW, min_new_tokens=min_len, length_penalty=alpha, early_stopping=False,
            no_repeat_ngram_size=ngram, output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
    hf_sequences = [hf_tokens(row) for row in theirs.sequences.tolist()]
    hf_scores = theirs.sequences_scores.tolist()
    endings = set()
    for index, hypotheses in enumerate(ours):
        assert [h.tokens for h in hypotheses] == hf_sequences[index * beams : (index + 1) * beams]
        assert [h.score for h in hypotheses] == pytest.approx(hf_scores[index * beams : (index + 1) * beams], abs=1e-4)
        endings |= {len(h.tokens) < MAX_NEW for h in hypotheses}
    if ngram == 0:  # (with the n-gram ban every hypothesis of this model ends with eos)
        assert endings == {True, False}, "the test should cover hypotheses ending with eos and at the maximum length"


@pytest.mark.parametrize("beams", [1, 4])
def test_prefix_matches_hf_decoder_input_ids(models, beams):
    """A prefix is HF's decoder prompt: its limits count only the tokens after it, and its beam score leaves
    out the prefix's log-probability (so only alpha = 0 gives the same beams, scores apart by a constant)."""
    model, hf_model = models
    src, mask = padded_batch([7, 4, 9, 5], seed=13)
    prefix = [5, 9]
    config = DecodeConfig(
        beam_size=beams, nbest=beams, max_len_a=0.0, max_len_b=MAX_NEW, min_len=5, length_normalization="average",
        length_penalty=0.0, no_repeat_ngram_size=2,
    )  # fmt: skip
    ours = generate(model, src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=config, prefix=[prefix] * 4)
    with torch.no_grad():
        theirs = hf_model.generate(
            input_ids=src, attention_mask=mask.long(), decoder_input_ids=torch.tensor([[BOS, *prefix]] * 4),
            num_beams=beams, num_return_sequences=beams, do_sample=False, max_new_tokens=MAX_NEW - len(prefix),
            min_new_tokens=5 - len(prefix), length_penalty=0.0, no_repeat_ngram_size=2, output_scores=True,
            return_dict_in_generate=True,
        )  # fmt: skip
    hf_sequences = [hf_tokens(row) for row in theirs.sequences.tolist()]  # the prompt, then the new tokens
    assert [h.tokens for hypotheses in ours for h in hypotheses] == hf_sequences
    if beams > 1:
        for index, hypotheses in enumerate(ours):
            hf_scores = theirs.sequences_scores.tolist()[index * beams : (index + 1) * beams]
            offsets = [h.score - score for h, score in zip(hypotheses, hf_scores, strict=True)]
            assert offsets == pytest.approx([offsets[0]] * beams, abs=1e-4) and offsets[0] < 0
