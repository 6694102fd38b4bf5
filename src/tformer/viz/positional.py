"""Pictures of the sinusoidal positional encoding, drawn from `tformer.model.embeddings.sinusoidal_table`
(the very table the model adds to its embeddings).

Left: a few dimensions as waves over the positions; the wavelength grows geometrically from 2π to
10000·2π with the dimension index. Right: the whole table as a heat map.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from tformer.model.embeddings import sinusoidal_table
from tformer.viz.png_file import save_png


def wave_kind(dimension: int, d_model: int, layout: str) -> str:
    """Whether a dimension of the table is a sine or a cosine."""
    if layout == "interleaved":
        return "sin" if dimension % 2 == 0 else "cos"
    return "sin" if dimension < (d_model + 1) // 2 else "cos"


def positional_figure(
    n_positions: int = 100,
    d_model: int = 64,
    *,
    layout: str = "interleaved",
    dimensions: tuple[int, ...] = (4, 5, 12, 20, 28),
) -> Figure:
    table_PD = sinusoidal_table(n_positions, d_model, layout).numpy()
    figure = Figure(figsize=(13, 4.5), layout="constrained")
    waves, heat = figure.subplots(1, 2, width_ratios=(1.2, 1))
    for dimension in (d for d in dimensions if d < d_model):
        waves.plot(table_PD[:, dimension], label=f"dim {dimension} ({wave_kind(dimension, d_model, layout)})")
    waves.set_xlabel("position")
    waves.set_ylabel("PE(position, dim)")
    waves.set_title(f"positional encoding: a few dimensions (d_model={d_model}, {layout})", fontsize=10)
    waves.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncols=5)
    waves.grid(alpha=0.3)
    image = heat.imshow(table_PD.T, aspect="auto", cmap="RdBu", vmin=-1, vmax=1, origin="lower")
    heat.set_xlabel("position")
    heat.set_ylabel("dimension")
    heat.set_title("the whole table (dimension × position)", fontsize=10)
    figure.colorbar(image, ax=heat, shrink=0.8)
    return figure


def save_positional_png(
    path: str | Path, *, n_positions: int = 100, d_model: int = 64, layout: str = "interleaved"
) -> Path:
    return save_png(positional_figure(n_positions, d_model, layout=layout), path)
