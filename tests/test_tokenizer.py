"""The sentencepiece wrapper: fixed special ids, exact round trips, determinism and serialisation."""

from __future__ import annotations

import io
import random
import re
import unicodedata
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from training_helpers import tiny_experiment, write_corpus

from tformer.config import ConfigError, DataConfig
from tformer.data import tokenizer as tokenizer_module
from tformer.data.tokenizer import Tokenizer, TokenizerError, normalize, sample_pairs
from tformer.interop.marian_tokenizer import VocabTokenizer
from tformer.training import start_run

ALPHABET = "abcdefghijklmnopqrstuvwxyzäöüßABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÜ0123456789.,;:!?'\"()-"
SOURCES = [
    "Two young, White males are outside near many bushes.",
    "Several men in hard hats are operating a giant pulley system!",
    'A little girl climbing into a wooden playhouse; (quickly) "yes" - 0123456789?',
    "The quick brown fox jumps over the lazy dog: QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
]
TARGETS = [
    "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche.",
    "Mehrere Männer mit Schutzhelmen bedienen ein Antriebsradsystem.",
    "Ein kleines Mädchen klettert in ein Spielhaus aus Holz. ÄÖÜ äöü ß",
    "Falsches Üben von Xylophonmusik quält jeden größeren Zwerg",
]


@pytest.fixture(scope="module")
def joint() -> Tokenizer:
    return Tokenizer.train([*SOURCES * 3, " ".join(ALPHABET)], TARGETS * 3, vocab_size=120)


def test_special_ids_are_fixed(joint: Tokenizer) -> None:
    assert (joint.pad_id, joint.bos_id, joint.eos_id, joint.unk_id) == (0, 1, 2, 3)
    assert joint.id_to_target_piece([0, 1, 2, 3]) == ["<pad>", "<s>", "</s>", "<unk>"]
    assert joint.joint
    assert joint.src_vocab_size == joint.tgt_vocab_size <= 120


def test_encoding_has_no_specials_and_pieces_align_with_ids(joint: Tokenizer) -> None:
    text = "Two young men near the playhouse."
    ids = joint.encode_source(text)
    assert ids and not {0, 1, 2} & set(ids)
    assert len(joint.source_pieces(text)) == len(ids)
    assert joint.id_to_source_piece(ids) == joint.source_pieces(text)
    assert joint.encode_sources([text, "Ein Mädchen"]) == [ids, joint.encode_source("Ein Mädchen")]
    assert joint.encode_targets(["Ein Mädchen"]) == [joint.encode_target("Ein Mädchen")]


def test_decode_drops_pad_bos_eos(joint: Tokenizer) -> None:
    ids = joint.encode_target("Zwei Männer")
    assert joint.decode_target([1, *ids, 2, 0, 0]) == "Zwei Männer"
    assert joint.decode_target(torch.tensor([1, *ids, 2])) == "Zwei Männer"
    assert joint.decode_targets([[1, *ids, 2], ids]) == ["Zwei Männer"] * 2
    assert joint.decode_source(joint.encode_source("Two men")) == "Two men"


def test_an_output_cut_after_a_word_boundary_piece_has_no_trailing_space(joint: Tokenizer) -> None:
    """A hypothesis cut at the maximum length may end in the lone word-boundary piece "▁"."""
    boundary = joint._tgt.piece_to_id("▁")
    assert boundary != joint.unk_id, "the tokenizer should have the lone boundary piece"
    ids = joint.encode_target("Zwei Männer")
    assert joint.decode_target([*ids, boundary]) == "Zwei Männer"
    assert joint.decode_target([boundary, *ids]) == "Zwei Männer"


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=ALPHABET + " \t\n", max_size=60))
def test_round_trip_is_exact_for_normalised_text(joint: Tokenizer, text: str) -> None:
    assert joint.decode_target(joint.encode_target(text)) == normalize(text)
    assert joint.decode_source(joint.encode_source(text)) == normalize(text)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_normalize_is_idempotent(text: str) -> None:
    once = normalize(text)
    assert normalize(once) == once
    assert "\u2581" not in once and "  " not in once


def test_normalize_folds_compatibility_forms_and_whitespace() -> None:
    assert normalize("  ﬁne\u00a0\tday \u2581 x ") == "fine day x"


