"""The Translator: tokenize, batch by length, decode, detokenize, in input order, chunk by chunk."""

from __future__ import annotations

import re
import string
import warnings

import pytest
import torch
from test_decoding_equivalence import BOS, EOS, PAD, VOCAB, peaked_model

from tformer.config import DecodeConfig
from tformer.data.tokenizer import Tokenizer
from tformer.decoding import generate
from tformer.decoding.pipeline import Translation, Translator

ALPHABET = string.ascii_lowercase + " "  # ids 4 .. 30; a vocabulary of 40 covers them


class CharTokenizer:
    """A stand-in with the real tokenizer's interface: one id per character."""

    pad_id, bos_id, eos_id = PAD, BOS, EOS

    def encode_source(self, text: str) -> list[int]:
        return [4 + ALPHABET.index(char) for char in text]

    def decode_target(self, ids: list[int]) -> str:
        return "".join(ALPHABET[i - 4] if 4 <= i < 4 + len(ALPHABET) else f"<{i}>" for i in ids)


LINES = ["hello world", "a", "", "the quick brown fox", "abc", "zz top", "decoding is fun", "x"]


def reference(model, line: str, config: DecodeConfig) -> list[tuple[list[int], float]]:
    ids = torch.tensor([[*CharTokenizer().encode_source(line), EOS]])
    (hypotheses,) = generate(model, ids, src_pad_mask=None, bos_id=BOS, eos_id=EOS, config=config)
    return [(h.tokens, h.score) for h in hypotheses]


@pytest.mark.parametrize(("max_batch_tokens", "chunk_lines"), [(4096, 256), (20, 3), (1, 1)])
def test_results_come_back_in_input_order_and_match_single_sentence_decoding(max_batch_tokens, chunk_lines):
    model = peaked_model()
    config = DecodeConfig(beam_size=3, nbest=2, max_len_b=6)
    translator = Translator(model, CharTokenizer(), config, max_batch_tokens=max_batch_tokens, chunk_lines=chunk_lines)
    results = list(translator.translate(iter(LINES)))
    assert len(results) == len(LINES)
    for line, translations in zip(LINES, results, strict=True):
        assert all(isinstance(t, Translation) for t in translations)
        expected = reference(model, line, config) if line else [([], 0.0)] * 2  # not decoded: nbest empty ones
        assert [t.tokens for t in translations] == [tokens for tokens, _ in expected]
        assert [t.score for t in translations] == pytest.approx([score for _, score in expected], abs=1e-4)
        assert [t.text for t in translations] == [CharTokenizer().decode_target(tokens) for tokens, _ in expected]


def test_a_test_set_of_a_thousand_lines_is_sorted_and_batched_whole(monkeypatch):
    """A chunk's longest lines make a small last batch that runs the most steps: 256-line chunks cut a
    1,000-line test set into four such tails, where one chunk has one."""
    import tformer.decoding.pipeline as pipeline

    batch_sizes = []

    def counting_generate(model, src, **kwargs):
        batch_sizes.append(src.shape[0])
        return generate(model, src, **kwargs)

    monkeypatch.setattr(pipeline, "generate", counting_generate)
    lines = ["ab"] * 999 + ["the quick brown fox"]
    translator = Translator(peaked_model(), CharTokenizer(), DecodeConfig(beam_size=1, max_len_b=2))
    results = translator.translate_texts(lines)
    assert len(results) == 1000 and len(set(results[:999])) == 1
    assert batch_sizes == [999, 1]  # the 999 short lines together, the long one alone


