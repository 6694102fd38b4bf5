"""A single self-contained HTML page of attention maps: one PNG per (kind, layer, head), embedded as a
base64 data URI, with its weights as numbers in a table below it, inline CSS and no script, so the file
works offline, with scripts off, and can be mailed around."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from tformer.atomic_file import parents_made, write_atomic
from tformer.viz.attention_kinds import STACKS
from tformer.viz.attention_maps import (
    KIND_TITLES,
    KINDS,
    SentenceAttention,
    check_picture_size,
    draw_heatmap,
    label_fonts,
    panel_inches,
    select_indices,
)
from tformer.viz.fonts import no_glyph_warnings, warn_missing, warn_unshaped

STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.5em; } h3 { font-size: 0.95em; }
.layer { display: flex; flex-wrap: wrap; gap: 0.8em; }
figure { margin: 0; } figcaption { font-size: 0.8em; text-align: center; }
code { background: #f3f3f3; padding: 0 0.2em; }
summary { font-size: 0.8em; cursor: pointer; }
table { border-collapse: collapse; font-size: 0.7em; font-variant-numeric: tabular-nums; }
th, td { padding: 0 0.3em; text-align: right; } th[scope='col'] { writing-mode: vertical-rl; }
"""


HTML_DPI = 90


def png_data_uri(figure: Figure, *, dpi: int = HTML_DPI) -> str:
    buffer = io.BytesIO()
    with no_glyph_warnings():  # the page's caller reports characters without a glyph once
        figure.savefig(buffer, format="png", dpi=dpi)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def head_figure(
    attention: SentenceAttention, kind: str, layer: int, head: int, *, families: Sequence[str] | None = None
) -> Figure:
    width, height = panel_inches(attention, [kind])
    check_picture_size(width + 0.4, height + 0.4, HTML_DPI, panels=1)
    figure = Figure(figsize=(width + 0.4, height + 0.4), layout="constrained")
    row_labels, col_labels = attention.axis_labels(kind)
    weights = attention.maps(kind)[layer, head]
    draw_heatmap(figure.subplots(), weights, row_labels, col_labels, f"layer {layer}, head {head}", families=families)
    return figure


def label_html(text: str) -> str:
    """A token or sentence as HTML text, isolated from its neighbours' writing direction: pieces listed side
    by side stay in token order (Arabic or Hebrew pieces ran right to left, against the maps' columns), and
    a direction control inside one (U+202E) reverses only that piece."""
    return f"<bdi>{html.escape(text)}</bdi>"


def weights_table(weights_QK: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str]) -> str:
    """One map's weights as numbers (rows queries, columns keys): what its colours say, for readers who
    cannot tell them apart and for screen readers, with no script."""
    header = "".join(f"<th scope='col'>{label_html(label)}</th>" for label in col_labels)
    rows = "".join(
        f"<tr><th scope='row'>{label_html(label)}</th>" + "".join(f"<td>{weight:.3f}</td>" for weight in row) + "</tr>"
        for label, row in zip(row_labels, weights_QK.tolist(), strict=True)
    )
    return f"<details><summary>weights as numbers</summary><table><tr><td></td>{header}</tr>{rows}</table></details>"


def attention_html(
    attention: SentenceAttention,
    *,
    kinds: Sequence[str] = KINDS,
    layer: int | None = None,
    head: int | None = None,
) -> str:
    """The page as a string: a section per kind, a row of head figures per layer."""
    fonts = label_fonts(attention)
    warn_missing(fonts.missing)
    warn_unshaped(fonts.unshaped)
    source = " ".join(label_html(label) for label in attention.source_labels)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>tformer attention</title>',
        f"<style>{STYLE}</style></head><body>",
        "<h1>Attention maps</h1>",
        f"<p>Source pieces: <code>{source}</code><br>",
        f"Translation: <code>{label_html(attention.translation)}</code></p>",
        "<p>Rows are queries, columns keys; each row sums to 1. Decoder rows are the tokens being predicted. "
        "Colour: weight 0 (dark purple) to 1 (yellow); under each map, its weights as numbers.</p>",
    ]
    for kind in kinds:
        maps = attention.maps(kind)
        parts.append(f"<h2>{html.escape(KIND_TITLES[kind])}</h2>")
        for layer_index in select_indices(maps.shape[0], layer, f"{STACKS[kind]} layer"):
            parts.append(f"<h3>layer {layer_index}</h3><div class='layer'>")
            for head_index in select_indices(maps.shape[1], head, "head"):
                uri = png_data_uri(head_figure(attention, kind, layer_index, head_index, families=fonts.families))
                caption = f"{KIND_TITLES[kind]}, layer {layer_index}, head {head_index}"
                table = weights_table(maps[layer_index, head_index], *attention.axis_labels(kind))
                parts.append(
                    f"<figure class='head'><img src='{uri}' alt='{html.escape(caption)}'>"
                    f"<figcaption>{html.escape(caption)}</figcaption>{table}</figure>"
                )
            parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def save_attention_html(
    attention: SentenceAttention,
    path: str | Path,
    *,
    kinds: Sequence[str] = KINDS,
    layer: int | None = None,
    head: int | None = None,
) -> Path:
    page = attention_html(attention, kinds=kinds, layer=layer, head=head)
    with parents_made(Path(path)):  # a failed write keeps the file that was there, and leaves no new folder
        return write_atomic(Path(path), page.encode("utf-8"))
