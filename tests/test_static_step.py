"""The fixed-shape decoding step (DecodeConfig.static_step, replayed as a CUDA graph on a GPU) computes
exactly what the default step computes. On this CPU-only machine the step runs eagerly; the graph
capture itself needs a GPU (benchmarks/decode.py --static-step measures it there)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import perturbed
from test_decoding_equivalence import BOS, EOS, PAD, VOCAB, padded_batch, peaked_model

from tformer.config import DecodeConfig, preset
from tformer.decoding import EnsembleModel, generate
from tformer.decoding.incremental import IncrementalDecoder
from tformer.decoding.static_step import StaticStepDecoder, make_decoder, uses_static_step
from tformer.model import Transformer


def test_static_step_log_probs_match_the_full_forward_pass_including_after_a_reorder():
    model = peaked_model()
    src, mask = padded_batch([7, 4, 9, 5])
    tgt = torch.randint(3, VOCAB, (4, 8), generator=torch.Generator().manual_seed(3))
    tgt[:, 0] = BOS
    swap = torch.tensor([1, 0, 3, 2])  # rows 0/1 and 2/3 are the two beams of sentences 0 and 1
    src2, mask2 = src[[0, 0, 1, 1]], mask[[0, 0, 1, 1]]
    with torch.no_grad():
        full = model(src2, tgt, src_pad_mask=mask2)
        full_swapped = model(src2, tgt[swap], src_pad_mask=mask2)
        decoder = StaticStepDecoder(model, src[:2], mask[:2], rows_per_sentence=2, capacity=12, reorders_rows=True)
        for t in range(8):
            if t == 5:  # beams of one sentence swap histories, as beam search does
                decoder.reorder(swap)
            log_probs, attention = decoder.step(tgt[:, t] if t < 5 else tgt[swap, t])
            expected = full[:, t] if t < 5 else full_swapped[:, t]
            # log-probs reach ~-35 here: a few units in the last place of float32 is ~1e-5
            torch.testing.assert_close(log_probs, F.log_softmax(expected, dim=-1), atol=1e-5, rtol=1e-6)
            assert attention is None
        assert int(decoder.cache.position_1) == 8  # the step advances its own position


def test_a_beam_reorder_moves_the_ancestry_table_never_the_keys_and_values():
    """Beam search's static cache (StaticBeamDecoderCache) keeps every key and value where its step wrote
    it: a reorder changes which slots a beam reads (the ancestry table), so after a reorder and a step the
    buffers differ from before only at the position that step wrote."""
    model = peaked_model()
    src, mask = padded_batch([6, 4])
    tokens = torch.randint(3, VOCAB, (6, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        static = StaticStepDecoder(model, src, mask, rows_per_sentence=3, capacity=8, reorders_rows=True)
        for t in range(4):
            static.step(tokens[:, t])
        before = [layer.k_BHLNK.clone() for layer in static.cache.layers]
        ancestry_before = static.cache.ancestry_BNL.clone()
        static.reorder(torch.tensor([2, 2, 0, 4, 3, 3]))
        static.step(tokens[:, 4])
    for layer, old in zip(static.cache.layers, before, strict=True):
        assert torch.equal(layer.k_BHLNK[:, :, :4], old[:, :, :4])
        assert not torch.equal(layer.k_BHLNK[:, :, 4], old[:, :, 4])
    # beams 0 and 1 of sentence 0 now read beam 2's slots, beam 2 reads beam 0's, and so on
    expected = torch.stack([ancestry_before[0, [2, 2, 0]], ancestry_before[1, [1, 0, 0]]])  # rows 3..5 -> 4, 3, 3
    assert torch.equal(static.cache.ancestry_BNL[:, :, :4], expected[:, :, :4])


def test_pending_reorders_compose_like_immediate_ones():
    """A static step applies `reorder` at the start of the next step; two reorders before a step must
    act as the default decoder's two immediate ones (rows of one sentence shuffled among themselves)."""
    model = peaked_model()
    src, mask = padded_batch([6, 4])
    generator = torch.Generator().manual_seed(8)
    tokens = torch.randint(3, VOCAB, (6, 6), generator=generator)
    tokens[:, 0] = BOS
    with torch.no_grad():
        default = IncrementalDecoder(
            model, src, mask, rows_per_sentence=3, capacity=8, want_attention=False, shared_memory=True
        )
        static = StaticStepDecoder(model, src, mask, rows_per_sentence=3, capacity=8, reorders_rows=True)
        for t in range(6):
            expected, _ = default.step(tokens[:, t])
            got, _ = static.step(tokens[:, t])
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-6)  # log-probs reach ~-25 here
            for _ in range(1 + t % 2):  # one reorder after even steps, two after odd ones
                rows = torch.cat([torch.randperm(3, generator=generator), 3 + torch.randperm(3, generator=generator)])
                default.reorder(rows)
                static.reorder(rows)