def test_batches_hold_at_most_max_batch_tokens_padded_tokens_and_are_as_full_as_that_allows(monkeypatch):
    """Sorted by length, lines of 3, 4 and 5 tokens (eos included) under a budget of 12: (3, 3, 3, 3),
    then (3, 4) padded to 2 x 4 = 8 (a third line would make 3 x 5 = 15), (5, 5)."""
    import tformer.decoding.pipeline as pipeline

    shapes = []

    def recording_generate(model, src, **kwargs):
        shapes.append(tuple(src.shape))
        return generate(model, src, **kwargs)

    monkeypatch.setattr(pipeline, "generate", recording_generate)
    lines = ["ab", "cd", "ef", "gh", "ij", "klm", "nopq", "rstu"]
    translator = Translator(
        peaked_model(), CharTokenizer(), DecodeConfig(beam_size=1, max_len_b=2), max_batch_tokens=12
    )
    translator.translate_texts(lines)
    assert shapes == [(4, 3), (2, 4), (2, 5)]
    assert all(rows * width <= 12 for rows, width in shapes)


def test_translate_is_lazy_and_translate_texts_gives_the_best():
    model = peaked_model()
    translator = Translator(model, CharTokenizer(), DecodeConfig(beam_size=2, nbest=2), chunk_lines=2)
    consumed = []

    def lines():
        for line in LINES:
            consumed.append(line)
            yield line

    stream = translator.translate(lines())
    next(stream)
    assert len(consumed) == 2  # only the first chunk was read
    best = translator.translate_texts(LINES)
    assert best == [t[0].text for t in Translator(model, CharTokenizer(), DecodeConfig(beam_size=2)).translate(LINES)]


def test_too_long_line_is_a_value_error_naming_the_line():
    translator = Translator(peaked_model(), CharTokenizer(), DecodeConfig(beam_size=1))
    with pytest.raises(ValueError, match=r"line 2 has 71 tokens.*translate its first .* with --truncate"):
        list(translator.translate(["ok", "a" * 70]))


def test_a_line_of_exactly_max_positions_tokens_is_translated_whole():
    """max_positions tokens, eos included, is what the model accepts: neither refused nor cut."""
    model = peaked_model()
    limit = model.config.max_positions
    config = DecodeConfig(beam_size=1, max_len_b=3)
    line = "ab" * limit
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (translations,) = Translator(model, CharTokenizer(), config, truncate=True).translate([line[: limit - 1]])
    assert [translations[0].tokens] == [tokens for tokens, _ in reference(model, line[: limit - 1], config)]
    with pytest.raises(ValueError, match=f"line 1 has {limit + 1} tokens"):
        list(Translator(model, CharTokenizer(), config).translate([line[:limit]]))


def test_a_lone_surrogate_is_a_value_error_naming_the_line_and_the_index():
    """Through the real tokenizer: sentencepiece's bare RuntimeError ("Unable to cast Python instance of type
    <class 'str'> to C++ type '?'") said neither which line nor where in it."""
    tokenizer = Tokenizer.train(LINES * 4, LINES * 4, vocab_size=36)
    translator = Translator(peaked_model(), tokenizer, DecodeConfig(beam_size=1), chunk_lines=2)
    with pytest.raises(ValueError, match=r"^input line 3: text holds an unpaired surrogate \(U\+DCFF\) at index 2; "):
        translator.translate_texts(["ab", "cd", "ef\udcff"])


def test_truncate_translates_a_too_long_line_cut_to_the_model_and_warns():
    """With truncate, a long line no longer stops the job: it is translated as its first max_positions - 1
    pieces and eos, and the lines after it are translated too."""
    model = peaked_model()
    limit = model.config.max_positions
    config = DecodeConfig(beam_size=2, max_len_b=5)
    long_line = "ab" * limit
    translator = Translator(model, CharTokenizer(), config, truncate=True)
    with pytest.warns(UserWarning, match=f"line 2 has {2 * limit + 1} tokens.*translated its first {limit - 1}"):
        results = list(translator.translate(["ok", long_line, "x"]))
    assert len(results) == 3
    for line, translations in zip(["ok", long_line[: limit - 1], "x"], results, strict=True):
        assert [translations[0].tokens] == [tokens for tokens, _ in reference(model, line, config)[:1]]


