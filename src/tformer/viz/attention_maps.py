"""Attention maps of one sentence pair: every layer and head of the three kinds of attention, as arrays
and as pictures with the subword tokens on the axes.

The maps come from ONE teacher-forced pass `model(src, [bos] + target, return_attention=True)`, which
is exact: attention at a position depends only on the tokens before it, so it equals what the decoder
computed while it generated those tokens one at a time.

Axes. Every row is a query, every column a key; rows sum to 1.
- encoder self-attention: source pieces (with </s>) on both axes;
- decoder self-attention: rows are the tokens being predicted (target pieces, then </s>), columns the
  decoder inputs they may read (<s> and the target pieces), so the causal mask shows as an empty upper
  triangle;
- cross-attention: rows are the tokens being predicted, columns the source pieces.

Shape legend (numpy arrays): L layers, H heads, S source length, T target length (decoder inputs).

Tokens and sentences are drawn as plain text (`parse_math=False`): matplotlib would otherwise read the
text between two "$" as TeX, so "costs $5 or $10" lost its spaces and "$^$" stopped the drawing. They
are drawn in the default font with fallbacks for the scripts it lacks (`tformer.viz.fonts`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.textpath import TextToPath

from tformer.config import DecodeConfig
from tformer.decoding import generate
from tformer.decoding.lengths import max_output_lengths
from tformer.model import Transformer
from tformer.model.modes import evaluating
from tformer.viz.attention_kinds import KINDS, STACKS
from tformer.viz.fonts import TextFonts, fonts_for, no_glyph_warnings, warn_missing, warn_unshaped
from tformer.viz.png_file import save_png

PNG_DPI = 100
# Larger pictures take minutes and gigabytes to lay out and draw (4 bytes a pixel), and few viewers open
# them; older matplotlib versions cannot draw 2**16 pixels or more on a side at all. Every layer and head
# of a base model (6 + 6 layers, 8 heads) fits up to about 55 pieces: 40 pieces (7920 x 18610 pixels)
# drew in 46 s with 1.2 GB on 2 CPU cores, 100 pieces (18480 x 42370) are refused.
MAX_PIXELS = 2**28
MAX_SIDE_PIXELS = 2**16 - 1
MAX_LABEL_CHARACTERS = 24  # sentencepiece pieces are at most 16 characters unless trained otherwise
TITLE_POINTS = 10  # font size of the sentence above the maps
TEXT_TO_PATH = TextToPath()  # measures text without drawing it
KIND_TITLES = {
    "encoder_self": "encoder self-attention",
    "decoder_self": "decoder masked self-attention",
    "cross": "cross-attention (decoder → source)",
}


class AttentionPlotError(ValueError):
    """A layer, head or kind of attention that the model does not have; the message lists valid ones."""


@dataclass
class SentenceAttention:
    """Attention maps of one (source, target) pair, with the token labels of each axis."""

    source_labels: list[str]  # S pieces, </s> included
    input_labels: list[str]  # T decoder inputs: <s> and the target pieces
    output_labels: list[str]  # T predicted tokens: the target pieces and </s>
    encoder_self: np.ndarray  # L H S S
    decoder_self: np.ndarray  # L H T T
    cross: np.ndarray  # L H T S
    translation: str = ""

    def maps(self, kind: str) -> np.ndarray:
        if kind not in KINDS:
            raise AttentionPlotError(f"unknown attention kind {kind!r}; choose one of: {', '.join(KINDS)}")
        return getattr(self, kind)

    def axis_labels(self, kind: str) -> tuple[list[str], list[str]]:
        """(row labels, column labels) of the maps of `kind`."""
        if kind == "encoder_self":
            return self.source_labels, self.source_labels
        if kind == "decoder_self":
            return self.output_labels, self.input_labels
        return self.output_labels, self.source_labels


@torch.no_grad()
def teacher_forced_attention(
    model: Transformer, src_ids: Sequence[int], tgt_ids: Sequence[int], *, bos_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(encoder_self LHSS, decoder_self LHTT, cross LHTS) for one pair.

    `src_ids` is the full source (eos included); `tgt_ids` the target tokens the decoder reads after bos.
    """
    parameter = next(model.parameters())
    src_1S = torch.tensor([list(src_ids)], dtype=torch.long, device=parameter.device)
    tgt_in_1T = torch.tensor([[bos_id, *tgt_ids]], dtype=torch.long, device=parameter.device)
    with evaluating(model):
        _, maps = model(src_1S, tgt_in_1T, return_attention=True)

    def stack(per_layer: list[torch.Tensor]) -> np.ndarray:
        return torch.stack([weights[0] for weights in per_layer]).float().cpu().numpy()

    return stack(maps.encoder_self), stack(maps.decoder_self), stack(maps.cross)


