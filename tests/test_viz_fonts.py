"""Tokens in scripts the default font lacks: drawn with an installed font that has them, and what no
font has is reported in one warning instead of one per character."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from test_viz_attention import assert_png

from tformer.viz import fonts
from tformer.viz.attention_maps import SentenceAttention, save_attention_png
from tformer.viz.html import save_attention_html

# U+1D81 is in STIXGeneral, which matplotlib ships, but not in DejaVu Sans, its default font.
NOT_IN_DEFAULT_FONT = "\u1d81"


def labelled(source: list[str], target: list[str]) -> SentenceAttention:
    s, t = len(source), len(target)
    return SentenceAttention(
        source_labels=source,
        input_labels=["<s>", *target[:-1]],
        output_labels=target,
        encoder_self=np.full((1, 1, s, s), 1 / s),
        decoder_self=np.full((1, 1, t, t), 1 / t),
        cross=np.full((1, 1, t, s), 1 / s),
        translation=" ".join(target[:-1]),
    )


def drawn_warnings(draw) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        draw()
    return [str(warning.message) for warning in caught]


def test_a_character_the_default_font_lacks_is_drawn_with_an_installed_font_that_has_it(tmp_path: Path) -> None:
    chosen = fonts.fonts_for([f"a{NOT_IN_DEFAULT_FONT}b"])
    assert len(chosen.families) == 2 and chosen.missing == ""
    assert fonts.fonts_for(["plain Latin text"]).families == chosen.families[:1]
    attention = labelled([f"▁{NOT_IN_DEFAULT_FONT}", "</s>"], [f"▁x{NOT_IN_DEFAULT_FONT}", "</s>"])
    assert drawn_warnings(lambda: save_attention_png(attention, tmp_path / "a.png")) == []
    assert_png(tmp_path / "a.png")


def test_characters_no_installed_font_has_give_one_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fonts, "_candidates", list)  # a machine with no font beyond the default
    attention = labelled(["▁猫が", "座る", "</s>"], ["▁猫", "▁ไทย", "</s>"])
    for draw in (
        lambda: save_attention_png(attention, tmp_path / "a.png"),
        lambda: save_attention_html(attention, tmp_path / "a.html"),
    ):
        messages = drawn_warnings(draw)
        assert len(messages) == 1, messages
        assert messages[0].startswith("no installed font has 7 of the characters to draw (猫 が 座 る ไ ท ย)")
        assert "\n" not in messages[0]


@pytest.mark.parametrize("lays_out_text", [False, True])
def test_right_to_left_letters_a_matplotlib_cannot_lay_out_give_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lays_out_text: bool
) -> None:
    """A matplotlib without libraqm draws Arabic and Hebrew left to right, letters unjoined (they read
    backwards), and said nothing: one line now says so."""
    monkeypatch.setattr(fonts, "LAYS_OUT_TEXT", lays_out_text)
    attention = labelled(["▁كتاب", "</s>"], ["▁ספר", "</s>"])
    for draw in (
        lambda: save_attention_png(attention, tmp_path / "a.png"),
        lambda: save_attention_html(attention, tmp_path / "a.html"),
    ):
        messages = drawn_warnings(draw)
        if lays_out_text:
            assert messages == []
        else:
            assert len(messages) == 1 and "\n" not in messages[0], messages
            assert "draws 7 right-to-left letters (ك ت ا ب ס פ ר) left to right and unjoined" in messages[0]