def test_truncate_encodes_only_the_head_of_a_long_line_and_gets_the_same_pieces(monkeypatch):
    """With truncate, a line of megabytes was encoded whole (sentencepiece took ~1 GB for 20 MB) only to
    keep its first max_positions - 1 pieces: now a prefix cut at a space is, and the pieces translated
    are exactly the first ones of the whole line's."""
    tokenizer = Tokenizer.train(LINES * 4, LINES * 4, vocab_size=36)
    model = peaked_model()
    limit = model.config.max_positions
    long_line = " ".join(LINES) * 5_000  # ~380 k characters
    seen = []
    encode = tokenizer._src.encode

    def recording(text, *args, **kwargs):
        seen.append(len(text))
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(tokenizer._src, "encode", recording)
    translator = Translator(model, tokenizer, DecodeConfig(beam_size=1, max_len_b=3), truncate=True)
    with pytest.warns(UserWarning, match=f"line 1 has more than {limit} tokens.*translated its first {limit - 1}"):
        assert len(list(translator.translate([long_line]))) == 1
    assert max(seen) < 10 * limit  # a prefix of the line, not its 380 k characters
    monkeypatch.undo()
    expected = [*tokenizer.encode_source(long_line)[: limit - 1], EOS]
    with pytest.warns(UserWarning, match="translated its first"):
        assert translator._fitted(long_line, 1) == expected


def test_an_empty_line_translates_to_an_empty_line_without_decoding(monkeypatch):
    calls = []
    monkeypatch.setattr("tformer.decoding.pipeline.generate", lambda *args, **kwargs: calls.append(1))
    translator = Translator(peaked_model(), CharTokenizer(), DecodeConfig(beam_size=3, nbest=2))
    results = list(translator.translate(["", "", ""]))
    assert [[t.text for t in nbest] for nbest in results] == [["", ""]] * 3  # nbest lines for each, as for text
    assert calls == []


def test_translate_chunks_keeps_input_order_across_chunks_of_any_size():
    model = peaked_model()
    config = DecodeConfig(beam_size=2, max_len_b=6)
    translator = Translator(model, CharTokenizer(), config)
    whole = [t[0].tokens for t in translator.translate(LINES)]
    chunked = translator.translate_chunks([LINES[:1], LINES[1:6], LINES[6:]])
    assert [t[0].tokens for t in chunked] == whole


def test_the_heap_is_trimmed_after_every_chunk_so_a_long_job_stays_flat(monkeypatch):
    """Batches of ever-changing shapes fragment glibc's heaps: a server of mixed requests grew from 0.3 to
    1.4 GB resident over 3,000 requests (0.8 GB, flat, with the trim). The freed pages are given back after
    each chunk (a server window is one chunk), before its results go out."""
    from tformer.decoding.heap import release_free_memory

    release_free_memory()  # runs here (glibc: malloc_trim; elsewhere: nothing)
    trims = []
    monkeypatch.setattr("tformer.decoding.pipeline.release_free_memory", lambda: trims.append(1))
    translator = Translator(peaked_model(), CharTokenizer(), DecodeConfig(beam_size=2, max_len_b=4), chunk_lines=3)
    stream = translator.translate(LINES)
    next(stream)
    assert trims == [1]  # after the first chunk, before its first line is handed out
    assert len(list(stream)) == len(LINES) - 1 and trims == [1, 1, 1]  # 8 lines: chunks of 3, 3, 2


def test_one_string_is_refused_not_translated_character_by_character():
    """A string is an iterable of its characters: `translate_texts("hello")` translated "h", "e", "l", ...
    as five lines and returned five translations, with no sign of the mistake."""
    translator = Translator(peaked_model(), CharTokenizer(), DecodeConfig(beam_size=1))
    with pytest.raises(TypeError, match=r"^lines must be an iterable of strings, not one str: wrap it in a list"):
        translator.translate_texts("hello")
    with pytest.raises(TypeError, match=r"^lines must be an iterable of strings, not one bytes"):
        translator.translate(b"hello")  # refused at the call, not at the first next()
    with pytest.raises(TypeError, match=r"^a chunk must be an iterable of strings, not one str"):
        list(translator.translate_chunks(["hello", "world"]))