def translate_ids(model: Transformer, tokenizer, source_text: str, decode_config: DecodeConfig | None) -> list[int]:
    """The best hypothesis's tokens (no bos/eos) for one sentence, by tformer's decoding."""
    src_ids = [*tokenizer.encode_source(source_text), tokenizer.eos_id]
    parameter = next(model.parameters())
    src_1S = torch.tensor([src_ids], dtype=torch.long, device=parameter.device)
    with torch.no_grad():
        hypotheses = generate(
            model,
            src_1S,
            src_pad_mask=src_1S != tokenizer.pad_id,
            bos_id=tokenizer.bos_id,
            eos_id=tokenizer.eos_id,
            config=decode_config or DecodeConfig(beam_size=1),
        )
    return list(hypotheses[0][0].tokens)


def decoded_length_limit(source_length: int, decode_config: DecodeConfig | None, *, limit: int) -> int:
    """The most tokens decoding gives this source (eos not counted): a translation that long ended there,
    without eos, whatever it would have predicted next. One shorter ended with eos."""
    config = decode_config or DecodeConfig(beam_size=1)
    return int(max_output_lengths(torch.tensor([source_length]), config, limit=limit)[0])


def sentence_attention(
    model: Transformer,
    tokenizer,
    source_text: str,
    *,
    target_text: str | None = None,
    decode_config: DecodeConfig | None = None,
) -> SentenceAttention:
    """Attention maps for `source_text` and its translation (decoded), or the given `target_text`.

    A translation that decoding cut off at its maximum length (`max_len_a * source length + max_len_b`,
    at most the model's `max_positions`; no eos) has no row predicting eos: its last token was predicted
    but never read, so the decoder reads <s> and the tokens before it, as it did while decoding."""
    limit = model.config.max_positions
    src_ids = [*tokenizer.encode_source(source_text), tokenizer.eos_id]
    if len(src_ids) > limit:
        raise AttentionPlotError(
            f"the sentence has {len(src_ids)} tokens; the model accepts at most {limit}: shorten it"
        )
    cut_off = False  # a given target is a whole translation: the model reads it and predicts eos after it
    if target_text is None:
        tgt_ids = translate_ids(model, tokenizer, source_text, decode_config)
        cut_off = len(tgt_ids) >= decoded_length_limit(len(src_ids), decode_config, limit=limit)
    else:
        tgt_ids = tokenizer.encode_target(target_text)
        if len(tgt_ids) + 1 > limit:
            raise AttentionPlotError(
                f"the target has {len(tgt_ids) + 1} tokens with <s>; the model accepts at most {limit}: shorten it"
            )
    read_ids = tgt_ids[:-1] if cut_off else tgt_ids  # the decoder's inputs after <s>
    predicted_ids = tgt_ids if cut_off else [*tgt_ids, tokenizer.eos_id]
    encoder_self, decoder_self, cross = teacher_forced_attention(model, src_ids, read_ids, bos_id=tokenizer.bos_id)
    return SentenceAttention(
        source_labels=tokenizer.id_to_source_piece(src_ids),
        input_labels=tokenizer.id_to_target_piece([tokenizer.bos_id, *read_ids]),
        output_labels=tokenizer.id_to_target_piece(predicted_ids),
        encoder_self=encoder_self,
        decoder_self=decoder_self,
        cross=cross,
        translation=tokenizer.decode_target(tgt_ids),
    )


