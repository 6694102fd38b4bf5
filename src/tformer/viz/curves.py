"""Training curves from RUN_DIR/metrics.jsonl: loss, BLEU/chrF and learning rate, over optimizer steps
and over wall-clock training time.

Reading is tolerant: blank or cut-off lines (a killed run) are skipped, non-finite numbers written as
strings ("nan", "inf") become floats, and each curve uses only the rows that logged it. The wall-clock
axis reads `wall_s` (what tformer's trainer writes), or `wall_time` / `elapsed_s` / `elapsed`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from tformer.viz.fonts import fonts_for, no_glyph_warnings, warn_missing

METRICS_FILE = "metrics.jsonl"
WALL_KEYS = ("wall_s", "wall_time", "elapsed_s", "elapsed")
PANELS = (  # (title, y label, keys drawn in it)
    ("loss", "loss per target token", ("train_loss", "valid_loss")),
    ("translation quality", "score", ("bleu", "chrf")),
    ("learning rate", "lr", ("lr",)),
)


class MetricsError(ValueError):
    """No usable metrics where the user pointed; the message names the file."""


@dataclass
class Series:
    name: str
    steps: list[float]
    wall: list[float]  # seconds, same length as steps; NaN where the row had no wall time
    values: list[float]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl (or of RUN_DIR/metrics.jsonl when given a directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise MetricsError(
            f"no metrics file at {path}: `tformer train` writes a line every train.log_every steps, so a run "
            "that stopped before its first log (or one imported with import-hf) has none; train longer or point "
            "at another run directory or metrics.jsonl"
        )
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():  # damaged bytes: skipped lines
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    if not rows:
        raise MetricsError(f"{path} holds no metrics rows yet")
    return rows


def as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)  # "nan", "inf" written by the metrics log for non-finite values
        except ValueError:
            return None
    return None


def wall_time(row: dict[str, Any]) -> float:
    for key in WALL_KEYS:
        number = as_number(row.get(key))
        if number is not None:
            return number
    return math.nan


def series(rows: list[dict[str, Any]], name: str) -> Series:
    """The rows that logged `name` (and a step), in file order."""
    result = Series(name, [], [], [])
    for row in rows:
        step, value = as_number(row.get("step")), as_number(row.get(name))
        if step is None or value is None:
            continue
        result.steps.append(step)
        result.wall.append(wall_time(row))
        result.values.append(value)
    return result


def draw_panel(ax: Axes, curves: list[Series], *, over_wall: bool, title: str, ylabel: str) -> None:
    drawn = 0
    for curve in curves:
        points = [
            (wall if over_wall else step, value)
            for step, wall, value in zip(curve.steps, curve.wall, curve.values, strict=True)
            if not (over_wall and math.isnan(wall))
        ]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=curve.name)
            drawn += 1
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("wall-clock training time (s)" if over_wall else "step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")


def curves_figure(rows: list[dict[str, Any]], *, title: str = "") -> Figure:
    """Two rows of three panels (loss, BLEU/chrF, learning rate): over steps, then over wall time."""
    figure = Figure(figsize=(15, 8), layout="constrained")
    axes = figure.subplots(2, len(PANELS), squeeze=False)
    for row_index, over_wall in enumerate((False, True)):
        for column, (panel_title, ylabel, keys) in enumerate(PANELS):
            curves = [series(rows, key) for key in keys]
            draw_panel(axes[row_index, column], curves, over_wall=over_wall, title=panel_title, ylabel=ylabel)
    if title:  # a path, in any script; not TeX: "$" in it is a dollar sign
        fonts = fonts_for([title])
        warn_missing(fonts.missing)
        figure.suptitle(title, parse_math=False, fontfamily=fonts.families)
    return figure


def save_curves_png(run_dir_or_file: str | Path, path: str | Path) -> Path:
    rows = read_metrics(run_dir_or_file)
    figure = curves_figure(rows, title=f"{Path(run_dir_or_file)} ({len(rows)} rows)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with no_glyph_warnings():
        figure.savefig(path, dpi=100, format="png")
    return path
