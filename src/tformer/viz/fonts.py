"""Fonts for text in any script: tokens of Chinese, Japanese, Thai, Hebrew... on the axes of a picture.

Matplotlib draws text with one font, DejaVu Sans by default, which has no Chinese, Japanese, Korean or
Thai letters: such tokens were drawn as boxes even on a machine with a font that has them, and every
missing character printed a warning of its own. `fonts_for(texts)` gives the default font followed by
installed fonts that have the characters it lacks (matplotlib falls back along that list glyph by
glyph), and the characters that no installed font has; `warn_missing` reports those in one line, and
`no_glyph_warnings` silences matplotlib's warning per character while a figure is written.

Fonts are looked up only for characters the default font lacks, so Latin text costs nothing; each
font file's character map is read once per process. Matplotlib's own "Last Resort" font is never
chosen: its glyphs are placeholder boxes.

Matplotlib without complex text layout (libraqm) draws right-to-left letters left to right, unjoined:
`warn_unshaped` says so in one line, as matplotlib does not.
"""

from __future__ import annotations

import functools
import unicodedata
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import matplotlib
from matplotlib import font_manager, ft2font

PLACEHOLDER_FONTS = ("Last Resort",)  # families whose glyphs are boxes that name the Unicode block
MISSING_GLYPH_WARNING = r"Glyph \d+ .* missing from font"
SHOWN_MISSING = 12  # characters a warning lists
RIGHT_TO_LEFT = ("R", "AL")  # bidirectional classes of Hebrew, Arabic, Syriac, Thaana, N'Ko... letters
LAYS_OUT_TEXT = hasattr(ft2font, "__libraqm_version__")  # complex text layout: bidi and joining (libraqm)


@dataclass(frozen=True)
class TextFonts:
    families: list[str]  # for `fontfamily=`: the default font first, then fallbacks
    missing: str  # characters no installed font has, each once, in order of first use
    unshaped: str = ""  # right-to-left letters this matplotlib draws left to right, unjoined (`warn_unshaped`)


def fonts_for(texts: Iterable[str]) -> TextFonts:
    """The font families that draw `texts`, and the characters none of them can draw."""
    text = "".join(texts)
    default_path = font_manager.findfont(font_manager.FontProperties())
    families = [font_manager.get_font(default_path).family_name]
    needed = _drawable(text) - _charmap(default_path)
    for entry in _candidates():
        if not needed:
            break
        covered = needed & _charmap(entry.fname)
        if covered and entry.name not in families:
            families.append(entry.name)
            needed -= covered
    unshaped = (
        ""
        if LAYS_OUT_TEXT
        else "".join(c for c in dict.fromkeys(text) if unicodedata.bidirectional(c) in RIGHT_TO_LEFT)
    )
    return TextFonts(families, "".join(c for c in dict.fromkeys(text) if ord(c) in needed), unshaped)


def warn_missing(missing: str) -> None:
    """One warning for all the characters no installed font has (matplotlib gives one per character)."""
    if not missing:
        return
    shown = " ".join(missing[:SHOWN_MISSING]) + (" ..." if len(missing) > SHOWN_MISSING else "")
    warnings.warn(
        f"no installed font has {len(missing)} of the characters to draw ({shown}); they appear as boxes: "
        "install a font that has them (e.g. Noto Sans CJK for Chinese, Japanese and Korean) and draw again",
        UserWarning,
        stacklevel=3,
    )


def warn_unshaped(unshaped: str) -> None:
    """One warning for right-to-left letters (Arabic, Hebrew) that this matplotlib draws left to right and
    unjoined, so that they read backwards: it says nothing of it itself."""
    if not unshaped:
        return
    shown = " ".join(unshaped[:SHOWN_MISSING]) + (" ..." if len(unshaped) > SHOWN_MISSING else "")
    warnings.warn(
        f"matplotlib {matplotlib.__version__} has no complex text layout: it draws {len(unshaped)} right-to-left "
        f"letters ({shown}) left to right and unjoined, so they read backwards; matplotlib with libraqm (3.11 or "
        "later) draws them right",
        UserWarning,
        stacklevel=3,
    )


@contextmanager
def no_glyph_warnings() -> Iterator[None]:
    """Silence matplotlib's missing-glyph warning (one per character) while a figure is drawn."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=MISSING_GLYPH_WARNING)
        yield


def _drawable(text: str) -> set[int]:
    """Code points that need a glyph: not spaces, controls or format characters."""
    return {ord(c) for c in set(text) if unicodedata.category(c)[0] not in "ZC"}


def _candidates() -> list[font_manager.FontEntry]:
    """Installed fonts, upright regular faces first (they are what labels are drawn in)."""
    entries = [
        entry
        for entry in font_manager.fontManager.ttflist
        if not any(entry.name.startswith(name) for name in PLACEHOLDER_FONTS)
    ]
    return sorted(entries, key=lambda e: (e.style != "normal", abs(_weight(e.weight) - 400), e.name, e.fname))


def _weight(weight: int | str) -> int:
    return weight if isinstance(weight, int) else font_manager.weight_dict.get(weight, 400)


@functools.cache
def _charmap(path: str) -> frozenset[int]:
    """The code points a font file has glyphs for; nothing for a file FreeType cannot use at any size."""
    try:
        font = ft2font.FT2Font(path)
    except (OSError, RuntimeError, ValueError):
        return frozenset()
    if not font.scalable:  # bitmap-only fonts (colour emoji) fail when matplotlib sets their size
        return frozenset()
    return frozenset(font.get_charmap())
