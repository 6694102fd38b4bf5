"""A line that surely takes more pieces than the model accepts is refused before it is encoded (encoding a
line of megabytes took gigabytes), and the floor never refuses a line that fits."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from test_decoding_equivalence import peaked_model

from tformer.align import AlignmentError, check_lengths
from tformer.config import DecodeConfig
from tformer.data.piece_floor import WINDOW, PieceFloor, piece_floor, surely_longer, surely_too_long
from tformer.data.tokenizer import Tokenizer
from tformer.decoding.pipeline import Translator
from tformer.decoding.search_types import DecodingError
from tformer.serving.errors import ApiError
from tformer.serving.limits import source_lengths

WORDS = ["one", "two", "three", "hundred", "thousand", "seven", "twelve", "forty"]


def tokenizer(*, byte_fallback: bool) -> Tokenizer:
    rng = random.Random(0)
    lines = [" ".join(rng.choices(WORDS, k=6)) for _ in range(300)]
    return Tokenizer.train(lines, lines, vocab_size=300 if byte_fallback else 40, byte_fallback=byte_fallback)


@pytest.fixture(scope="module", params=[False, True], ids=["unk", "byte_fallback"])
def trained(request: pytest.FixtureRequest) -> Tokenizer:
    return tokenizer(byte_fallback=request.param)


class Unencodable:
    """A tokenizer's floor, and an encoding that fails the test for a long line."""

    def __init__(self, trained: Tokenizer) -> None:
        self.source_floor = self.target_floor = trained.source_floor
        self.pad_id, self.bos_id, self.eos_id = trained.pad_id, trained.bos_id, trained.eos_id

    def encode_source(self, text: str) -> list[int]:
        if len(text) > 100:
            raise AssertionError(f"a line of {len(text)} characters was encoded")
        return [4] * len(text.split())

    encode_target = encode_source

    def encode_sources(self, texts: list[str]) -> list[list[int]]:
        return [self.encode_source(text) for text in texts]

    encode_targets = encode_sources


def test_translate_refuses_a_huge_line_without_encoding_it(trained: Tokenizer) -> None:
    model = peaked_model()
    limit = model.config.max_positions
    translator = Translator(model, Unencodable(trained), DecodeConfig())
    line = "one hundred twelve " * 100_000
    expected = f"input line 1 has more than {limit} tokens ({len(line):,} characters); the model accepts at most "
    expected += f"{limit}: shorten it, or translate its first {limit - 1} pieces and eos with --truncate"
    with pytest.raises(DecodingError, match=rf"^{re.escape(expected)}$"):
        list(translator.translate([line]))


def test_align_and_the_server_refuse_a_huge_line_without_encoding_it(trained: Tokenizer, tmp_path: Path) -> None:
    model = peaked_model()
    limit = model.config.max_positions
    line = "seven" * 100_000
    with pytest.raises(AlignmentError, match=rf"^src line 2 has more than {limit} tokens \(500,000 characters\)"):
        check_lengths(model, Unencodable(trained), (Path("src"), ["", line]), (Path("tgt"), ["", ""]))
    with pytest.raises(AlignmentError, match=rf"^tgt line 1 has more than {limit} tokens"):
        check_lengths(model, Unencodable(trained), (Path("src"), [""]), (Path("tgt"), [line]))
    with pytest.raises(ApiError, match=rf"^sentence 0 has more than {limit} tokens \(500,000 characters\); the model"):
        source_lengths([line], Unencodable(trained), limit)


def test_an_earlier_line_too_long_is_named_first(trained: Tokenizer) -> None:
    """The floor refuses before encoding, but not before the lines ahead of it are measured."""
    model = peaked_model()
    limit = model.config.max_positions
    over = " ".join(["one"] * limit)  # over the limit by its exact length, under the floor's bound
    with pytest.raises(AlignmentError, match=rf"^src line 1 has {limit + 1} tokens"):
        check_lengths(model, trained, (Path("src"), [over, "one" * 100_000]), (Path("tgt"), ["", ""]))


def fitting_lines(length: int) -> list[str]:
    """Long lines that fit a model of few positions: whitespace collapses, unknown characters merge into one
    <unk> without byte fallback, NFKC composes a letter and its accent into one character."""
    return [
        "one" + " \t\u2581\u00a0" * length + "two",
        "\u4e2d" * length,
        " ".join(["\u4e2d\u6587" * length] * 3),
        "e\u0301" * length,
        "\u03c9\u0314\u0342\u0345" * length,
    ]