def test_a_nul_character_is_a_value_error_naming_the_line_as_translate_and_the_server_refuse_it():
    """Translator translated a line holding a NUL, which tformer translate and the server refuse: it is what
    UTF-16 text or binary data read as UTF-8 gives, never a sentence. Nothing of the chunk is decoded."""
    tokenizer = Tokenizer.train(LINES * 4, LINES * 4, vocab_size=36)  # it encodes a NUL (as an unknown piece)
    translator = Translator(peaked_model(), tokenizer, DecodeConfig(beam_size=1), chunk_lines=2)
    advice = "looks like UTF-16 or binary data, not UTF-8 text; convert it (e.g. iconv -f UTF-16 -t UTF-8)"
    message = rf"^input line 3 holds a NUL character \(U\+0000\): it {re.escape(advice)}$"
    with pytest.raises(ValueError, match=message):
        translator.translate_texts(["ab", "cd", "e\x00f"])


def test_a_line_that_is_not_text_is_a_type_error_naming_the_line():
    translator = Translator(peaked_model(), CharTokenizer(), DecodeConfig(beam_size=1))
    with pytest.raises(TypeError, match=r"^input line 2 is a NoneType, not a str"):
        translator.translate_texts(["ab", None])


def test_a_config_that_is_not_a_decode_config_is_a_type_error_at_construction():
    """A run's ExperimentConfig (run.experiment for run.experiment.decode) failed at the first line translated
    with an AttributeError ('ExperimentConfig' object has no attribute 'nbest')."""
    from tformer.config import load_experiment

    with pytest.raises(
        TypeError, match=r"^config must be a DecodeConfig \(a run's is run.experiment.decode\), got Exp"
    ):
        Translator(peaked_model(), CharTokenizer(), load_experiment(None, []))
    with pytest.raises(TypeError, match=r"^config must be a DecodeConfig, got dict$"):
        Translator(peaked_model(), CharTokenizer(), {"beam_size": 2})


def test_a_tokenizer_with_more_source_ids_than_the_model_is_refused_at_construction():
    """Another run's tokenizer failed only at a line holding an id past the model's embeddings (as source
    ids out of the vocabulary), and translated the lines that held none. Fewer ids (an imported Marian
    model's embeddings may hold more than its vocabulary files) are fine."""

    class LargerTokenizer(CharTokenizer):
        src_vocab_size = tgt_vocab_size = VOCAB + 1

    with pytest.raises(ValueError, match=rf"^the tokenizer's source vocabulary \({VOCAB + 1} ids\) is larger than"):
        Translator(peaked_model(), LargerTokenizer(), DecodeConfig(beam_size=1))

    class SmallerTokenizer(CharTokenizer):
        src_vocab_size = tgt_vocab_size = VOCAB - 1

    assert Translator(peaked_model(), SmallerTokenizer(), DecodeConfig(beam_size=1)).translate_texts(["ab"])

    class SameTokenizer(CharTokenizer):
        src_vocab_size = tgt_vocab_size = VOCAB

    assert Translator(peaked_model(), SameTokenizer(), DecodeConfig(beam_size=1)).translate_texts(["ab"])


def test_translating_leaves_the_models_modes_as_they_were():
    """The Translator put the caller's model in eval mode for good: a model translated between training
    steps (a notebook checking progress) went on training without dropout. Each call now decodes in eval
    mode and gives every module its own mode back, the same translations as from a model in eval mode."""
    model = peaked_model()
    expected = Translator(model, CharTokenizer(), DecodeConfig(beam_size=2)).translate_texts(LINES)
    model.train()
    model.encoder.eval()  # a frozen part stays frozen
    translator = Translator(model, CharTokenizer(), DecodeConfig(beam_size=2))
    assert model.training
    assert translator.translate_texts(LINES) == expected
    assert model.training and model.decoder.training and not model.encoder.training
    assert not any(module.training for module in model.encoder.modules())
    with pytest.raises(ValueError, match="line 2 has"):  # also after an error
        translator.translate_texts(["ab", "a" * 70])
    assert model.training and model.decoder.training and not model.encoder.training