CONFIGS = {
    "greedy": DecodeConfig(beam_size=1, max_len_a=1.0, max_len_b=4),
    "beam": DecodeConfig(beam_size=3, nbest=3, max_len_a=1.0, max_len_b=4),
    "beam-ngram-minlen-banned": DecodeConfig(
        beam_size=4, nbest=2, no_repeat_ngram_size=2, min_len=3, max_len_b=12, banned_ids=(5,)
    ),
    "beam-minlen-banned": DecodeConfig(beam_size=3, nbest=2, min_len=4, max_len_b=9, banned_ids=(21, 9)),
    "beam-average": DecodeConfig(beam_size=2, length_normalization="average", length_penalty=1.0, max_len_b=10),
    "sampling": DecodeConfig(sampling=True, nbest=3, beam_size=3, top_k=5, seed=11, max_len_b=8),
    # per-sentence limits (max_len_a) with a forced eos at each one, and early stopping
    "beam-forced-eos-early": DecodeConfig(
        beam_size=3, nbest=2, max_len_a=1.0, max_len_b=1, forced_eos=True, early_stopping=True
    ),
    "greedy-forced-eos": DecodeConfig(beam_size=1, max_len_a=1.0, max_len_b=1, forced_eos=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_static_step_search_gives_the_tokens_and_scores_of_the_default_step(name):
    model = peaked_model()
    src, mask = padded_batch([7, 4, 9, 5, 2])
    prefix = [[5], [], [7, 8], [], []]
    default = CONFIGS[name]
    static = dataclasses.replace(default, static_step=True)
    for use_prefix in (False, True):
        kwargs = dict(src_pad_mask=mask, bos_id=BOS, eos_id=EOS, prefix=prefix if use_prefix else None)
        expected = generate(model, src, config=default, **kwargs)
        got = generate(model, src, config=static, **kwargs)
        for ours, reference in zip(got, expected, strict=True):
            assert [h.tokens for h in ours] == [h.tokens for h in reference]
            # fp32 sums of up to ~100 in magnitude: equal to a few units in the last place
            assert [h.score for h in ours] == pytest.approx([h.score for h in reference], abs=1e-5, rel=1e-6)
            assert [h.log_prob for h in ours] == pytest.approx([h.log_prob for h in reference], abs=1e-5, rel=1e-6)
    lengths = {len(h.tokens) for hypotheses in expected for h in hypotheses}
    assert len(lengths) > 1, "some sentences should finish early and stay in the static batch"


@pytest.mark.parametrize("variant", [dict(norm_position="pre"), dict(positional_encoding="learned")])
def test_static_step_follows_the_model_variants(variant):
    config = preset("tiny", src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, max_positions=64, **variant)
    model = perturbed(Transformer(config, seed=2), scale=0.5).eval()
    src, mask = padded_batch([6, 3, 8], seed=4)
    for beam in (1, 4):
        default = DecodeConfig(beam_size=beam, max_len_b=9)
        expected = generate(model, src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=default)
        static = dataclasses.replace(default, static_step=True)
        got = generate(model, src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=static)
        assert [[h.tokens for h in n] for n in got] == [[h.tokens for h in n] for n in expected]


def test_attention_maps_and_ensembles_use_the_default_step():
    model = peaked_model()
    static = DecodeConfig(beam_size=2, static_step=True)
    assert uses_static_step(model, static, want_attention=False)
    assert not uses_static_step(model, static, want_attention=True)
    assert not uses_static_step(EnsembleModel([model, model]), static, want_attention=False)
    assert not uses_static_step(model, DecodeConfig(beam_size=2), want_attention=False)
    src, mask = padded_batch([5, 3])
    with_maps = generate(model, src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=static, return_attention=True)
    assert all(h.attention is not None for n in with_maps for h in n)
    ensemble = generate(EnsembleModel([model, model]), src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=static)
    assert [len(n) for n in ensemble] == [1, 1]


def test_a_static_step_never_drops_rows():
    model = peaked_model()
    src, mask = padded_batch([5, 3])
    decoder = make_decoder(
        model, src, mask, rows_per_sentence=2, capacity=6, want_attention=False, static=True, reorders_rows=True
    )
    assert not decoder.can_drop_rows
    with pytest.raises(RuntimeError, match="keeps every row"):
        decoder.select(torch.tensor([0, 1]))
    padded = torch.cat([src, torch.full((2, 2), PAD)], dim=1)  # extra padding changes nothing
    assert [h.tokens for n in generate(
        model, padded, src_pad_mask=padded != PAD, bos_id=BOS, eos_id=EOS, config=DecodeConfig(static_step=True)
    ) for h in n] == [h.tokens for n in generate(
        model, src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=DecodeConfig()
    ) for h in n]  # fmt: skip


def test_a_step_past_the_capacity_is_refused_as_by_the_default_cache(monkeypatch):
    """Past its capacity the static cache's index_copy_ raised a bare IndexError (on a GPU, a device-side
    assert); the step count is known on the host, so the decoder refuses first, with the default's message."""
    model = peaked_model()
    src, mask = padded_batch([5, 3])
    bos_R = torch.full((2,), BOS)
    with torch.no_grad():
        default = IncrementalDecoder(
            model, src, mask, rows_per_sentence=1, capacity=3, want_attention=False, shared_memory=True
        )
        static = StaticStepDecoder(model, src, mask, rows_per_sentence=1, capacity=3, reorders_rows=False)
        for _ in range(3):
            torch.testing.assert_close(static.step(bos_R)[0], default.step(bos_R)[0], atol=1e-5, rtol=1e-6)
        with pytest.raises(ValueError) as expected:
            default.step(bos_R)
        with pytest.raises(ValueError, match=r"^decoder cache holds 3 positions; asked for 4$") as refused:
            static.step(bos_R)
    assert str(refused.value) == str(expected.value)
    assert int(static.cache.position_1) == 3  # refused before it ran
    # beam search's whole step runs without decoder.step: the search checks its number of steps first
    monkeypatch.setattr("tformer.decoding.beam.decoding_capacity", lambda model, steps: steps - 1)
    config = DecodeConfig(beam_size=2, static_step=True, max_len_a=0.0, max_len_b=8)
    with pytest.raises(ValueError, match=r"^decoder cache holds 7 positions; asked for 8$"):
        generate(model, src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=config)


@pytest.mark.parametrize(
    "device",
    [
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")),
        # cuda:1 while cuda:0 is current: the graphs must be recorded on cuda:1 (tests/test_cuda_capture.py)
        pytest.param("cuda:1", marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")),
    ],
)
def test_the_cuda_graph_replays_give_the_tokens_of_the_default_step_on_the_gpu(device):
    model = peaked_model().to(device)
    src, mask = padded_batch([7, 4, 9, 5, 2])
    src, mask = src.to(device), mask.to(device)
    for default in (CONFIGS[name] for name in ("greedy", "beam", "beam-minlen-banned", "beam-ngram-minlen-banned")):
        kwargs = dict(src_pad_mask=mask, bos_id=BOS, eos_id=EOS)
        expected = generate(model, src, config=default, **kwargs)
        got = generate(model, src, config=dataclasses.replace(default, static_step=True), **kwargs)
        assert [[h.tokens for h in n] for n in got] == [[h.tokens for h in n] for n in expected]
        assert [h.score for n in got for h in n] == pytest.approx([h.score for n in expected for h in n], abs=1e-4)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA graph needs a GPU")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_batches_of_one_shape_reuse_the_captured_step_and_decode_as_the_default_step(device):
    """The buffers (and on a GPU the graph) of a shape are kept and reused: each new batch loads its own
    memory and mask and starts from position 0; shapes interleave; only the last few shapes are kept."""
    from tformer.decoding import static_step

    model = peaked_model().to(device)
    beam = DecodeConfig(beam_size=3, nbest=2, max_len_b=6)
    static = dataclasses.replace(beam, static_step=True)
    lengths = [[7, 4, 9], [9, 2, 5], [3, 6]]
    batches = [tuple(t.to(device) for t in padded_batch(item, seed=seed)) for seed, item in enumerate(lengths)]
    tolerance = 1e-5 if device == "cpu" else 1e-4
    batches.append(batches[0])  # the first shape again, after another shape
    for src, mask in batches:
        expected = generate(model, src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=beam)
        got = generate(model, src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=static)
        assert [[h.tokens for h in n] for n in got] == [[h.tokens for h in n] for n in expected]
        scores = [h.score for n in got for h in n]
        assert scores == pytest.approx([h.score for n in expected for h in n], abs=tolerance)
    kept = static_step._CAPTURED[model]
    assert len(kept) == 2  # (9 rows, source 9) served three batches; (6 rows, source 6) one
    with torch.no_grad():  # weights changed in place are seen by the kept step
        for parameter in model.decoder.parameters():
            parameter.mul_(0.9)
    src, mask = batches[0]
    expected = generate(model, src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=beam)
    got = generate(model, src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=static)
    assert [[h.tokens for h in n] for n in got] == [[h.tokens for h in n] for n in expected]
    for width in range(10, 10 + static_step.SHAPES_KEPT + 1):
        src, mask = (t.to(device) for t in padded_batch([width, 3], seed=width))
        generate(model, src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=static)
    assert len(static_step._CAPTURED[model]) == static_step.SHAPES_KEPT


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_the_compiled_static_step_decodes_as_the_default_step(device, monkeypatch):
    """DecodeConfig.compile_step: the static step (for beam search the whole search step) compiled with
    torch.compile gives the default step's tokens and scores (on a GPU the compiled kernels are recorded)."""
    compiled_functions = []
    real_compile = torch.compile

    def counting_compile(function, **options):
        compiled_functions.append(getattr(function, "__name__", ""))
        return real_compile(function, **options)

    monkeypatch.setattr(torch, "compile", counting_compile)
    model = peaked_model().to(device)
    src, mask = (t.to(device) for t in padded_batch([7, 4, 9, 5, 2]))
    for default in (CONFIGS["greedy"], CONFIGS["beam-minlen-banned"]):
        kwargs = dict(src_pad_mask=mask, bos_id=BOS, eos_id=EOS)
        expected = generate(model, src, config=default, **kwargs)
        compiled = dataclasses.replace(default, static_step=True, compile_step=True)
        got = generate(model, src, config=compiled, **kwargs)
        assert [[h.tokens for h in n] for n in got] == [[h.tokens for h in n] for n in expected]
        scores = [h.score for n in got for h in n]
        assert scores == pytest.approx([h.score for n in expected for h in n], abs=1e-4, rel=1e-6)
    assert {"step_in_place", "whole_step"} <= set(compiled_functions)


@pytest.mark.parametrize("name", ["greedy", "beam"])
def test_the_cpu_static_step_reads_only_the_positions_written(name, monkeypatch):
    """On the CPU (no CUDA graph to keep one shape) a step of the static caches reads the positions written
    so far, at least two (StepWindow), not the whole capacity: the default step's attention work (reading
    every position made the compiled step at batch 32 no faster than the default step)."""
    from tformer.model.cache import StaticBeamLayerCache, StaticLayerCache

    layer_cache = StaticLayerCache if name == "greedy" else StaticBeamLayerCache
    real_append = layer_cache.append
    widths_by_layer: dict[int, list[int]] = {}

    def watching_append(self, k, v):
        keys, values = real_append(self, k, v)
        slots = 1 if name == "greedy" else self.k_BHLNK.shape[3]
        widths_by_layer.setdefault(id(self), []).append(keys.shape[2] // slots)
        return keys, values

    monkeypatch.setattr(layer_cache, "append", watching_append)
    model = peaked_model()
    src, mask = padded_batch([7, 4, 9])
    kwargs = dict(src_pad_mask=mask, bos_id=BOS, eos_id=EOS)
    expected = generate(model, src, config=CONFIGS[name], **kwargs)
    got = generate(model, src, config=dataclasses.replace(CONFIGS[name], static_step=True), **kwargs)
    assert [[h.tokens for h in n] for n in got] == [[h.tokens for h in n] for n in expected]
    widths = next(iter(widths_by_layer.values()))  # the first layer's
    assert len(widths) >= 4 and widths == [max(2, t + 1) for t in range(len(widths))]


def test_the_compiled_step_on_the_cpu_compiles_a_few_times_for_batches_of_many_shapes():
    """On the CPU the compiled step uses torch's automatic dynamic shapes: the first step compiles with its
    sizes, the second with the number of positions it reads as a symbol (StepWindow), the second batch shape
    with every size as a symbol, which serves every later shape of more than one sentence and source token.
    Sizes 1 are never symbols (torch specialises 0 and 1): batches of one sentence, and sources of one token,
    compile apart. A few compilations in all for the nine shapes below (with fixed sizes each shape and each
    step's window compiled once more, seconds each, and past torch's recompile limit ran uncompiled); the
    tokens are the default step's, the scores to float rounding."""
    from torch._dynamo.utils import counters

    model = peaked_model()
    shapes = [[7, 4, 9, 5], [3, 6], [6], [9], [8, 8, 2], [1], [1, 1], [5, 9, 4, 6, 7], [10, 3]]
    for default in (CONFIGS["greedy"], CONFIGS["beam-minlen-banned"]):
        torch._dynamo.reset()
        counters.clear()
        compiled = dataclasses.replace(default, static_step=True, compile_step=True)
        for seed, lengths in enumerate(shapes):
            src, mask = padded_batch(lengths, seed=seed)
            kwargs = dict(src_pad_mask=mask, bos_id=BOS, eos_id=EOS)
            expected = generate(model, src, config=default, **kwargs)
            got = generate(model, src, config=compiled, **kwargs)
            assert [[h.tokens for h in n] for n in got] == [[h.tokens for h in n] for n in expected]
            scores = [h.score for n in got for h in n]
            assert scores == pytest.approx([h.score for n in expected for h in n], abs=1e-4, rel=1e-6)
        assert 2 < counters["stats"]["unique_graphs"] <= 6, (default.beam_size, dict(counters["stats"]))
    torch._dynamo.reset()


def test_compile_step_needs_the_static_step_and_the_flags_set_both():
    import argparse

    from tformer.cli.decode_options import add_decode_arguments, merged_decode_config
    from tformer.config import ConfigError

    with pytest.raises(ConfigError, match="set static_step = true"):
        DecodeConfig(compile_step=True)
    parser = argparse.ArgumentParser()
    add_decode_arguments(parser)
    config = merged_decode_config(DecodeConfig(), {}, {}, parser.parse_args(["--compile-step"]))
    assert config.static_step and config.compile_step
    config = merged_decode_config(DecodeConfig(), {}, {}, parser.parse_args(["--static-step"]))
    assert config.static_step and not config.compile_step


def test_a_later_batch_of_the_same_shape_leaves_the_first_callers_mask_and_results_alone():
    """The whole-step beam search keeps its buffers for the next batch of the same shape: it must own
    them, not write the next batch's mask into the tensor the first caller passed."""
    model = peaked_model()
    config = DecodeConfig(beam_size=2, static_step=True, max_len_a=0.0, max_len_b=8)
    src_a, mask_a = padded_batch([7, 3], seed=5)
    src_b, mask_b = padded_batch([2, 7], seed=6)
    kept_mask_a = mask_a.clone()

    def run(src, mask):
        result = generate(model, src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=config)
        return [[(h.tokens, h.score) for h in n] for n in result]

    first = run(src_a, mask_a)
    run(src_b, mask_b)
    assert torch.equal(mask_a, kept_mask_a)
    assert run(src_a, mask_a) == first


def test_sampling_on_the_static_step_draws_what_the_default_step_draws_when_paths_end_apart():
    """On the default step finished paths leave the batch, on the static step they stay: a path's draws
    must not depend on which other paths are still there."""
    model = peaked_model(eos_bias=9.0)
    src, mask = padded_batch([7, 4, 9, 5, 3], seed=2)
    config = DecodeConfig(sampling=True, beam_size=3, nbest=3, seed=3, top_k=5, temperature=1.3, max_len_b=12)

    def run(config):
        result = generate(model, src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=config)
        return [[h.tokens for h in n] for n in result]

    default = run(config)
    lengths = {len(tokens) for n in default for tokens in n}
    assert max(lengths) - min(lengths) > 4, "paths should end at different periodic checks"
    assert run(dataclasses.replace(config, static_step=True)) == default


def test_the_compiled_and_the_eager_static_step_keep_their_own_buffers_and_graphs():
    """A shape's CUDA graphs record the step compiled or not: a batch decoded with the other compile_step
    must not replay them (it did: the kept step of a shape was found without looking at the setting)."""
    model = peaked_model()
    src, mask = padded_batch([5, 3], seed=0)

    def buffers(compile_step: bool):
        options = dict(rows_per_sentence=2, capacity=6, reorders_rows=True, compile_step=compile_step)
        return StaticStepDecoder(model, src, mask, **options).step_buffers

    eager, compiled = buffers(False), buffers(True)
    assert eager is not compiled
    assert buffers(False) is eager and buffers(True) is compiled  # each setting reuses its own
