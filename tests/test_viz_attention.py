"""Attention maps: exact values from one teacher-forced pass, and PNG / HTML files that show them."""

from __future__ import annotations

import base64
import re
import warnings
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from tformer.config import DecodeConfig, preset
from tformer.data.tokenizer import Tokenizer
from tformer.decoding import generate
from tformer.model import Transformer
from tformer.viz import attention_maps
from tformer.viz.attention_maps import (
    AttentionPlotError,
    SentenceAttention,
    attention_figure,
    save_attention_png,
    save_cross_attention_png,
    sentence_attention,
    teacher_forced_attention,
)
from tformer.viz.html import attention_html, save_attention_html

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BOS, EOS = 1, 2


def assert_png(path: Path, *, min_width: int = 100, min_height: int = 100) -> tuple[int, int]:
    """The file is a PNG that decodes, at least this large; returns (width, height)."""
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    height, width = matplotlib.image.imread(path).shape[:2]
    assert width >= min_width and height >= min_height, (width, height)
    return width, height


def fake_attention(model: Transformer, src: list[int], tgt: list[int]) -> SentenceAttention:
    encoder_self, decoder_self, cross = teacher_forced_attention(model, src, tgt, bos_id=BOS)
    return SentenceAttention(
        source_labels=[f"s{i}" for i in src],
        input_labels=["<s>", *(f"t{i}" for i in tgt)],
        output_labels=[*(f"t{i}" for i in tgt), "</s>"],
        encoder_self=encoder_self,
        decoder_self=decoder_self,
        cross=cross,
        translation="fake",
    )


def test_teacher_forced_maps_have_every_layer_and_head_and_are_distributions(tiny_model: Transformer) -> None:
    encoder_self, decoder_self, cross = teacher_forced_attention(tiny_model, [5, 6, 7, 8, EOS], [9, 10, 11], bos_id=BOS)
    config = tiny_model.config
    assert encoder_self.shape == (config.n_encoder_layers, config.n_heads, 5, 5)
    assert decoder_self.shape == (config.n_decoder_layers, config.n_heads, 4, 4)
    assert cross.shape == (config.n_decoder_layers, config.n_heads, 4, 5)
    for maps in (encoder_self, decoder_self, cross):
        np.testing.assert_allclose(maps.sum(axis=-1), 1.0, atol=1e-5)
    assert np.all(np.triu(decoder_self, k=1) == 0.0)  # the causal mask: nothing above the diagonal


def test_teacher_forced_cross_attention_equals_step_by_step_decoding(tiny_model: Transformer) -> None:
    src, tgt = [5, 6, 7, 8, EOS], [9, 10, 11]
    _, _, cross = teacher_forced_attention(tiny_model, src, tgt, bos_id=BOS)
    src_1S = torch.tensor([src])
    with torch.no_grad():
        memory = tiny_model.encode(src_1S)
        cache = tiny_model.new_cache(batch_size=1, capacity=8, memory=memory)
        for t, token in enumerate([BOS, *tgt]):
            _, _, step_cross = tiny_model.decode(
                torch.tensor([[token]]), memory=None, src_pad_mask=None, cache=cache, return_attention=True
            )
            for layer, weights in enumerate(step_cross):
                np.testing.assert_allclose(weights[0, :, 0].numpy(), cross[layer, :, t], atol=1e-6)


def test_png_grid_has_a_panel_per_layer_and_head_and_zooms(tiny_model: Transformer, tmp_path: Path) -> None:
    attention = fake_attention(tiny_model, [5, 6, 7, EOS], [9, 10])
    figure = attention_figure(attention)
    config = tiny_model.config
    n_rows = config.n_encoder_layers + 2 * config.n_decoder_layers
    assert len(figure.axes) == n_rows * config.n_heads
    assert len(attention_figure(attention, kinds=("cross",), layer=-1, head=2).axes) == 1
    full = assert_png(save_attention_png(attention, tmp_path / "all.png"), min_width=600, min_height=1000)
    zoom = assert_png(save_attention_png(attention, tmp_path / "one.png", layer=0, head=1), min_width=300)
    assert zoom[1] < full[1]