# ---------------------------------------------------------------------------------------------- drawing
def select_indices(count: int, wanted: int | None, what: str) -> list[int]:
    """All of range(count), or the one index asked for (negative counts from the end)."""
    if wanted is None:
        return list(range(count))
    if not -count <= wanted < count:
        raise AttentionPlotError(f"{what} {wanted} does not exist; this model has {what}s 0..{count - 1}")
    return [wanted % count]


def draw_heatmap(
    ax: Axes,
    weights: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str,
    *,
    families: Sequence[str] | None = None,
) -> None:
    """One attention matrix: rows are queries, columns keys, colour 0..1. `families`: the fonts of the
    labels (`label_fonts(...).families`; None: matplotlib's default font only)."""
    ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    size = max(5.0, min(9.0, 160.0 / max(len(row_labels), len(col_labels), 1)))
    text = {"parse_math": False, "fontfamily": list(families) if families else None}
    ax.set_xticks(
        range(len(col_labels)), labels=[shortened(label) for label in col_labels], rotation=90, fontsize=size, **text
    )
    ax.set_yticks(range(len(row_labels)), labels=[shortened(label) for label in row_labels], fontsize=size, **text)
    ax.tick_params(length=0)
    ax.set_title(title, fontsize=9, parse_math=False)


def shortened(label: str) -> str:
    """A token label cut to MAX_LABEL_CHARACTERS, with "…": a received run's tokenizer may have pieces of
    hundreds of characters, and one such label took the whole picture, the maps squeezed to nothing."""
    return label if len(label) <= MAX_LABEL_CHARACTERS else label[: MAX_LABEL_CHARACTERS - 1] + "…"


def label_fonts(attention: SentenceAttention) -> TextFonts:
    """The fonts that draw every label and the translation, and the characters none can draw."""
    labels = (*attention.source_labels, *attention.input_labels, *attention.output_labels)
    return fonts_for([*labels, attention.translation])


def check_picture_size(width_inches: float, height_inches: float, dpi: int, *, panels: int) -> None:
    """Refuse, before any drawing, a picture too large to draw in reasonable time and memory."""
    width, height = round(width_inches * dpi), round(height_inches * dpi)
    if width * height > MAX_PIXELS or max(width, height) > MAX_SIDE_PIXELS:
        raise AttentionPlotError(
            f"the picture would be {width} x {height} pixels ({panels} panel(s)), too large to draw: "
            "draw fewer panels with --layer, --head and --kind (.html draws one image per head), or a shorter sentence"
        )


def panel_inches(attention: SentenceAttention, kinds: Sequence[str]) -> tuple[float, float]:
    longest = max(max(len(labels) for labels in attention.axis_labels(kind)) for kind in kinds)
    side = max(2.4, 0.22 * longest + 1.1)
    return side, side