def test_the_translator_decodes_where_the_model_is_unless_told_otherwise():
    """The default device was "cpu": a model on a GPU given without `device` was moved to the CPU, in
    place, under its owner's feet. Now the default is the model's own device."""
    with torch.device("meta"):  # a device other than the CPU that any machine has
        model = peaked_model()
    translator = Translator(model, CharTokenizer(), DecodeConfig(beam_size=2))
    assert translator.device == torch.device("meta")
    assert next(model.parameters()).device == torch.device("meta")


def test_translators_over_one_model_take_turns_across_threads(monkeypatch):
    """Decoding changes the model for the time of a chunk (eval mode, packed weights, the static step's
    buffers): a thread that ended its chunk gave a model in training its mode back while another thread was
    still decoding with it, which then refused it as a model in training mode. Translators over one model
    now take turns, a chunk at a time, and each thread gets what it gets alone."""
    import threading

    model = peaked_model()
    expected = Translator(model, CharTokenizer(), DecodeConfig(beam_size=2)).translate_texts(LINES)
    model.train()
    inside, first_inside, release = [], threading.Event(), threading.Event()

    def slow_generate(*args, **kwargs):
        inside.append(1)
        first_inside.set()
        release.wait(timeout=10)  # the first caller holds on here until the other thread has tried to start
        try:
            return generate(*args, **kwargs)
        finally:
            inside.pop()

    monkeypatch.setattr("tformer.decoding.pipeline.generate", slow_generate)
    results, overlaps = {}, []

    def work(name):
        translator = Translator(model, CharTokenizer(), DecodeConfig(beam_size=2), max_batch_tokens=10**6)
        results[name] = translator.translate_texts(LINES)

    first = threading.Thread(target=work, args=("first",))
    first.start()
    assert first_inside.wait(timeout=10)
    second = threading.Thread(target=work, args=("second",))
    second.start()
    second.join(timeout=0.5)
    overlaps.append(len(inside))  # the second thread must not have started decoding meanwhile
    release.set()
    first.join(timeout=30)
    second.join(timeout=30)
    assert overlaps == [1]
    assert results == {"first": expected, "second": expected}
    assert model.training


def test_a_translator_reads_in_one_line():
    translator = Translator(peaked_model(), CharTokenizer(), DecodeConfig(beam_size=2), max_batch_tokens=64)
    assert repr(translator).startswith("Translator(Transformer on cpu, <test_decoding_pipeline.CharTokenizer ")
    assert "DecodeConfig(beam_size=2, " in repr(translator)
    assert repr(translator).endswith(", max_batch_tokens=64, chunk_lines=1024, truncate=False)")


def test_characters_read_as_unknown_are_named_once():
    """A character the tokenizer has no piece for (Chinese beyond data.character_coverage) became <unk> and
    was lost from the translation without a word; now the first line holding one names them, once, where
    `translate` and `evaluate` ask for it."""
    tokenizer = Tokenizer.train(LINES * 4, LINES * 4, vocab_size=36)
    config = DecodeConfig(beam_size=1, max_len_b=3)
    translator = Translator(peaked_model(), tokenizer, config, chunk_lines=1, warn_unknown=True)
    with pytest.warns(UserWarning, match=r"^input line 2 holds characters the tokenizer has no piece for \(猫 鸟\)"):
        assert len(translator.translate_texts(["abc", "猫 ab 鸟猫", "鸟"])) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        translator.translate_texts(["鸟", "abc"])  # warned once
        Translator(peaked_model(), tokenizer, config).translate_texts(["猫"])  # validation and serve: not asked
    translator = Translator(peaked_model(), tokenizer, config, warn_unknown=True)
    with pytest.warns(UserWarning, match=r"^input line 1 holds .* no piece for \(鸟 猫 狗\)"):  # one <unk> piece
        translator.translate_texts(["ab 鸟猫狗"])