def test_each_png_panel_shows_the_models_weights_with_query_rows_and_key_columns(tiny_model: Transformer) -> None:
    """What is drawn, not only that a file was written: the panel of (kind, layer, head) holds the model's map
    as is (row i is query i, column j key j) and its axes carry those queries' and keys' labels in order."""
    attention = fake_attention(tiny_model, [5, 6, 7, EOS], [9, 10])
    axes = iter(attention_figure(attention).axes)
    for kind in ("encoder_self", "decoder_self", "cross"):
        row_labels, col_labels = attention.axis_labels(kind)
        for layer_maps in attention.maps(kind):
            for weights in layer_maps:
                ax = next(axes)
                np.testing.assert_array_equal(ax.images[0].get_array(), weights)
                assert [label.get_text() for label in ax.get_yticklabels()] == row_labels
                assert [label.get_text() for label in ax.get_xticklabels()] == col_labels
                assert ax.yaxis_inverted()  # query 0 at the top, as the labels are listed


def test_asking_for_a_missing_layer_head_or_kind_is_a_user_error(tiny_model: Transformer) -> None:
    attention = fake_attention(tiny_model, [5, EOS], [9])
    with pytest.raises(AttentionPlotError, match="head 4 does not exist"):
        attention_figure(attention, head=4)
    with pytest.raises(AttentionPlotError, match="layer 2 does not exist"):
        attention_figure(attention, layer=2)
    with pytest.raises(AttentionPlotError, match="unknown attention kind"):
        attention_figure(attention, kinds=("decoder_cross",))


def test_a_missing_layer_is_named_by_its_stack_when_encoder_and_decoder_differ() -> None:
    """Two encoder layers and one decoder layer: `--layer 1` was refused with "this model has layers 0..0",
    which hid the encoder's second layer (drawn with --kind encoder_self)."""
    model = Transformer(preset("tiny", src_vocab_size=20, tgt_vocab_size=20, n_decoder_layers=1), seed=0).eval()
    attention = fake_attention(model, [5, EOS], [9])
    message = r"^decoder layer 1 does not exist; this model has decoder layers 0\.\.0$"
    with pytest.raises(AttentionPlotError, match=message):
        attention_figure(attention, layer=1)
    with pytest.raises(AttentionPlotError, match=message):
        attention_html(attention, layer=1)
    with pytest.raises(
        AttentionPlotError, match=r"^encoder layer 2 does not exist; this model has encoder layers 0\.\.1$"
    ):
        attention_figure(attention, layer=2, kinds=("encoder_self",))
    attention_figure(attention, layer=1, kinds=("encoder_self",))


def embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)]


def test_html_is_self_contained_with_one_figure_per_requested_head(tiny_model: Transformer, tmp_path: Path) -> None:
    attention = fake_attention(tiny_model, [5, 6, EOS], [9, 10])
    config = tiny_model.config
    page = save_attention_html(attention, tmp_path / "maps.html").read_text(encoding="utf-8")
    n_layers = config.n_encoder_layers + 2 * config.n_decoder_layers
    assert page.count("<figure") == len(embedded_pngs(page)) == n_layers * config.n_heads
    assert all(png.startswith(PNG_SIGNATURE) for png in embedded_pngs(page))
    assert "http" not in page and "<script" not in page and "<link" not in page  # nothing to fetch
    zoomed = attention_html(attention, kinds=("cross", "encoder_self"), layer=1, head=0)
    assert zoomed.count("<figure") == 2
    assert "cross-attention (decoder → source), layer 1, head 0" in zoomed