SURROGATE = "text holds an unpaired surrogate (U+{:04X}) at index {}; give valid Unicode"


def test_one_string_where_several_are_wanted_and_a_text_that_is_no_string_are_type_errors(joint: Tokenizer) -> None:
    """encode_sources("a cat") encoded each character as a sentence of its own, Tokenizer.train("...", "...")
    trained on single characters, and encode_source(None) was an AttributeError from inside normalize."""
    with pytest.raises(TypeError, match=r"^texts must be an iterable of strings, not one str: wrap it in a list"):
        joint.encode_sources("a cat")
    with pytest.raises(TypeError, match=r"^texts must be an iterable of strings, not one str"):
        joint.encode_targets("a cat")
    with pytest.raises(TypeError, match=r"^sources must be an iterable of strings, not one str"):
        Tokenizer.train("a cat sat", ["a cat sat"], vocab_size=30)
    with pytest.raises(TypeError, match=r"^targets must be an iterable of strings, not one str"):
        Tokenizer.train(["a cat sat"], "a cat sat", vocab_size=30)
    with pytest.raises(TypeError, match=r"^text must be a str, got NoneType"):
        joint.encode_source(None)
    with pytest.raises(TypeError, match=r"^texts\[1\]: text must be a str, got bytes"):
        joint.encode_sources(["a cat", b"a dog"])


def test_a_lone_surrogate_is_a_value_error_naming_where_it_is(joint: Tokenizer) -> None:
    """Text decoded with errors="surrogateescape" (or a "\\ud800" escape in JSON) holds lone surrogates, which
    sentencepiece refused with a bare RuntimeError: "Unable to cast Python instance of type <class 'str'> to
    C++ type '?'" (and the batch methods with "TypeError: List elements must be str or bytes")."""
    marian = VocabTokenizer.from_tokenizer(joint)
    for encode in (
        joint.encode_source,
        joint.encode_target,
        joint.source_pieces,
        joint.target_pieces,
        marian.encode_source,
        marian.encode_target,
    ):
        with pytest.raises(TokenizerError, match=f"^{re.escape(SURROGATE.format(0xD800, 4))}"):
            encode("Zwei\ud800 Männer")
        with pytest.raises(TokenizerError, match=re.escape(SURROGATE.format(0xDCC3, 3))):
            encode("Ein" + b"\xc3 M".decode("utf-8", "surrogateescape"))
    for encode_all in (joint.encode_sources, joint.encode_targets):
        with pytest.raises(TokenizerError, match=f"^texts\\[1\\]: {re.escape(SURROGATE.format(0xDFFF, 0))}"):
            encode_all(["Zwei Männer", "\udfff"])
    with pytest.raises(ValueError, match=re.escape(SURROGATE.format(0xD83D, 2))):
        normalize("ab\ud83d")
    assert joint.encode_source("Zwei Männer 😀") == joint.encode_source("Zwei Männer \U0001f600")  # a pair is fine


def test_normalize_keeps_a_byte_order_mark() -> None:
    """U+FEFF is no whitespace and NFKC keeps it, so tokenizers trained on text that held it have a piece for
    it: dropping it here would change how they split text. The corpus reader warns of it instead."""
    assert normalize("\ufeffka lo \ufeffmi") == "\ufeffka lo \ufeffmi"


def test_unseen_characters_become_unk(joint: Tokenizer) -> None:
    assert joint.unk_id in joint.encode_source("€")


def test_the_spellings_of_the_special_pieces_are_deleted_from_the_training_text() -> None:
    """Sentencepiece's trainer replaces every "<pad>", "<s>", "</s>" and "<unk>" in its training text (and
    "<0x00>" to "<0xFF>" with byte fallback) by a word boundary, as its own `spm_train` does: a character
    that occurs only inside them is no piece, so it becomes <unk> although it is in the training data."""
    text = ["the cat sat on the mat </s> <unk>", "the <s> dog"]
    tokenizer = Tokenizer.train(text, text, vocab_size=60)
    assert [tokenizer.id_to_source_piece([i]) for i in tokenizer.encode_source("<")] == [["▁"], ["<unk>"]]
    assert tokenizer.decode_source(tokenizer.encode_source("the </s>")) == "the  ⁇ s ⁇"
    once_more = Tokenizer.train([*text, "a <b>/c"], text, vocab_size=60)  # the same characters elsewhere
    assert once_more.decode_source(once_more.encode_source("the </s>")) == "the </s>"


