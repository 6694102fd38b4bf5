"""A figure written as a PNG file that appears whole or not at all: drawn into memory first, then written
beside its name and renamed into place (`write_atomic`), so that an interruption (Ctrl-C) or a failed
write while drawing or writing keeps the file that was there, never a truncated image in its place."""

from __future__ import annotations

import io
from pathlib import Path

from matplotlib.figure import Figure

from tformer.atomic_file import parents_made, write_atomic
from tformer.viz.fonts import no_glyph_warnings


def save_png(figure: Figure, path: str | Path, *, dpi: int = 100) -> Path:
    """Write `figure` to `path` (its folder made if needed, and removed again if the write fails). Characters
    without a glyph are reported by the caller, once (`fonts.warn_missing`), not by matplotlib once each."""
    image = io.BytesIO()
    with no_glyph_warnings():
        figure.savefig(image, dpi=dpi, format="png")
    with parents_made(Path(path)):
        return write_atomic(Path(path), image.getvalue())