class Tables(HTMLParser):
    """The text of every table cell of a page, table by table and row by row."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.in_cell = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.tables[-1][-1].append("")
            self.in_cell = True

    def handle_endtag(self, tag: str) -> None:
        self.in_cell = self.in_cell and tag not in ("td", "th", "tr", "table")

    def handle_data(self, data: str) -> None:
        if self.in_cell:
            self.tables[-1][-1][-1] += data


def page_tables(page: str) -> list[list[list[str]]]:
    parser = Tables()
    parser.feed(page)
    return parser.tables


def test_html_gives_each_maps_weights_as_numbers_with_its_labels(tiny_model: Transformer) -> None:
    """The page showed the weights as colours only: nothing for a reader who cannot tell them apart, nor
    for a screen reader. Each map now has a table: query rows, key columns, the model's own numbers."""
    attention = fake_attention(tiny_model, [5, 6, 7, EOS], [9, 10])
    tables = page_tables(attention_html(attention, head=1))
    expected = [
        (kind, layer)
        for kind in ("encoder_self", "decoder_self", "cross")
        for layer in range(attention.maps(kind).shape[0])
    ]
    assert len(tables) == len(expected)
    for table, (kind, layer) in zip(tables, expected, strict=True):
        row_labels, col_labels = attention.axis_labels(kind)
        assert table[0] == ["", *col_labels]
        assert [row[0] for row in table[1:]] == row_labels
        numbers = np.array([[float(cell) for cell in row[1:]] for row in table[1:]])
        np.testing.assert_allclose(numbers, attention.maps(kind)[layer, 1], atol=5e-4)


def test_html_escapes_tokens_and_keeps_each_in_its_own_writing_direction() -> None:
    """A received run's pieces are anyone's text: markup in them is shown, never parsed, and a direction
    control (U+202E) or an Arabic piece no longer reorders the pieces listed after it."""
    labels = ["<script>alert(1)</script>", "\"'><img src=x onerror=alert(1)>", "\u202eevil", "▁مرحبا", "</s>"]
    n = len(labels)
    maps = np.full((1, 1, n, n), 1 / n)
    page = attention_html(SentenceAttention(labels, labels, labels, maps, maps, maps, translation="<b>x</b>"))
    assert "<script" not in page and "<img src=x" not in page and "<b>" not in page
    assert "<bdi>\u202eevil</bdi> <bdi>▁مرحبا</bdi>" in page
    assert page_tables(page)[0][0] == ["", *labels]


def test_save_cross_attention_png_translates_and_labels_with_pieces(tmp_path: Path) -> None:
    sentences = ["one two three", "three two one", "two two one three"] * 5
    tokenizer = Tokenizer.train(sentences, sentences, vocab_size=20)
    size = tokenizer.src_vocab_size
    model = Transformer(preset("tiny", src_vocab_size=size, tgt_vocab_size=size), seed=0).eval()
    path = save_cross_attention_png(model, tokenizer, "one two", tmp_path / "demo" / "cross.png")
    assert_png(path, min_width=300, min_height=200)
    attention = sentence_attention(model, tokenizer, "one two", target_text="two one")
    assert attention.source_labels == [*tokenizer.source_pieces("one two"), "</s>"]
    assert attention.output_labels == [*tokenizer.target_pieces("two one"), "</s>"]
    assert attention.input_labels == ["<s>", *tokenizer.target_pieces("two one")]