HARD_TEXTS = [
    "😀 ok 👍🏽 👨\u200d👩\u200d👧",  # emoji, a skin tone, zero-width joiners
    "日本語のテキスト東京",  # no spaces
    "مرحبا بالعالم שלום עולם",  # right to left
    "cafe\u0301 café",  # NFD and NFC
    "ＡＢＣ１２３，？ ﬁ x²",  # NFKC folds these
    "a\t\tb   c\n d\u2028e\x85f",  # whitespace that NFKC keeps
    "ctrl\x01\x7f \ufeffbom x\u200by",
    "Donaudampfschifffahrtsgesellschaftskapitän 0123456789 3.14",
]


def test_an_exported_marian_tokenizer_gives_tformers_ids_for_normalized_text(tmp_path: Path) -> None:
    """docs/interop.md: MarianTokenizer gives tformer's ids for text passed through `normalize`, not for
    NFKC text alone: sentencepiece collapses runs of spaces but keeps a tab or a newline (a byte piece here,
    <unk> without byte fallback), where `normalize` makes it a space. It decodes <unk> as nothing."""
    transformers = pytest.importorskip("transformers")
    sources = [*SOURCES, "ein Wort", "Ａ"]  # no character of HARD_TEXTS is needed: byte fallback spells them
    tokenizer = Tokenizer.train(sources, TARGETS, vocab_size=400, byte_fallback=True, joint=False)
    VocabTokenizer.from_tokenizer(tokenizer).write_marian_files(tmp_path / "hf")
    marian = transformers.MarianTokenizer.from_pretrained(tmp_path / "hf")
    for text in HARD_TEXTS:
        source, target = tokenizer.encode_source(text), tokenizer.encode_target(text)
        assert marian(normalize(text), add_special_tokens=False).input_ids == source
        assert marian(text_target=normalize(text), add_special_tokens=False).input_ids == target
        assert marian.decode(target, skip_special_tokens=True) == tokenizer.decode_target(target) == normalize(text)
    nfkc = "a\tb"
    assert unicodedata.normalize("NFKC", nfkc) == nfkc
    assert marian(nfkc, add_special_tokens=False).input_ids != tokenizer.encode_source(nfkc)
    without_bytes = Tokenizer.train(sources, TARGETS, vocab_size=200)
    VocabTokenizer.from_tokenizer(without_bytes).write_marian_files(tmp_path / "unk")
    ids = without_bytes.encode_target("Zwei € Männer")
    assert without_bytes.decode_target(ids) == "Zwei  ⁇  Männer"
    assert transformers.MarianTokenizer.from_pretrained(tmp_path / "unk").decode(ids, skip_special_tokens=True) == (
        "Zwei  Männer"  # the spaces around the <unk> kept
    )


def test_training_is_deterministic_and_files_round_trip(tmp_path: Path, joint: Tokenizer) -> None:
    again = Tokenizer.train([*SOURCES * 3, " ".join(ALPHABET)], TARGETS * 3, vocab_size=120)
    first = [p.read_bytes() for p in joint.to_files(tmp_path / "a")]
    second = [p.read_bytes() for p in again.to_files(tmp_path / "b")]
    assert first == second
    loaded = Tokenizer.from_files(tmp_path / "a")
    assert loaded.joint and loaded.encode_source(SOURCES[0]) == joint.encode_source(SOURCES[0])
    assert again.fingerprint() == joint.fingerprint() == loaded.fingerprint()
    smaller = Tokenizer.train([*SOURCES * 3, " ".join(ALPHABET)], TARGETS * 3, vocab_size=110)
    assert smaller.fingerprint() != joint.fingerprint()