FORKED_CHILD = """
import faulthandler, os, sys, torch
sys.path[:0] = sys.argv[1:]
from test_decoding_pipeline import LINES, CharTokenizer
from test_decoding_equivalence import peaked_model
from tformer.config import DecodeConfig
from tformer.decoding.pipeline import Translator

torch.set_num_threads(2)
translator = Translator(peaked_model(), CharTokenizer(), DecodeConfig(beam_size=2))
expected = translator.translate_texts(LINES)  # the parent has used torch's thread pool
pid = os.fork()
if pid == 0:
    faulthandler.dump_traceback_later(120, exit=True)  # a hung child ends, with status 1, instead of the test hanging
    same = translator.translate_texts(LINES) == expected
    print(torch.get_num_threads(), same, flush=True)
    os._exit(0)
os._exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


def test_a_child_forked_after_translating_translates_on_one_thread_and_does_not_hang():
    """torch's OpenMP pool does not survive fork: a child forked from a process that had decoded (gunicorn
    --preload, celery's prefork workers) hung at its first matrix product. Such a child now computes on one
    thread and gets the parent's translations."""
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    source = str(Path(__import__("tformer").__file__).parents[1])
    done = subprocess.run(
        [sys.executable, "-c", FORKED_CHILD, str(here), source], capture_output=True, text=True, timeout=300
    )
    assert (done.returncode, done.stdout) == (0, "1 True\n"), done.stderr[-2000:]


@pytest.mark.parametrize(
    "config",
    [DecodeConfig(beam_size=3, nbest=2), DecodeConfig(beam_size=1), DecodeConfig(sampling=True, seed=0)],
    ids=["beam", "greedy", "sampling"],
)
def test_nan_scores_are_a_value_error_naming_the_line_not_an_empty_or_pad_translation(config: DecodeConfig):
    """NaN weights (or bfloat16 arithmetic) made beam search finish no hypothesis, and `translate`,
    `evaluate` and the server then indexed the empty n-best list (an IndexError traceback); greedy search
    and sampling returned pad tokens scored NaN as a translation."""
    model = peaked_model()
    translations = Translator(model, CharTokenizer(), config, chunk_lines=1).translate(["ab", "cd"])
    assert next(translations)[0].text  # line 1 is translated; then the weights go bad
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"^input line 2: the model's scores are NaN .*check the checkpoint"):
        next(translations)
    model = model.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"^input line 1: .* or bfloat16 arithmetic: decode with --dtype float32$"):
        Translator(model, CharTokenizer(), config).translate_texts(["ab"])


def test_a_translator_is_made_where_there_is_no_fork(monkeypatch):
    """Windows has no fork and no os.register_at_fork: registering the at-fork handler unconditionally made
    every Translator and load_run fail there with an AttributeError."""
    from tformer.runtime import one_thread_after_fork

    monkeypatch.delattr("os.register_at_fork")
    one_thread_after_fork.cache_clear()  # registered already in this process: ask again, as a fresh one would
    try:
        translator = Translator(peaked_model(), CharTokenizer(), DecodeConfig(beam_size=2))
        assert len(translator.translate_texts(LINES)) == len(LINES)
    finally:
        one_thread_after_fork.cache_clear()


def test_nan_scores_name_the_first_such_line_of_the_input_not_of_the_length_sorted_batch() -> None:
    """A batch is decoded shortest first: the line named was the shortest with NaN scores (input line 2
    here), not the first of the input, where a user would look."""
    model = peaked_model()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"^input line 1: the model's scores are NaN"):
        Translator(model, CharTokenizer(), DecodeConfig(beam_size=2)).translate_texts(["abcdef", "ab"])