def test_a_translation_cut_off_at_the_length_limit_is_drawn_as_it_was_decoded(tmp_path: Path) -> None:
    """A translation decoded up to the model's max_positions tokens (no eos: an undertrained model, or a
    long sentence) was read back as <s> + every token, one position more than the model has, and
    `tformer attention` failed with "target length 7 exceeds max_positions=6". The decoder read <s> and
    all but the last token; each row is the step that predicted a token, and none predicted eos."""
    sentences = ["one two three", "three two one", "two two one three"] * 5
    tokenizer = Tokenizer.train(sentences, sentences, vocab_size=20)
    size = tokenizer.src_vocab_size
    model = Transformer(preset("tiny", src_vocab_size=size, tgt_vocab_size=size, max_positions=6), seed=0).eval()
    no_eos = DecodeConfig(beam_size=1, min_len=100)  # decoding runs to the limit
    attention = sentence_attention(model, tokenizer, "one two", decode_config=no_eos)
    tokens = attention_maps.translate_ids(model, tokenizer, "one two", no_eos)
    assert len(tokens) == 6
    assert attention.input_labels == tokenizer.id_to_target_piece([tokenizer.bos_id, *tokens[:5]])
    assert attention.output_labels == tokenizer.id_to_target_piece(tokens)
    assert attention.decoder_self.shape[-2:] == (6, 6) and attention.cross.shape[-2] == 6
    assert_png(save_attention_png(attention, tmp_path / "cut.png"))
    long = "one two three one two three"
    with_bos, with_eos = len(tokenizer.encode_target(long)) + 1, len(tokenizer.encode_source(long)) + 1
    with pytest.raises(
        AttentionPlotError, match=rf"^the target has {with_bos} tokens with <s>; the model accepts at most 6"
    ):
        sentence_attention(model, tokenizer, "one two", target_text=long)
    with pytest.raises(AttentionPlotError, match=rf"^the sentence has {with_eos} tokens; the model accepts at most 6"):
        sentence_attention(model, tokenizer, long)


@pytest.mark.parametrize("forced_eos", [False, True], ids=["cut-at-max-len", "ends-with-eos"])
def test_a_translation_cut_off_at_its_decoding_max_length_has_no_eos_row(forced_eos: bool) -> None:
    """A translation cut off at the decode settings' maximum length (max_len_a * S + max_len_b, below the
    model's max_positions) ends without eos, but the maps added a row labelled </s> that decoding never
    computed. The rows are now those of generate(return_attention=True): the last layer's head average
    equals the decoded hypothesis's attention, row for row, with a </s> row only when it ended with eos."""
    sentences = ["one two three", "three two one", "two two one three"] * 5
    tokenizer = Tokenizer.train(sentences, sentences, vocab_size=20)
    size = tokenizer.src_vocab_size
    model = Transformer(preset("tiny", src_vocab_size=size, tgt_vocab_size=size), seed=0).eval()
    config = DecodeConfig(beam_size=2, max_len_a=0.0, max_len_b=3, min_len=2, forced_eos=forced_eos)
    attention = sentence_attention(model, tokenizer, "one two", decode_config=config)
    src = torch.tensor([[*tokenizer.encode_source("one two"), tokenizer.eos_id]])
    (best, *_), *_ = generate(
        model,
        src,
        src_pad_mask=src != tokenizer.pad_id,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        config=config,
        return_attention=True,
    )
    assert len(best.tokens) == (2 if forced_eos else 3)
    predicted = [*best.tokens, tokenizer.eos_id] if forced_eos else best.tokens
    assert attention.output_labels == tokenizer.id_to_target_piece(predicted)
    assert attention.input_labels == tokenizer.id_to_target_piece([tokenizer.bos_id, *predicted[:-1]])
    np.testing.assert_allclose(attention.cross[-1].mean(axis=0), best.attention.numpy(), atol=1e-5)


def _uniform_attention(source_labels: list[str], *, target: str, translation: str) -> SentenceAttention:
    """One layer and head of uniform weights over `source_labels`, with the one-piece translation `target`."""
    n = len(source_labels)
    return SentenceAttention(
        source_labels=source_labels,
        input_labels=["<s>", target],
        output_labels=[target, "</s>"],
        encoder_self=np.full((1, 1, n, n), 1 / n),
        decoder_self=np.full((1, 1, 2, 2), 0.5),
        cross=np.full((1, 1, 2, n), 1 / n),
        translation=translation,
    )


def test_dollar_signs_in_tokens_and_sentences_are_drawn_as_text(tmp_path: Path) -> None:
    """Matplotlib reads text between two "$" as TeX: "$^$" stopped the drawing with an error whose first
    line was empty, and "costs $5 or $10" was drawn as maths without its spaces."""
    labels = ["▁costs", "▁$5", "▁or", "▁$10", "▁$^$", "</s>"]
    attention = _uniform_attention(labels, target="▁$x_", translation="kostet $5 oder $10")
    assert_png(save_attention_png(attention, tmp_path / "dollars.png"))
    assert "kostet $5 oder $10" in attention_figure(attention).get_suptitle()
    assert "<img" in attention_html(attention)