def test_separate_vocabularies_fingerprint_both_models() -> None:
    """Separate tokenizers of the same sources and other targets split targets otherwise: their fingerprints
    (what an encoded cache is keyed by) differ, not only where the source model does."""
    one = Tokenizer.train(SOURCES, TARGETS, vocab_size=80, joint=False, model_type="unigram")
    other = Tokenizer.train(
        SOURCES, [*TARGETS, "Noch ein ganz anderer Satz."], vocab_size=80, joint=False, model_type="unigram"
    )
    assert one.encode_source(SOURCES[0]) == other.encode_source(SOURCES[0])
    assert one.fingerprint() != other.fingerprint()


def test_separate_vocabularies_serialise_as_two_files(tmp_path: Path) -> None:
    tokenizer = Tokenizer.train(SOURCES, TARGETS, vocab_size=80, joint=False, model_type="unigram")
    paths = tokenizer.to_files(tmp_path)
    assert [p.name for p in paths] == ["spm.src.model", "spm.tgt.model"]
    loaded = Tokenizer.from_files(tmp_path)
    assert not loaded.joint
    assert loaded.src_vocab_size == tokenizer.src_vocab_size
    assert loaded.tgt_vocab_size == tokenizer.tgt_vocab_size
    assert loaded.encode_target(TARGETS[2]) == tokenizer.encode_target(TARGETS[2])
    assert loaded.decode_target(loaded.encode_target(TARGETS[2])) == TARGETS[2]


def test_tiny_corpus_gets_a_smaller_vocabulary_than_asked() -> None:
    tokenizer = Tokenizer.train(["ab ba"], ["abc"], vocab_size=1000)
    assert tokenizer.src_vocab_size < 1000
    assert tokenizer.decode_target(tokenizer.encode_target("ab cab")) == "ab cab"


def test_training_errors_are_one_line() -> None:
    with pytest.raises(TokenizerError, match="vocab_size=6") as info:
        Tokenizer.train(["abcdefghij"], ["klmnop"], vocab_size=6)
    assert "\n" not in str(info.value)
    with pytest.raises(TokenizerError, match="no non-empty sentences"):
        Tokenizer.train(["  "], [""], vocab_size=50)
    with pytest.raises(TokenizerError, match="model_type"):
        Tokenizer.train(["a"], ["b"], vocab_size=50, model_type="word")  # type: ignore[arg-type]


def test_bad_files_are_reported(tmp_path: Path, joint: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="no tokenizer in"):
        Tokenizer.from_files(tmp_path)
    (tmp_path / "spm.model").write_bytes(b"this is not a model")
    with pytest.raises(TokenizerError, match="not a valid sentencepiece model"):
        Tokenizer.from_files(tmp_path)
    (tmp_path / "spm.model").write_bytes(b"")  # what a crash or a full disk leaves: sentencepiece reads "no model"
    with pytest.raises(TokenizerError, match="is empty: not a valid sentencepiece model"):
        Tokenizer.from_files(tmp_path)
    marian = tmp_path / "marian"
    VocabTokenizer.from_tokenizer(joint).to_files(marian)
    (marian / "source.spm").write_bytes(b"")
    with pytest.raises(TokenizerError, match=r"source\.spm is empty: not a valid sentencepiece model"):
        VocabTokenizer.from_files(marian)
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        joint.decode_target([joint.tgt_vocab_size])


