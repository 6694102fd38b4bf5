"""Whether a line surely encodes into more pieces than a model accepts, decided without encoding it.

Sentencepiece holds a whole line in memory several times over while it encodes it (a 20 MB line took
about 1.26 GB), only for the line to be refused afterwards as too long for the model. The floor here
is found in 64 k-character windows, each normalised on its own, and stops as soon as it is over:

- A piece spells at most `longest` characters of the normalised text, not counting the whitespace
  marker; a byte piece (byte fallback) spells at most one, a share of a character.
- Whitespace is not counted (a run of it becomes one marker, or nothing at the ends), nor is a
  character the vocabulary lacks as a piece of its own: without byte fallback sentencepiece spells a run
  of unknown characters as one <unk>, so a line of them, however long, may fit.
- Each window ends at a whitespace character, so normalising the windows one by one (NFKC, which can
  compose a character with the next) gives the same characters as normalising the line whole.

A line whose counted characters are more than `longest` x the pieces allowed cannot fit, whatever
its encoding; one under that bound is encoded and measured exactly as before. The floor is for
tformer's own tokenizers (`Tokenizer`): a tokenizer without `source_floor` / `target_floor` (Marian's
vocabulary tokenizer normalises inside sentencepiece) is always encoded.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Literal

import sentencepiece as spm

WINDOW = 1 << 16  # characters normalised at a time
MARKER = "\u2581"  # sentencepiece's whitespace marker (normalize turns one in the text into a space)
_WHITESPACE = re.compile(r"\s")


@dataclass(frozen=True)
class PieceFloor:
    """What a sentencepiece model's vocabulary says about the fewest pieces a text can take."""

    longest: int  # characters of the longest piece, the whitespace marker not counted (at least 1)
    dropped: dict[int, None] | None  # str.translate table deleting the characters that are pieces of
    # their own (the ones counted); None: every character is spelled (byte fallback), all are counted


def piece_floor(model: spm.SentencePieceProcessor) -> PieceFloor:
    """The floor of `model`'s vocabulary: its longest text piece, and the characters it spells alone."""
    longest, single, byte_fallback = 1, set(), False
    for index in range(model.get_piece_size()):
        if model.is_byte(index):
            byte_fallback = True
        elif not (model.is_control(index) or model.is_unknown(index) or model.is_unused(index)):
            text = model.id_to_piece(index).replace(MARKER, "")
            longest = max(longest, len(text))
            if len(text) == 1 and not text.isspace():
                single.add(text)
    return PieceFloor(longest=longest, dropped=None if byte_fallback else dict.fromkeys(map(ord, single)))


def floor_of(tokenizer: Any, side: Literal["source", "target"]) -> PieceFloor | None:
    """The tokenizer's floor for one side, or None if it has none (then lines are always encoded)."""
    return getattr(tokenizer, f"{side}_floor", None)


def surely_too_long(tokenizer: Any, side: Literal["source", "target"], text: str, pieces: int) -> bool:
    """`surely_longer` with the tokenizer's floor for `side`, looked up only for a text of more than one
    window: the floor reads the whole vocabulary (tens of ms for 32k pieces, once per tokenizer), which
    a run of ordinary lines never needs."""
    return len(text) > WINDOW and surely_longer(floor_of(tokenizer, side), text, pieces)


def surely_longer(floor: PieceFloor | None, text: str, pieces: int) -> bool:
    """True only if `text` encodes into more than `pieces` pieces; False when it may not (or when there
    is no floor): then encode it and measure. A text of at most one window, or of `longest` x `pieces`
    characters, costs nothing (it is cheap to encode, and its exact length makes a better message); a
    longer one at most the windows it takes to get over the bound."""
    if floor is None or len(text) <= max(floor.longest * pieces, WINDOW):
        return False
    counted, start = 0, 0
    while start < len(text):
        end = _window_end(text, start + WINDOW)
        counted += _counted(unicodedata.normalize("NFKC", text[start:end]), floor)
        if counted > floor.longest * pieces:
            return True
        start = end
    return False


def _window_end(text: str, at: int) -> int:
    """The index of the first whitespace character at or after `at` (the end of the text if none)."""
    found = _WHITESPACE.search(text, at) if at < len(text) else None
    return found.start() if found else len(text)


def _counted(window: str, floor: PieceFloor) -> int:
    """The characters of a normalised window that take a piece (or a share of one) of their own."""
    if floor.dropped is None:
        return len(window) - sum(map(window.count, _spaces()))
    return len(window) - len(window.translate(floor.dropped))


@functools.cache
def _spaces() -> tuple[str, ...]:
    """Every whitespace character (what normalize collapses), and the marker, which it turns into one."""
    return (*(chr(code) for code in range(0x110000) if chr(code).isspace()), MARKER)
