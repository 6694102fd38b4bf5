"""Differential check against Hugging Face's `generate()` over random small models, batches and settings
(fixed seeds): greedy and beam search (2-6 beams, n-best, length penalties, early stopping both ways,
minimum and maximum lengths, n-gram ban, banned ids, forced eos) give the same tokens and scores.

The models are float64 and peaked, with eos biased up by a random amount, so that outputs end at varied
steps. Both searches still keep float32 scores (and HF takes its log-softmax in float32), so candidates
within float32 rounding of each other may rank differently: the seeds are ones without such a near-tie.
HF's position table is built from float32 values even in a float64 model (3e-8 off, which these random
models amplify to ~1e-4 in the logits), so the HF model gets tformer's exact table."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import perturbed

from tformer.config import DecodeConfig, preset
from tformer.decoding import generate
from tformer.model import Transformer

transformers = pytest.importorskip("transformers")
from tformer.interop.marian import SpecialIds, to_marian  # noqa: E402

PAD, BOS, EOS = 0, 1, 2


def random_case(seed: int):
    rng = random.Random(seed)
    share = rng.random() < 0.5
    vocab = rng.randint(20, 60)
    d_model = rng.choice([16, 24, 32])
    config = preset(
        "tiny", src_vocab_size=vocab, tgt_vocab_size=vocab if share else rng.randint(20, 60), d_model=d_model,
        n_heads=rng.choice([h for h in (1, 2, 4) if d_model % h == 0]), d_ff=rng.choice([16, 32]),
        n_encoder_layers=rng.randint(1, 2), n_decoder_layers=rng.randint(1, 2), share_embeddings=share,
        tie_output=rng.random() < 0.6, final_logits_bias=True, activation=rng.choice(["relu", "gelu", "swish"]),
        scale_embeddings=rng.random() < 0.7, sinusoidal_layout="concatenated", max_positions=rng.choice([16, 64]),
    )  # fmt: skip
    model = perturbed(Transformer(config, seed=seed), seed=seed + 1, scale=0.5).double().eval()
    with torch.no_grad():
        model.src_embedding.weight.mul_(2.0)
        model.final_logits_bias[EOS] += rng.uniform(0.0, 12.0)
    hf_model = to_marian(model, SpecialIds(bos_id=BOS, eos_id=EOS, pad_id=PAD))
    with torch.no_grad():
        hf_model.model.encoder.embed_positions.weight.copy_(model.encoder.positions.table_PD)
        hf_model.model.decoder.embed_positions.weight.copy_(model.decoder.positions.table_PD)
    lengths = [rng.randint(1, 10) for _ in range(rng.randint(1, 4))]
    src = torch.full((len(lengths), max(lengths)), PAD, dtype=torch.long)
    for row, length in enumerate(lengths):
        src[row, : length - 1] = torch.tensor([rng.randint(3, vocab - 1) for _ in range(length - 1)])
        src[row, length - 1] = EOS
    beams = 1 if rng.random() < 0.3 else rng.randint(2, 6)
    banned = tuple(sorted(rng.sample([i for i in range(config.tgt_vocab_size) if i != EOS], rng.choice([0, 0, 1, 2]))))
    decode = DecodeConfig(
        beam_size=beams, nbest=rng.randint(1, beams), max_len_a=0.0, max_len_b=rng.randint(1, 18),
        min_len=rng.choice([0, 0, 1, 3]), length_normalization="average",
        length_penalty=rng.choice([0.0, 0.6, 1.0, 2.0, -0.5]), early_stopping=rng.random() < 0.5,
        no_repeat_ngram_size=rng.choice([0, 0, 1, 2, 3]), banned_ids=banned, forced_eos=rng.random() < 0.2,
    )  # fmt: skip
    return model, hf_model, src, src != PAD, decode


def hf_generate(hf_model, src, mask, decode: DecodeConfig, max_new: int):
    options = dict(num_beams=decode.beam_size, num_return_sequences=decode.nbest)
    if decode.beam_size > 1:
        options.update(length_penalty=decode.length_penalty, early_stopping=decode.early_stopping)
    if decode.banned_ids:
        options["bad_words_ids"] = [[token] for token in decode.banned_ids]
    if decode.forced_eos:
        options["forced_eos_token_id"] = EOS
    with torch.no_grad():
        return hf_model.generate(
            input_ids=src, attention_mask=mask.long(), do_sample=False, max_new_tokens=max_new,
            min_new_tokens=decode.min_len, no_repeat_ngram_size=decode.no_repeat_ngram_size, output_logits=True,
            output_scores=True, return_dict_in_generate=True, **options,
        )  # fmt: skip


def greedy_log_prob(row: list[int], logits: tuple[torch.Tensor, ...], index: int, *, forced_at: int | None) -> float:
    """The log-probability of HF's greedy tokens (eos at the forced step counts 0, as tformer counts it)."""
    total = 0.0
    for step, token in enumerate(row[1:]):
        total += 0.0 if step == forced_at else torch.log_softmax(logits[step][index].double(), -1)[token].item()
        if token == EOS:
            break
    return total


SEEDS = range(30)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_case_matches_hf(seed):
    model, hf_model, src, mask, decode = random_case(seed)
    max_new = min(decode.max_len_b, model.config.max_positions)
    ours = generate(model, src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=decode)
    out = hf_generate(hf_model, src, mask, decode, max_new)
    rows = out.sequences.tolist()
    k = decode.nbest
    for index, hypotheses in enumerate(ours):
        theirs = rows[index * k : (index + 1) * k]
        if decode.beam_size > 1:
            scores = out.sequences_scores.tolist()[index * k : (index + 1) * k]
            # HF fills its list with -1e9 beams where fewer hypotheses can end; tformer returns fewer
            theirs, scores = theirs[: len(hypotheses)], scores[: len(hypotheses)]
            filler = out.sequences_scores.tolist()[index * k + len(hypotheses) : (index + 1) * k]
            assert all(score <= -1e8 for score in filler)
        else:
            forced_at = max_new - 1 if decode.forced_eos else None
            scores = [greedy_log_prob(theirs[0], out.logits, index, forced_at=forced_at)]
        tokens = [row[1:][: row[1:].index(EOS)] if EOS in row[1:] else row[1:] for row in theirs]
        assert [h.tokens for h in hypotheses] == tokens, (seed, index, decode)
        ours_scores = [h.score if decode.beam_size > 1 else h.log_prob for h in hypotheses]
        assert ours_scores == pytest.approx(scores, rel=1e-5, abs=1e-5), (seed, index, decode)