def test_a_model_file_that_is_a_device_or_too_large_is_refused_unread(
    tmp_path: Path, joint: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A received run's spm.model linked to /dev/zero was read until the memory ran out (translate, info,
    evaluate); a huge file was read whole. A device or pipe is refused unread, a file read no further than a
    model can reach."""
    (tmp_path / "spm.model").symlink_to("/dev/zero")
    with pytest.raises(TokenizerError, match=r"^tokenizer model .*spm\.model is not a regular file$"):
        Tokenizer.from_files(tmp_path)
    (tmp_path / "spm.model").unlink()
    joint.to_files(tmp_path)
    size = (tmp_path / "spm.model").stat().st_size
    monkeypatch.setattr(tokenizer_module, "SENTENCEPIECE_MAX_BYTES", size - 1)
    with pytest.raises(TokenizerError, match=r"spm\.model: over .* MiB, not a sentencepiece model"):
        Tokenizer.from_files(tmp_path)
    monkeypatch.setattr(tokenizer_module, "SENTENCEPIECE_MAX_BYTES", size)
    assert Tokenizer.from_files(tmp_path).encode_source("a") == joint.encode_source("a")


def test_a_model_trained_with_sentencepieces_default_ids_is_refused_in_one_line(tmp_path: Path) -> None:
    """Sentencepiece's own defaults give no pad piece (pad_id=-1): `--tokenizer DIR` with such a model
    failed as 'pad_id -1 is outside the vocabulary', naming neither the file nor the way out."""
    import io

    import sentencepiece as spm

    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SOURCES * 3), model_writer=writer, vocab_size=100, minloglevel=2
    )  # unk=0, bos=1, eos=2, pad=-1
    (tmp_path / "spm.model").write_bytes(writer.getvalue())
    with pytest.raises(TokenizerError) as error:
        Tokenizer.from_files(tmp_path)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'spm.model'} has no pad piece (pad_id=-1)") and "\n" not in message
    assert "--pad_id=0 --bos_id=1 --eos_id=2 --unk_id=3" in message


def test_a_model_without_a_bos_piece_is_refused_naming_import_hf_for_marian_models(tmp_path: Path) -> None:
    """OPUS-MT's source.spm/target.spm have no bos piece (and no pad): a user giving one as the tokenizer was
    told only to retrain it, though `import-hf` brings the whole Marian model in."""
    import io

    import sentencepiece as spm

    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SOURCES * 3), model_writer=writer, vocab_size=100, minloglevel=2, bos_id=-1, eos_id=0,
        unk_id=1, pad_id=-1,
    )  # fmt: skip
    (tmp_path / "spm.model").write_bytes(writer.getvalue())
    with pytest.raises(TokenizerError) as error:
        Tokenizer.from_files(tmp_path)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'spm.model'} has no pad/bos piece (pad_id=-1, bos_id=-1)"), message
    assert message.endswith("a Marian (OPUS-MT) model's file has no bos: `tformer import-hf` imports that model whole")
    assert "\n" not in message


def test_separate_models_with_other_special_ids_are_refused_saying_which(tmp_path: Path) -> None:
    """A source and a target model trained elsewhere with different ids were refused as '(3, 1, 2, 0) vs
    (0, 1, 2, 3)', naming neither the ids nor the way out."""
    for name, pad_id, unk_id in (("spm.src.model", 3, 0), ("spm.tgt.model", 0, 3)):
        writer = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(SOURCES * 3), model_writer=writer, vocab_size=100, pad_id=pad_id, unk_id=unk_id,
            hard_vocab_limit=False, minloglevel=2,
        )  # fmt: skip
        (tmp_path / name).write_bytes(writer.getvalue())
    with pytest.raises(TokenizerError) as error:
        Tokenizer.from_files(tmp_path)
    assert str(error.value) == (
        "the source and target models disagree on special ids: the source has pad_id=3, bos_id=1, eos_id=2, "
        "unk_id=0, the target pad_id=0, bos_id=1, eos_id=2, unk_id=3; retrain one of them with the other's ids "
        "(sentencepiece's --pad_id, --bos_id, --eos_id and --unk_id)"
    )


def test_special_ids_of_a_model_trained_elsewhere_are_shown(tmp_path: Path, joint: Tokenizer) -> None:
    """The run's `tokenizer:` line showed only the sizes, so a model with pad at 3 and unk at 0 read like
    one of tformer's own (pad 0, unk 3)."""
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SOURCES * 3), model_writer=writer, vocab_size=100, pad_id=3, unk_id=0,
        hard_vocab_limit=False, minloglevel=2,
    )  # fmt: skip
    elsewhere = Tokenizer(spm.SentencePieceProcessor(model_proto=writer.getvalue()))
    size = elsewhere.src_vocab_size
    assert repr(elsewhere) == f"Tokenizer(joint, src_vocab_size={size}, tgt_vocab_size={size}, pad_id=3, unk_id=0)"
    assert "_id=" not in repr(joint)