def test_a_picture_too_large_to_draw_is_refused_before_drawing(tmp_path: Path) -> None:
    """Every layer and head of a base-sized model (6 layers, 8 heads) for a 160-piece sentence is a
    29040 x 66130 pixel PNG: it took over five minutes and gigabytes of memory to draw."""
    n, layers, heads = 160, 6, 8
    labels = [f"▁w{i}" for i in range(n)]
    maps = np.full((layers, heads, n, n), 1 / n, dtype=np.float32)
    attention = SentenceAttention(labels, labels, labels, maps, maps, maps, translation="x")
    with pytest.raises(AttentionPlotError, match=r"29040 x 66130 pixels \(144 panel\(s\)\), too large to draw"):
        save_attention_png(attention, tmp_path / "all.png")
    assert not (tmp_path / "all.png").exists()
    assert len(attention_figure(attention, kinds=("cross",), layer=0, head=0).axes) == 1  # one panel is fine
    with pytest.raises(AttentionPlotError, match="too large to draw"):
        attention_html(SentenceAttention(labels * 8, labels, labels, maps, maps, maps), kinds=("encoder_self",))


def test_every_layer_and_head_of_a_base_model_for_an_everyday_sentence_is_drawn(monkeypatch) -> None:
    """A 40-piece sentence (25 to 30 words) and a base-sized model (6 layers, 8 heads) make a 7920 x 18610
    pixel grid, which drew in under a minute with about 1 GB; a limit of 2**27 pixels refused it."""
    n, layers, heads = 40, 6, 8
    labels = [f"▁w{i}" for i in range(n)]
    maps = np.full((layers, heads, n, n), 1 / n, dtype=np.float32)
    attention = SentenceAttention(labels, labels, labels, maps, maps, maps, translation="x")

    class AcceptedError(Exception):  # the size check passed and the figure is being made (slow: stop there)
        pass

    def figure(*, figsize: tuple[float, float], **_: object) -> None:
        raise AcceptedError(figsize)

    monkeypatch.setattr(attention_maps, "Figure", figure)
    with pytest.raises(AcceptedError):
        attention_figure(attention)


@pytest.mark.parametrize(
    "translation",
    ["le renard brun saute par-dessus le chien paresseux pendant que le fermier regarde depuis son porche", "x" * 150],
)
def test_a_long_sentence_above_the_maps_is_wrapped_inside_the_picture(tmp_path: Path, translation: str) -> None:
    """The sentence and its translation were one line of title: an 18-word sentence drawn with --head 0 ran
    off both sides of the picture, and a sentence without spaces (Chinese, Japanese) would too."""
    words = "the quick brown fox jumps over the lazy dog while the farmer watches from his old wooden porch"
    source = [f"▁{word}" for word in words.split()] + ["</s>"]
    attention = _uniform_attention(source, target="▁x", translation=translation)
    pixels = matplotlib.image.imread(save_attention_png(attention, tmp_path / "long.png", kinds=("cross",)))
    assert np.all(pixels[:, [0, -1], :3] == 1.0)  # nothing drawn across the left or right edge: all white


def test_a_very_long_piece_is_shortened_on_the_axes(tmp_path: Path) -> None:
    """A received run's tokenizer may have a piece of hundreds of characters: drawn whole, its label took
    the whole picture, the maps collapsed to nothing (matplotlib warned twice that it could not lay it out)."""
    labels = ["▁" + "x" * 400, "▁b", "</s>"]
    maps = np.full((1, 1, 3, 3), 1 / 3)
    attention = SentenceAttention(labels, labels, labels, maps, maps, maps, translation="y")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_attention_png(attention, tmp_path / "long.png")
    ax = attention_figure(attention, kinds=("cross",)).axes[0]
    assert [label.get_text() for label in ax.get_xticklabels()] == ["▁" + "x" * 22 + "…", "▁b", "</s>"]