def attention_figure(
    attention: SentenceAttention,
    *,
    kinds: Sequence[str] = KINDS,
    layer: int | None = None,
    head: int | None = None,
    fonts: TextFonts | None = None,
) -> Figure:
    """A grid with one row per (kind, layer) and one column per head (`fonts`: `label_fonts(attention)`)."""
    fonts = fonts or label_fonts(attention)
    for kind in kinds:
        attention.maps(kind)
    rows = [
        (kind, index)
        for kind in kinds
        for index in select_indices(attention.maps(kind).shape[0], layer, f"{STACKS[kind]} layer")
    ]
    heads = select_indices(attention.maps(kinds[0]).shape[1], head, "head")
    width, height = panel_inches(attention, kinds)
    figure_width = max(5.5, width * len(heads))
    source = "".join(attention.source_labels).replace("\u2581", " ").replace("</s>", "").strip()
    title = wrapped(f"{source}  →  {attention.translation}", 72 * figure_width - 20, fonts.families)
    figsize = (figure_width, (height + 0.4) * len(rows) + 0.7 + 0.2 * title.count("\n"))
    check_picture_size(*figsize, PNG_DPI, panels=len(rows) * len(heads))
    figure = Figure(figsize=figsize, layout="constrained")
    for subfigure, (kind, layer_index) in zip(figure.subfigures(len(rows), 1, squeeze=False)[:, 0], rows, strict=True):
        subfigure.suptitle(f"{KIND_TITLES[kind]}, layer {layer_index}", fontsize=10, weight="bold")
        row_labels, col_labels = attention.axis_labels(kind)
        axes = subfigure.subplots(1, len(heads), squeeze=False)[0]
        for ax, head_index in zip(axes, heads, strict=True):
            weights = attention.maps(kind)[layer_index, head_index]
            draw_heatmap(ax, weights, row_labels, col_labels, f"head {head_index}", families=fonts.families)
    figure.suptitle(
        f"{title}\nrows: queries, columns: keys; colour: weight 0 (dark) to 1 (yellow)",
        fontsize=TITLE_POINTS,
        parse_math=False,
        fontfamily=fonts.families,
    )
    return figure


def wrapped(text: str, width_points: float, families: Sequence[str]) -> str:
    """`text` in lines no wider than `width_points` as drawn at TITLE_POINTS in `families`: broken at spaces,
    and inside a word too long for a line (unspaced scripts: Chinese, Japanese, Thai). On one line, a
    sentence of 18 words ran off both sides of a one-head picture. (Matplotlib's own `wrap=True` measures
    text as TeX, which fails on a "$".)"""
    font = FontProperties(family=list(families), size=TITLE_POINTS)

    def fits(line: str) -> bool:
        with no_glyph_warnings():  # the caller reports characters without a glyph once
            return TEXT_TO_PATH.get_text_width_height_descent(line, font, ismath=False)[0] <= width_points

    lines = [""]
    for word in text.split(" "):
        joined = f"{lines[-1]} {word}" if lines[-1] else word
        if fits(joined):
            lines[-1] = joined
            continue
        if lines[-1]:
            lines.append("")
        for character in word:
            if lines[-1] and not fits(lines[-1] + character):
                lines.append("")
            lines[-1] += character
    return "\n".join(lines)


def save_figure(figure: Figure, path: str | Path, *, dpi: int = PNG_DPI) -> Path:
    """Write a PNG. Figures are built with matplotlib's object API (no pyplot), so no backend or
    global figure registry is involved and nothing needs closing. Characters without a glyph are
    reported by the caller, once (`warn_missing`), not by matplotlib once each."""
    return save_png(figure, path, dpi=dpi)  # a failed or interrupted write keeps the file that was there


def save_attention_png(
    attention: SentenceAttention,
    path: str | Path,
    *,
    kinds: Sequence[str] = KINDS,
    layer: int | None = None,
    head: int | None = None,
) -> Path:
    fonts = label_fonts(attention)
    figure = attention_figure(attention, kinds=kinds, layer=layer, head=head, fonts=fonts)
    warn_missing(fonts.missing)
    warn_unshaped(fonts.unshaped)
    return save_figure(figure, path)


def save_cross_attention_png(
    model: Transformer,
    tokenizer,
    source_text: str,
    path: str | Path,
    *,
    decode_config: DecodeConfig | None = None,
) -> Path:
    """Translate `source_text` and save the cross-attention of every layer and head (for `tformer demo`)."""
    attention = sentence_attention(model, tokenizer, source_text, decode_config=decode_config)
    return save_attention_png(attention, path, kinds=("cross",))
