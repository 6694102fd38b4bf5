"""Byte fallback (`data.byte_fallback`): characters that are not pieces are spelled as UTF-8 byte pieces
instead of <unk>, so any text round-trips; without it they decode as " ⁇ "."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from training_helpers import tiny_experiment, write_corpus

from tformer.cli.main import main
from tformer.config import ConfigError, DataConfig, load_experiment
from tformer.config.pieces import BYTE_PIECES, SPECIAL_PIECES, smallest_vocab_size
from tformer.data.tokenizer import Tokenizer, TokenizerError, normalize
from tformer.training import checkpoint as ckpt
from tformer.training import checkpoint_load, start_run

SOURCES = ["Two young, White males are outside near many bushes.", "A little girl climbing into a playhouse!"]
TARGETS = ["Zwei junge weiße Männer sind im Freien.", "Ein kleines Mädchen klettert in ein Spielhaus."]
UNSEEN = "Zwei 😀 und 猫, naïve Ωmega"  # an emoji, a CJK character, and letters the corpus lacks


@pytest.fixture(scope="module")
def with_bytes() -> Tokenizer:
    return Tokenizer.train(SOURCES * 3, TARGETS * 3, vocab_size=400, byte_fallback=True)


def test_unseen_characters_become_byte_pieces_and_decode_back_exactly(with_bytes: Tokenizer) -> None:
    assert with_bytes.byte_fallback and "byte_fallback=True" in repr(with_bytes)
    assert with_bytes.id_to_source_piece([3, 4, 259]) == ["<unk>", "<0x00>", "<0xFF>"]  # bytes follow the specials
    pieces = with_bytes.target_pieces("猫")
    assert pieces[-3:] == ["<0xE7>", "<0x8C>", "<0xAB>"]  # 猫 is E7 8C AB in UTF-8
    ids = with_bytes.encode_target(UNSEEN)
    assert with_bytes.unk_id not in ids
    assert with_bytes.decode_target(ids) == UNSEEN
    assert with_bytes.decode_source(with_bytes.encode_source(UNSEEN)) == UNSEEN
    # bytes that make no character (a model may generate them) decode as U+FFFD, one a byte, never fail
    assert with_bytes.decode_target(with_bytes.encode_target("猫")[-3:-1]) == "\ufffd\ufffd"


def test_without_byte_fallback_the_same_text_decodes_with_unknown_marks() -> None:
    plain = Tokenizer.train(SOURCES * 3, TARGETS * 3, vocab_size=400)
    assert not plain.byte_fallback and "byte_fallback" not in repr(plain)
    ids = plain.encode_target(UNSEEN)
    assert plain.unk_id in ids
    assert plain.decode_target(ids) == "Zwei  ⁇  und  ⁇ , na ⁇ e  ⁇ mega"  # ïv: two unseen letters, one <unk>


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=40))
def test_any_text_round_trips_with_byte_fallback(with_bytes: Tokenizer, text: str) -> None:
    assert with_bytes.decode_target(with_bytes.encode_target(text)) == normalize(text)


def test_byte_fallback_survives_saving_and_separate_vocabularies(with_bytes: Tokenizer, tmp_path: Path) -> None:
    with_bytes.to_files(tmp_path / "joint")
    assert Tokenizer.from_files(tmp_path / "joint").byte_fallback
    separate = Tokenizer.train(SOURCES * 3, TARGETS * 3, vocab_size=400, joint=False, byte_fallback=True)
    separate.to_files(tmp_path / "separate")
    loaded = Tokenizer.from_files(tmp_path / "separate")
    assert loaded.byte_fallback and loaded.decode_target(loaded.encode_target(UNSEEN)) == UNSEEN


def test_with_bpe_256_more_pieces_give_the_same_subwords_as_without_byte_fallback() -> None:
    """What docs/training.md promises about the vocabulary cost: the byte pieces take 256 places and
    leave the rest of a BPE vocabulary as it was."""
    plain = Tokenizer.train(SOURCES * 3, TARGETS * 3, vocab_size=90)
    with_bytes = Tokenizer.train(SOURCES * 3, TARGETS * 3, vocab_size=90 + 256, byte_fallback=True)
    pieces = with_bytes.id_to_source_piece(range(with_bytes.src_vocab_size))
    assert pieces[:4] + pieces[260:] == plain.id_to_source_piece(range(plain.src_vocab_size))


def _zipf_characters(n_sentences: int, alphabet: int) -> list[str]:
    """CJK sentences with Zipfian character frequencies: a few common characters, a long rare tail."""
    rng = random.Random(0)
    characters = [chr(0x4E00 + i) for i in range(alphabet)]
    weights = [1.0 / (rank + 1) ** 1.6 for rank in range(alphabet)]
    return ["".join(rng.choices(characters, weights=weights, k=30)) for _ in range(n_sentences)]


def test_with_coverage_below_one_the_rare_characters_are_bytes_in_the_training_text() -> None:
    """Byte pieces only occur in the training text for characters left out of the vocabulary: with
    character_coverage = 1.0 there are none, so a model never learns them."""
    sentences = _zipf_characters(1000, alphabet=1000)
    below = Tokenizer.train(sentences, sentences, vocab_size=700, character_coverage=0.98, byte_fallback=True)
    byte_pieces = sum(4 <= i < 260 for ids in below.encode_sources(sentences) for i in ids)
    assert 0.01 < byte_pieces / 3 / sum(map(len, sentences)) < 0.03  # ~2% of the characters, 3 bytes each
    assert all(below.decode_source(below.encode_source(s)) == s for s in sentences)
    full = Tokenizer.train(sentences, sentences, vocab_size=1500, byte_fallback=True)
    assert not any(4 <= i < 260 for ids in full.encode_sources(sentences) for i in ids)


def test_a_vocabulary_too_small_for_the_byte_pieces_is_refused_in_one_line() -> None:
    with pytest.raises(TokenizerError, match=r"at least 261 \(4 special ids \+ 256 byte pieces \+ 1 piece\), got 200"):
        Tokenizer.train(SOURCES, TARGETS, vocab_size=200, byte_fallback=True)
    sentences = _zipf_characters(300, alphabet=300)
    with pytest.raises(TokenizerError) as info:
        Tokenizer.train(sentences, sentences, vocab_size=400, byte_fallback=True)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    assert "the 4 special ones and the 256 byte pieces included; raise vocab_size to at least that" in message
    assert "leave the rarest characters out as byte pieces" in message


def test_the_config_key_defaults_to_false_and_is_validated() -> None:
    assert DataConfig().byte_fallback is False
    assert load_experiment(None, ["data.byte_fallback=true"]).data.byte_fallback is True
    with pytest.raises(ConfigError, match="byte_fallback in \\[data\\] must be true or false"):
        load_experiment(None, ["data.byte_fallback=1"])
    with pytest.raises(ConfigError, match=r"data\.vocab_size must be at least 261 with data\.byte_fallback = true"):
        DataConfig(byte_fallback=True, vocab_size=260)


def test_the_config_names_the_smallest_byte_fallback_vocabulary_from_its_parts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The config refuses what the tokenizer would refuse (the same bound, 4 special + 256 byte pieces +
    1 learned piece), reports that bound even below the plain minimum of 8, and says what to change."""
    assert smallest_vocab_size(byte_fallback=True) == 261 == SPECIAL_PIECES + BYTE_PIECES + 1
    DataConfig(byte_fallback=True, vocab_size=261)
    for too_small in (260, 5):
        with pytest.raises(ConfigError) as info:
            DataConfig(byte_fallback=True, vocab_size=too_small)
        assert str(info.value) == (
            "data.vocab_size must be at least 261 with data.byte_fallback = true (4 special + 256 byte pieces + "
            f"1 learned piece), got {too_small}: add 256 to the vocab_size you would use without byte fallback, "
            "or set data.byte_fallback = false"
        )
    with pytest.raises(TokenizerError, match=r"at least 261 \("):
        Tokenizer.train(SOURCES, TARGETS, vocab_size=260, byte_fallback=True)
    code = main(["train", "--out", str(tmp_path / "run"), "--vocab-size", "5", "--set", "data.byte_fallback=true"])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and error.startswith("error: --vocab-size must be at least 261 ")
    assert not (tmp_path / "run").exists()