def test_the_floor_never_refuses_a_line_that_fits(trained: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked with windows of 16 characters, so that short lines are cut into many."""
    monkeypatch.setattr("tformer.data.piece_floor.WINDOW", 16)
    floor = trained.source_floor
    rng = random.Random(1)
    alphabet = [*"onetwhrudsvlfy", " ", "\u4e2d", "e\u0301", "\ufdfa", "\u2581", "\t"]
    texts = fitting_lines(30_000) + ["".join(rng.choices(alphabet, k=rng.randrange(1, 400))) for _ in range(300)]
    for text in texts:
        pieces = len(trained.encode_source(text))
        for allowed in (1, 3, 10, 50, pieces - 1, pieces):
            if allowed >= pieces:
                assert not surely_longer(floor, text, allowed), (text[:40], pieces, allowed)
    assert surely_longer(floor, "one " * 10_000, 1000)


def test_the_floor_is_read_only_for_a_line_longer_than_a_window() -> None:
    """Reading a vocabulary's floor takes tens of ms (32k pieces); translate, align and the server ask
    `surely_too_long` about every line, and ordinary lines never need it."""

    class CountingTokenizer:
        reads = 0

        @property
        def source_floor(self) -> PieceFloor:
            CountingTokenizer.reads += 1
            return PieceFloor(longest=4, dropped=None)

    tokenizer = CountingTokenizer()
    assert not surely_too_long(tokenizer, "source", "x" * WINDOW, 10)
    assert CountingTokenizer.reads == 0
    assert surely_too_long(tokenizer, "source", "x" * (WINDOW + 1), 10)
    assert CountingTokenizer.reads == 1


class FakeVocabulary:
    """The parts of a SentencePieceProcessor that `piece_floor` reads, for a vocabulary of chosen pieces."""

    def __init__(self, pieces: list[tuple[str, str]]) -> None:
        self.pieces = pieces  # (piece, kind): kind "normal", "control", "unknown", "unused" or "byte"

    def get_piece_size(self) -> int:
        return len(self.pieces)

    def id_to_piece(self, index: int) -> str:
        return self.pieces[index][0]

    def is_byte(self, index: int) -> bool:
        return self.pieces[index][1] == "byte"

    def is_control(self, index: int) -> bool:
        return self.pieces[index][1] == "control"

    def is_unknown(self, index: int) -> bool:
        return self.pieces[index][1] == "unknown"

    def is_unused(self, index: int) -> bool:
        return self.pieces[index][1] == "unused"


def test_the_floor_reads_the_longest_text_piece_and_the_characters_spelled_alone() -> None:
    """The whitespace marker is not counted in a piece's length; control, unknown and unused pieces spell
    no text; a whitespace piece is no character of its own (whitespace is never counted)."""
    pieces = [("<unk>", "unknown"), ("<a-long-control>", "control"), ("<an-unused-piece>", "unused")]
    pieces += [("\u2581thousand", "normal"), ("\u2581a", "normal"), ("b", "normal"), ("\u3000", "normal")]
    floor = piece_floor(FakeVocabulary(pieces))
    assert floor == PieceFloor(longest=8, dropped={ord("a"): None, ord("b"): None})
    with_bytes = piece_floor(FakeVocabulary([*pieces, ("<0x41>", "byte")]))
    assert with_bytes == PieceFloor(longest=8, dropped=None)


def test_a_line_of_exactly_longest_times_the_pieces_allowed_may_fit() -> None:
    """Exactly `longest` x `pieces` counted characters fit in `pieces` pieces of `longest`: not refused;
    one more is."""
    floor = PieceFloor(longest=2, dropped=None)
    pieces = WINDOW
    assert not surely_longer(floor, "x" * (2 * pieces) + " " * 10, pieces)
    assert surely_longer(floor, "x" * (2 * pieces + 1) + " " * 10, pieces)


def test_translate_accepts_a_huge_line_of_max_positions_minus_one_pieces() -> None:
    """The floor is asked about the pieces a line may take before its eos (max_positions - 1): a line of
    exactly that many of the longest pieces is encoded and translated, not refused."""
    model = peaked_model()
    limit = model.config.max_positions

    class LongPieces:
        source_floor = target_floor = PieceFloor(longest=2 * WINDOW, dropped=None)
        pad_id, bos_id, eos_id = 0, 1, 2

        def encode_source(self, text: str) -> list[int]:
            return [4] * -(-len(text) // (2 * WINDOW))

        def decode_target(self, ids: list[int]) -> str:
            return " ".join(map(str, ids))

    line = "x" * (2 * WINDOW * (limit - 1))
    (translations,) = Translator(model, LongPieces(), DecodeConfig(beam_size=1, max_len_b=2)).translate([line])
    assert translations[0].tokens
    with pytest.raises(DecodingError, match=f"more than {limit} tokens"):
        list(Translator(model, LongPieces(), DecodeConfig(beam_size=1)).translate([line + "x"]))