def test_a_tokenizer_sample_is_aligned_ordered_and_fixed_by_the_seed() -> None:
    sources = [f"s{i}" for i in range(100)]
    targets = [f"t{i}" for i in range(100)]
    assert sample_pairs(sources, targets, max_pairs=0, seed=1) == (sources, targets)
    assert sample_pairs(sources, targets, max_pairs=100, seed=1) == (sources, targets)
    src, tgt = sample_pairs(sources, targets, max_pairs=10, seed=1)
    assert len(src) == 10 and [s[1:] for s in src] == [t[1:] for t in tgt]  # still aligned
    assert sorted(src, key=lambda s: int(s[1:])) == src  # in corpus order
    assert sample_pairs(sources, targets, max_pairs=10, seed=1) == (src, tgt)
    assert sample_pairs(sources, targets, max_pairs=10, seed=2)[0] != src


def test_a_run_trains_its_tokenizer_on_at_most_tokenizer_max_pairs(tmp_path: Path, capsys) -> None:
    corpus = write_corpus(tmp_path, n_train=200)
    start_run(tiny_experiment(corpus, "data.tokenizer_max_pairs=20", "train.max_steps=1"), tmp_path / "run")
    assert "tokenizer: training on 20 of 200 pairs (data.tokenizer_max_pairs)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"data\.tokenizer_max_pairs must be 0"):
        DataConfig(tokenizer_max_pairs=-1)


def _zipf_characters(n_sentences: int, alphabet: int, seed: int = 0) -> list[str]:
    """Sentences of CJK characters drawn with Zipfian frequencies, as in Chinese text: a few hundred
    common characters and a long tail of rare ones."""
    rng = random.Random(seed)
    characters = [chr(0x4E00 + i) for i in range(alphabet)]
    weights = [1.0 / (rank + 1) ** 1.6 for rank in range(alphabet)]
    return ["".join(rng.choices(characters, weights=weights, k=30)) for _ in range(n_sentences)]


def test_character_coverage_leaves_the_rarest_characters_out() -> None:
    sentences = _zipf_characters(3000, alphabet=3000)
    counts: dict[str, int] = {}
    for sentence in sentences:
        for character in sentence:
            counts[character] = counts.get(character, 0) + 1
    once = next(character for character, count in counts.items() if count == 1)
    # every character a piece: more distinct characters than the vocabulary holds, refused in one line
    # that names the setting to change
    with pytest.raises(TokenizerError, match=r"character_coverage=1\.0 .* lower character_coverage") as info:
        Tokenizer.train(sentences, sentences, vocab_size=1000)
    assert "\n" not in str(info.value)
    with pytest.raises(
        TokenizerError, match=r"need \d+ pieces.*at least that, or lower character_coverage further \(down to 0\.98\)"
    ):
        Tokenizer.train(sentences, sentences, vocab_size=300, character_coverage=0.9995)
    # at sentencepiece's lowest coverage there is nothing further to lower: vocab_size alone is advised
    uniform = ["".join(chr(0x4E00 + (7 * i + 13 * j) % 600) for j in range(30)) for i in range(200)]
    with pytest.raises(TokenizerError, match=r"need \d+ pieces") as info:
        Tokenizer.train(uniform, uniform, vocab_size=300, character_coverage=0.98)
    assert "lower character_coverage" not in str(info.value)
    assert str(info.value).endswith("at least that (character_coverage is already at its lowest, 0.98)")
    # 98%: the rarest characters are left out and become <unk>, the common ones still round-trip
    tokenizer = Tokenizer.train(sentences, sentences, vocab_size=1000, character_coverage=0.98)
    assert tokenizer.src_vocab_size <= 1000
    assert tokenizer.encode_source(once)[-1] == tokenizer.unk_id
    common = max(counts, key=counts.__getitem__)
    assert tokenizer.decode_source(tokenizer.encode_source(common * 3)) == common * 3
    with pytest.raises(TokenizerError, match=r"character_coverage must be between 0\.98 and 1\.0"):
        Tokenizer.train(sentences, sentences, vocab_size=1000, character_coverage=0.9)


