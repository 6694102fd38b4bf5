"""Cached decoding equals uncached decoding, step logits equal the full forward pass, and a sentence
decodes the same alone or in any batch with any padding (greedy and beam)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import perturbed

from tformer.config import DecodeConfig, preset
from tformer.decoding import generate
from tformer.decoding.greedy import CHECK_EVERY
from tformer.decoding.incremental import IncrementalDecoder
from tformer.decoding.lengths import max_output_lengths
from tformer.model import Transformer
from tformer.model.cache import BeamDecoderCache

BOS, EOS, PAD = 1, 2, 0
VOCAB = 40


def peaked_model(eos_bias: float = 13.0) -> Transformer:
    """Random weights made peaked (top-1 / top-2 log-prob gap >= ~0.9 on the tested inputs) so float
    noise cannot flip a choice; eos is biased up so that some outputs end early."""
    config = preset(
        "tiny",
        src_vocab_size=VOCAB,
        tgt_vocab_size=VOCAB,
        sinusoidal_layout="concatenated",
        final_logits_bias=True,
        max_positions=64,
    )
    model = perturbed(Transformer(config, seed=1), scale=0.5).eval()
    with torch.no_grad():
        model.src_embedding.weight.mul_(2.0)
        model.final_logits_bias[EOS] += eos_bias
    return model


def padded_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random sources (tokens + eos) of the given lengths, right-padded, and their mask."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    src = torch.full((len(lengths), width), PAD, dtype=torch.long)
    for row, length in enumerate(lengths):
        src[row, : length - 1] = torch.randint(4, VOCAB, (length - 1,), generator=generator)
        src[row, length - 1] = EOS
    return src, src != PAD


class HistoryCache:
    """A 'cache' that only remembers the tokens, so every step recomputes the whole prefix."""

    def __init__(self) -> None:
        self.tokens: torch.Tensor | None = None
        self.memory_kv: list[torch.Tensor] = []

    @property
    def length(self) -> int:
        return 0 if self.tokens is None else self.tokens.shape[1]

    def reorder(self, indices: torch.Tensor) -> None:
        self.tokens = self.tokens.index_select(0, indices)

    def select(self, indices: torch.Tensor) -> None:
        self.reorder(indices)

    def select_memory(self, indices: torch.Tensor) -> None:
        self.memory_kv = [m.index_select(0, indices) for m in self.memory_kv]


class UncachedModel:
    """The reference decoder: the same model, run without a KV cache over the full prefix each step."""

    training = False

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.config = model.config

    def encode(self, src_ids, *, src_pad_mask):
        return self.model.encode(src_ids, src_pad_mask=src_pad_mask)

    def project_memory(self, memory):
        return [memory]  # the raw memory rides in the cache, reordered and selected with the rows

    def new_cache(self, *, batch_size: int, capacity: int) -> HistoryCache:
        return HistoryCache()

    def decode(self, tgt_ids, *, memory, src_pad_mask, cache, return_attention=False):
        cache.tokens = tgt_ids if cache.tokens is None else torch.cat([cache.tokens, tgt_ids], dim=1)
        out = self.model.decode(
            cache.tokens, memory=cache.memory_kv[0], src_pad_mask=src_pad_mask, return_attention=return_attention
        )
        if not return_attention:
            return out[:, -1:]
        logits, self_weights, cross_weights = out
        return logits[:, -1:], self_weights, [w[:, :, -1:] for w in cross_weights]


def test_step_logits_match_full_forward_including_after_a_reorder():
    model = peaked_model()
    src, mask = padded_batch([7, 4, 9, 5])
    tgt = torch.randint(3, VOCAB, (4, 8), generator=torch.Generator().manual_seed(3))
    tgt[:, 0] = BOS
    permutation = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        full = model(src, tgt, src_pad_mask=mask)
        full_permuted = model(src[permutation], tgt[permutation], src_pad_mask=mask[permutation])
        decoder = IncrementalDecoder(
            model, src, mask, rows_per_sentence=1, capacity=8, want_attention=False, shared_memory=True
        )
        for t in range(8):
            if t == 4:  # rows swap histories half-way, as beams do; memory moves too since sentences differ
                decoder.cache.reorder(permutation)
                decoder.cache.select_memory(permutation)
                decoder.mask_MS = decoder.mask_MS[permutation]
            log_probs, _ = decoder.step(tgt[:, t] if t < 4 else tgt[permutation, t])
            expected = full[:, t] if t < 4 else full_permuted[:, t]
            # the peaked model's log-probabilities reach ~-31, where one fp32 step is 1.9e-6: 1e-5 absolute
            # plus 1e-6 relative (the raw logits are held to 1e-5 alone in the test below)
            torch.testing.assert_close(log_probs, F.log_softmax(expected, dim=-1), atol=1e-5, rtol=1e-6)


def step_alike(ours, reference, tokens_R, *, reorder=None, keep=None) -> None:
    """Reorder rows and keep sentences alike in both decoders, step both, compare everything (float64)."""
    for decoder in (ours, reference):
        if reorder is not None:
            decoder.reorder(reorder)
        if keep is not None:
            decoder.select(keep)
    for got, expected in zip(ours.step(tokens_R), reference.step(tokens_R), strict=True):
        if expected is not None:
            torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


MIDDLE_SENTENCE_LEAVES = torch.tensor([0, 1, 2, 6, 7, 8])  # rows kept of 3 sentences x 3 beams


def test_beams_share_their_sentence_memory_and_step_like_rows_with_copies():
    """shared_memory keeps one memory entry per sentence (not per row); steps, reorders and a sentence
    leaving give the log-probabilities and attention of the decoder that copies the memory to every row."""
    model = peaked_model().double()
    src, mask = padded_batch([7, 4, 9])
    tokens = torch.randint(3, VOCAB, (9, 5), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        shared, copied = (
            IncrementalDecoder(model, src, mask, rows_per_sentence=3, capacity=5, want_attention=True, shared_memory=s)
            for s in (True, False)
        )
        assert shared.cache.memory_kv[0][0].shape[0] == 3 and copied.cache.memory_kv[0][0].shape[0] == 9
        step_alike(shared, copied, tokens[:, 0])
        step_alike(shared, copied, tokens[:, 1])
        step_alike(shared, copied, tokens[:, 2], reorder=torch.tensor([2, 0, 0, 4, 3, 5, 8, 8, 6]))
        tokens = tokens[MIDDLE_SENTENCE_LEAVES]
        step_alike(shared, copied, tokens[:, 3], keep=MIDDLE_SENTENCE_LEAVES)
        step_alike(shared, copied, tokens[:, 4])
        assert shared.cache.memory_kv[0][0].shape[0] == 2


def test_beam_cache_steps_like_a_reordered_cache():
    """The beam cache never moves keys and values (an ancestry table follows the beams): through a first
    step with one row per sentence (written to every slot), widening to 3 beams, steps, reorders within
    sentences and a sentence leaving, its log-probabilities are those of the cache that copies every
    reordered row (float64)."""
    model = peaked_model().double()
    src, mask = padded_batch([7, 4, 9])
    tokens = torch.randint(3, VOCAB, (9, 6), generator=torch.Generator().manual_seed(9))
    generator = torch.Generator().manual_seed(10)
    with torch.no_grad():
        beam, moved = (
            IncrementalDecoder(
                model, src, mask, rows_per_sentence=1, capacity=6, want_attention=False, shared_memory=True,
                beam_slots=slots,
            )
            for slots in (3, 0)
        )  # fmt: skip
        assert isinstance(beam.cache, BeamDecoderCache) and not isinstance(moved.cache, BeamDecoderCache)
        step_alike(beam, moved, tokens[::3, 0])
        beam.widen(3)
        moved.widen(3)
        for t in range(1, 6):
            rows = len(tokens)  # before a sentence leaves: the reorder comes first
            within = torch.randint(0, 3, (rows,), generator=generator) + torch.arange(rows) // 3 * 3
            keep = MIDDLE_SENTENCE_LEAVES if t == 4 else None
            if keep is not None:
                tokens = tokens[keep]
            step_alike(beam, moved, tokens[:, t], reorder=within, keep=keep)


def test_raw_cached_decode_matches_forward_logits():
    model = peaked_model()
    src, mask = padded_batch([6, 3, 8])
    tgt = torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(src, tgt, src_pad_mask=mask)
        memory = model.encode(src, src_pad_mask=mask)
        cache = model.new_cache(batch_size=3, capacity=6, memory=memory)
        for t in range(6):
            step = model.decode(tgt[:, t : t + 1], memory=None, src_pad_mask=mask, cache=cache)
            torch.testing.assert_close(step[:, 0], full[:, t], atol=1e-5, rtol=0)


CONFIGS = {
    "greedy": DecodeConfig(beam_size=1, max_len_a=1.0, max_len_b=4),
    "beam": DecodeConfig(beam_size=3, nbest=3, max_len_a=1.0, max_len_b=4),
    "beam-ngram-minlen": DecodeConfig(beam_size=4, nbest=2, no_repeat_ngram_size=2, min_len=3, max_len_b=12),
    "beam-coverage-gnmt": DecodeConfig(beam_size=2, coverage_penalty=0.3, length_penalty=1.0, max_len_b=10),
    "greedy-ngram": DecodeConfig(beam_size=1, no_repeat_ngram_size=2, max_len_b=14, max_len_a=0.0),
    "sampling": DecodeConfig(sampling=True, nbest=3, temperature=2.0, top_k=20, seed=5, max_len_b=12),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_search_gives_the_tokens_of_uncached_search(name):
    model = peaked_model()
    src, mask = padded_batch([7, 4, 9, 5, 2])
    prefix = [[5], [], [7, 8], [], []]
    # without attention maps beam search runs on the beam cache (never reordered), with them on the default
    for use_prefix, attention in ((False, True), (True, True), (False, False), (True, False)):
        kwargs = dict(src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=CONFIGS[name], return_attention=attention)
        kwargs["prefix"] = prefix if use_prefix else None
        cached = generate(model, src, **kwargs)
        uncached = generate(UncachedModel(model), src, **kwargs)
        for ours, reference in zip(cached, uncached, strict=True):
            assert [h.tokens for h in ours] == [h.tokens for h in reference]
            for a, b in zip(ours, reference, strict=True):
                assert a.score == pytest.approx(b.score, abs=1e-4)
                if attention:
                    torch.testing.assert_close(a.attention, b.attention, atol=1e-5, rtol=0)
        if use_prefix:
            for hypotheses, forced in zip(cached, prefix, strict=True):
                assert all(h.tokens[: len(forced)] == forced for h in hypotheses)


@pytest.mark.parametrize("name", ["greedy", "beam", "beam-ngram-minlen", "greedy-ngram", "sampling"])
def test_sentence_decodes_the_same_alone_and_in_any_batch(name):
    """Also sampling: a sentence's samples under a seed do not depend on its batch's size, its row or the
    padding (its draws used to be the batch's row-th of one shared stream)."""
    config = CONFIGS[name]
    model = peaked_model()
    lengths = [7, 4, 9, 5, 2, 8]
    src, _ = padded_batch(lengths, seed=5)
    alone = []
    for row, length in enumerate(lengths):
        result = generate(model, src[row : row + 1, :length], src_pad_mask=None, bos_id=BOS, eos_id=EOS, config=config)
        alone.append(result[0])
    outputs = {len(h.tokens) for hypotheses in alone for h in hypotheses}
    assert len(outputs) > 1, "the test model should give outputs of several lengths"
    generator = torch.Generator().manual_seed(0)
    for batch_size in (2, 3, 6):
        order = torch.randperm(len(lengths), generator=generator)[:batch_size]
        extra_padding = torch.full((batch_size, 3), PAD, dtype=torch.long)  # more padding than needed
        batch_src = torch.cat([src[order], extra_padding], dim=1)
        batch = generate(model, batch_src, src_pad_mask=batch_src != PAD, bos_id=BOS, eos_id=EOS, config=config)
        for index, hypotheses in zip(order.tolist(), batch, strict=True):
            assert [h.tokens for h in hypotheses] == [h.tokens for h in alone[index]]
            assert [h.score for h in hypotheses] == pytest.approx([h.score for h in alone[index]], abs=1e-4)


def test_compaction_and_early_exit_do_not_change_results(monkeypatch):
    """Long and short outputs in one batch: short ones leave the batch at the periodic check."""
    selected = []
    original_select = IncrementalDecoder.select

    def counting_select(self, rows):
        selected.append(len(rows))
        original_select(self, rows)

    monkeypatch.setattr(IncrementalDecoder, "select", counting_select)
    model = peaked_model()
    src, mask = padded_batch([2, 9, 3, 9], seed=7)
    config = DecodeConfig(beam_size=2, nbest=2, max_len_a=2.0, max_len_b=1)
    together = generate(model, src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=config)
    reference = generate(UncachedModel(model), src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=config)
    assert [[h.tokens for h in n] for n in together] == [[h.tokens for h in n] for n in reference]
    lengths = [len(n[0].tokens) for n in together]
    assert max(lengths) - min(lengths) > CHECK_EVERY, lengths
    assert any(rows < 4 * 2 for rows in selected), "finished sentences should have left the batch"


def test_decoding_refuses_a_model_in_training_mode():
    model = peaked_model().train()
    src, mask = padded_batch([3])
    with pytest.raises(ValueError, match="eval"):
        generate(model, src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=DecodeConfig(beam_size=1))
    model.eval()
    model.decoder.layers[1].train()  # the model's own flag off, one layer's dropout on: decoded with it
    with pytest.raises(
        ValueError, match=r"^model.decoder.layers.1 is in training mode \(dropout on\); call model.eval"
    ):
        generate(model, src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=DecodeConfig(beam_size=1))


def test_max_length_follows_a_and_b():
    model = peaked_model()
    with torch.no_grad():
        model.final_logits_bias[EOS] = -100.0  # never ends by itself
    src, mask = padded_batch([3, 6])
    config = DecodeConfig(beam_size=2, max_len_a=1.5, max_len_b=2)
    result = generate(model, src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=config)
    assert [len(n[0].tokens) for n in result] == [int(1.5 * 3) + 2, int(1.5 * 6) + 2]
    greedy = generate(
        model, src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=dataclasses.replace(config, beam_size=1)
    )
    assert [len(n[0].tokens) for n in greedy] == [6, 11]


@pytest.mark.parametrize(("a", "length", "expected"), [(1.3, 90, 117), (2.1, 30, 63), (1.3, 170, 221), (1.2, 10, 12)])
def test_max_length_floors_a_times_the_source_length_exactly(a, length, expected):
    from tformer.decoding import max_output_lengths

    config = DecodeConfig(max_len_a=a, max_len_b=0)
    assert max_output_lengths(torch.tensor([length]), config, limit=10**6).tolist() == [expected]


@pytest.mark.parametrize(("a", "b"), [(1e20, 0), (1e308, 0), (1.2, 2**63 - 1), (1e300, 2**62)])
def test_a_limit_past_64_bits_is_the_models_limit_not_one_token(a: float, b: int) -> None:
    """max_len_a 1e20 (or max_len_b near 2**63) overflowed the conversion to int64: the length wrapped to a
    negative number, which the clamp made 1, so every translation was cut to one token without a word;
    max_len_a 1e308 made the memory estimate's floor of infinity an OverflowError traceback."""
    from tformer.decoding import max_output_lengths
    from tformer.decoding.memory import decoding_bytes

    config = DecodeConfig(max_len_a=a, max_len_b=b)
    assert max_output_lengths(torch.tensor([1, 5, 90]), config, limit=64).tolist() == [64, 64, 64]
    model = peaked_model()
    limit = dataclasses.replace(config, max_len_a=0.0, max_len_b=model.config.max_positions)
    assert decoding_bytes(model, config, source_length=9) == decoding_bytes(model, limit, source_length=9)


def test_a_step_returns_the_exact_log_softmax_of_the_logits_the_model_gave() -> None:
    """The step normalises the model's logits in place (no second rows x vocabulary table): the values
    are those of a fresh `log_softmax`, bit for bit, including a row of a multi-position output."""
    model = peaked_model()
    src, mask = padded_batch([7, 4, 9])
    seen = []
    decode = model.decode

    def keeping_decode(*args, **kwargs):
        logits = decode(*args, **kwargs)
        seen.append((logits.clone(), logits[:, -1].data_ptr()))
        return logits

    model.decode = keeping_decode
    decoder = IncrementalDecoder(
        model, src, mask, rows_per_sentence=1, capacity=4, want_attention=False, shared_memory=True
    )
    with torch.no_grad():
        for t in range(3):
            log_probs, _ = decoder.step(torch.full((3,), BOS if t == 0 else 5))
            logits, address = seen[-1]
            assert torch.equal(log_probs, torch.log_softmax(logits[:, -1], dim=-1))
            assert log_probs.data_ptr() == address  # written over the logits, not into a new table


@pytest.mark.parametrize("name", ["greedy", "beam", "sampling"])
def test_attention_maps_are_the_teacher_forced_cross_attention_with_a_row_for_eos(name):
    """One row per step, eos's included when a hypothesis ended with it, each the last decoder layer's
    cross-attention averaged over heads, over the sentence's real source positions."""
    model = peaked_model()
    src, mask = padded_batch([7, 4, 9, 5, 2])
    config = {"greedy": DecodeConfig(beam_size=1), "beam": DecodeConfig(beam_size=3, nbest=2)}.get(name, CONFIGS[name])
    results = generate(model, src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=config, return_attention=True)
    limits = max_output_lengths(mask.sum(dim=1), config, limit=model.config.max_positions).tolist()
    ended = 0
    with torch.no_grad():
        for b, hypotheses in enumerate(results):
            real_S = src[b][mask[b]][None, :]
            memory = model.encode(real_S)
            for hypothesis in hypotheses:
                steps = len(hypothesis.tokens) + (len(hypothesis.tokens) < limits[b])  # + eos's row
                tgt = torch.tensor([[BOS, *hypothesis.tokens]])
                _, _, cross = model.decode(tgt, memory=memory, src_pad_mask=None, return_attention=True)
                expected = cross[-1][0].mean(dim=0)[:steps]
                assert hypothesis.attention.shape == expected.shape, (b, hypothesis.tokens)
                torch.testing.assert_close(hypothesis.attention, expected, atol=1e-4, rtol=0)
                ended += steps > len(hypothesis.tokens)
    assert ended > 0


@pytest.mark.parametrize("name", ["greedy", "beam", "sampling"])
def test_a_long_prefix_is_still_forced_after_other_sentences_left_the_batch(name):
    """The first sentence (max_len 2) leaves the batch at the check after step CHECK_EVERY, while the second
    is still within its forced prefix: the prefix must follow its rows."""
    config = dataclasses.replace(
        {"greedy": DecodeConfig(beam_size=1), "beam": DecodeConfig(beam_size=3)}.get(name, CONFIGS[name]),
        max_len_a=1.0,
        max_len_b=0,
    )
    model = peaked_model()
    src, mask = padded_batch([2, 9], seed=5)
    prefix = [[], [9, 9, 9, 9, 9, 9, 9]]
    assert len(prefix[1]) > CHECK_EVERY
    batch = generate(model, src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=config, prefix=prefix)
    for row in range(2):
        (alone,) = generate(
            model, src[row : row + 1, : int(mask[row].sum())], src_pad_mask=None, bos_id=BOS, eos_id=EOS,
            config=config, prefix=[prefix[row]],
        )  # fmt: skip
        assert [h.tokens for h in batch[row]] == [h.tokens for h in alone]
        assert [h.score for h in batch[row]] == pytest.approx([h.score for h in alone], abs=1e-4)
    assert all(h.tokens[:7] == prefix[1] for h in batch[1])


@pytest.mark.parametrize("beam_size", [1, 3])
def test_a_zero_length_limit_still_allows_one_token(beam_size: int) -> None:
    """max_len_a = max_len_b = 0 passes the config's checks; the clamp makes it one token, not zero steps
    (zero would return no hypothesis at all, and beam search's max_len - 1 positions would be -1)."""
    config = DecodeConfig(beam_size=beam_size, max_len_a=0.0, max_len_b=0)
    assert max_output_lengths(torch.tensor([1, 7]), config, limit=64).tolist() == [1, 1]
    model = peaked_model(eos_bias=-100.0)  # never ends by itself: the limit cuts it
    src, mask = padded_batch([3, 6])
    result = generate(model, src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=config)
    assert [[len(h.tokens) for h in n] for n in result] == [[1], [1]]


@pytest.mark.parametrize("beam_size", [1, 3])
def test_scores_are_the_float32_quotient_of_log_prob_and_length_penalty(beam_size: int) -> None:
    """The length penalty is computed in float32, as the log-probabilities it divides: a score is the
    float32 quotient (a float64 penalty gave float64 scores, a few ulps from beam search's)."""
    from tformer.decoding.lengths import length_penalty

    config = DecodeConfig(beam_size=beam_size, nbest=beam_size, length_penalty=0.6, length_normalization="gnmt")
    src, mask = padded_batch([5, 8, 3])
    for n_best in generate(peaked_model(), src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=config):
        for h in n_best:
            lengths = torch.tensor([len(h.tokens), len(h.tokens) + 1])  # cut at the limit, or ended with eos
            expected = torch.tensor(h.log_prob, dtype=torch.float32) / length_penalty(lengths, config)
            assert h.score in expected.tolist()


@pytest.mark.parametrize("beam_size", [1, 2])
def test_a_prefix_may_force_token_id_0(beam_size: int) -> None:
    """A prefix token is any id in [0, V) but eos: id 0 (pad here, a real token in some imported
    vocabularies) is forced like any other, not read as "this row's prefix has ended" (-1)."""
    model = peaked_model()
    src, mask = padded_batch([5, 7])
    config = DecodeConfig(beam_size=beam_size)
    result = generate(model, src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=config, prefix=[[0, 6], [7, 0]])
    assert [n[0].tokens[:2] for n in result] == [[0, 6], [7, 0]]