def test_a_given_tokenizer_without_byte_pieces_is_refused(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path, n_train=40, n_valid=4)
    Tokenizer.train(SOURCES, TARGETS, vocab_size=100).to_files(tmp_path / "spm")
    settings = (f"data.tokenizer='{tmp_path / 'spm'}'", "data.byte_fallback=true", "data.vocab_size=300")
    with pytest.raises(ConfigError, match=r"data\.byte_fallback = true, but the tokenizer in .* has no byte pieces"):
        start_run(tiny_experiment(corpus, *settings, valid=False), tmp_path / "run")


def test_a_run_trained_with_byte_fallback_saves_reloads_and_resumes(tmp_path: Path, one_thread: None) -> None:
    corpus = write_corpus(tmp_path, n_train=60, n_valid=4)
    run = tmp_path / "run"
    train = [
        "train", "--out", str(run), "--train-src", str(corpus["train_src"]), "--train-tgt", str(corpus["train_tgt"]),
        "--preset", "tiny", "--vocab-size", "300", "--max-tokens", "256", "--max-steps", "2", "--device", "cpu",
        "--set", "data.byte_fallback=true", "--set", "train.warmup_steps=2", "--quiet",
    ]  # fmt: skip
    assert main(train) == 0
    loaded = checkpoint_load.load_run(run)
    assert loaded.experiment.data.byte_fallback and loaded.tokenizer.byte_fallback
    assert loaded.tokenizer.decode_target(loaded.tokenizer.encode_target("ka 😀 lo")) == "ka 😀 lo"
    (tmp_path / "in.txt").write_text("ka 😀 lo\n", encoding="utf-8")
    translate = ["translate", str(run), "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "out.txt")]
    assert main(translate) == 0
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "3", "--quiet"]) == 0
    assert checkpoint_load.load_run(run, which="last").experiment.data.byte_fallback
    # a run saved before the key existed reads as byte_fallback = false
    for description in run.glob(f"checkpoints/*/{ckpt.EXPERIMENT_FILE}"):
        document = json.loads(description.read_text(encoding="utf-8"))
        del document["experiment"]["data"]["byte_fallback"]
        description.write_text(json.dumps(document), encoding="utf-8")
    assert checkpoint_load.load_run(run).experiment.data.byte_fallback is False