def test_a_run_trains_its_tokenizer_with_data_character_coverage(tmp_path: Path) -> None:
    sources = _zipf_characters(400, alphabet=600)
    targets = _zipf_characters(400, alphabet=600, seed=1)
    corpus = {"train_src": tmp_path / "train.zh", "train_tgt": tmp_path / "train.ja"}
    corpus["train_src"].write_text("\n".join(sources) + "\n", encoding="utf-8")
    corpus["train_tgt"].write_text("\n".join(targets) + "\n", encoding="utf-8")
    settings = ("data.vocab_size=300", "train.max_steps=1", "train.max_tokens=1024")
    with pytest.raises(TokenizerError, match="lower character_coverage"):
        start_run(tiny_experiment(corpus, *settings, valid=False), tmp_path / "full")
    trainer = start_run(
        tiny_experiment(corpus, *settings, "data.character_coverage=0.98", valid=False), tmp_path / "run"
    )
    assert trainer.tokenizer.src_vocab_size <= 300
    with pytest.raises(ConfigError, match=r"data\.character_coverage must be between 0\.98 and 1\.0"):
        DataConfig(character_coverage=1.5)


def _mixed_line(rng: random.Random, words: int) -> str:
    """A line of words and whitespace of every kind: ASCII and unseen letters (byte pieces or <unk>),
    compatibility forms that NFKC spells with a space (U+00A8), the whitespace marker, combining marks
    after a space, and long runs without any space."""
    chunks = ["Two young", "Männer", "\u4e00\u4e8c", "\U0001f600", "\u00a8x", "a\u2581b", "\u0301", "ﬁ", "Ｗ"]
    spaces = [" ", "  ", "\t", "\u00a0", "\u3000", "\u2003", "\x1c"]
    parts = []
    for _ in range(words):
        kind = rng.random()
        if kind < 0.05:  # a run without spaces, longer than a first prefix
            parts.append("".join(rng.choices(ALPHABET + "\u4e00", k=rng.randint(50, 400))))
        else:
            parts.append(rng.choice(chunks) if kind < 0.3 else "".join(rng.choices(ALPHABET, k=rng.randint(1, 9))))
        parts.append(rng.choice(spaces))
    return "".join(parts)


@pytest.mark.parametrize("byte_fallback", [False, True])
@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_the_head_of_a_line_is_exactly_the_first_pieces_of_the_whole(model_type: str, byte_fallback: bool) -> None:
    """encode_source_head (translate --truncate) encodes a prefix cut before a space, not a line of
    megabytes whole: its pieces are the first ones of the whole line's, at least as many as asked."""
    vocab_size = 420 if byte_fallback else 160
    tokenizer = Tokenizer.train(
        SOURCES * 3, TARGETS * 3, vocab_size=vocab_size, model_type=model_type, byte_fallback=byte_fallback
    )
    rng = random.Random(0)
    headed = 0
    for trial in range(60):
        line = _mixed_line(rng, words=rng.randint(1, 300))
        if trial % 10 == 0:
            line = line.replace(" ", "")  # fewer spaces, or none
        full = tokenizer.encode_source(line)
        for pieces in (1, 7, 63, 255):
            head = tokenizer.encode_source_head(line, pieces)
            assert head == full[: len(head)]
            assert len(head) >= pieces or head == full
            headed += len(head) < len(full)
    assert headed > 100  # most lines were cut, not encoded whole


def test_a_vocabulary_with_pieces_across_spaces_encodes_the_head_from_the_whole_line() -> None:
    """A model trained with split_by_whitespace=false (by hand: tformer never does) has pieces spanning a
    space, so a prefix cut at a space could be split differently: the whole line is encoded then."""
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([normalize(s) for s in SOURCES * 20]),
        model_writer=writer,
        vocab_size=150,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        split_by_whitespace=False,
        hard_vocab_limit=False,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    model = spm.SentencePieceProcessor(model_proto=writer.getvalue())
    assert any("\u2581" in model.id_to_piece(i)[1:] for i in range(model.get_piece_size()))
    tokenizer = Tokenizer(model)
    line = " ".join(SOURCES * 30)
    seen: list[int] = []
    tokenizer._src = _Recording(model, seen)
    assert tokenizer.encode_source_head(line, 5) == model.encode(normalize(line))
    assert seen == [len(normalize(line))]


class _Recording:
    """A sentencepiece model that records how many characters each encode is given."""

    def __init__(self, model: spm.SentencePieceProcessor, seen: list[int]) -> None:
        self._model, self._seen = model, seen

    def encode(self, text, *args, **kwargs):
        self._seen.append(len(text))
        return self._model.encode(text, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._model, name)
