"""Text written without spaces between words (Chinese, Japanese, Thai): whitespace-based word counts
(BLEU's `13a`, `align`'s words) read a whole sentence of it as one word."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

UNSPACED_SCRIPTS = ("CJK UNIFIED IDEOGRAPH", "HIRAGANA", "KATAKANA", "THAI")  # written without spaces
UNSPACED_SHARE = 0.5  # of the letters, above which text counts as mostly written without spaces


def unspaced_letters(texts: Iterable[str]) -> tuple[int, int]:
    """(letters of those scripts, all letters) in `texts`."""
    letters = [c for text in texts for c in text if unicodedata.category(c)[0] == "L"]
    return sum(unicodedata.name(c, "").startswith(UNSPACED_SCRIPTS) for c in letters), len(letters)


def mostly_unspaced(texts: Iterable[str]) -> bool:
    """More than UNSPACED_SHARE of the letters of `texts` are of a script written without spaces."""
    return counts_mostly_unspaced(*unspaced_letters(texts))


def counts_mostly_unspaced(unspaced: int, letters: int) -> bool:
    """`mostly_unspaced` from the counts `unspaced_letters` gives, for a caller that needs them too."""
    return letters > 0 and unspaced > UNSPACED_SHARE * letters
