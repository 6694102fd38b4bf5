"""Training curves from RUN_DIR/metrics.jsonl: loss, BLEU/chrF and learning rate, over optimizer steps
and over wall-clock training time.

Reading is tolerant: blank or cut-off lines (a killed run) are skipped, non-finite numbers written as
strings ("nan", "inf") become floats, and each curve uses only the rows that logged it. The wall-clock
axis reads `wall_s` (what tformer's trainer writes), or `wall_time` / `elapsed_s` / `elapsed`.

A curve logged only as NaN or infinity (a diverged run's loss) has nothing to draw: it is left out with
one warning naming it, and a log in which no curve has a finite value is a `MetricsError`.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from tformer.viz.fonts import fonts_for, warn_missing, warn_unshaped
from tformer.viz.png_file import save_png

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
    if not path.exists():  # a mistyped path: advice about short runs would mislead
        raise MetricsError(f"{path} does not exist; give a run directory or its metrics.jsonl")
    if path.is_dir():
        path = path / METRICS_FILE
    if path.is_dir():
        raise MetricsError(f"{path} is a directory, where a run keeps its metrics; remove or rename it")
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
        except (json.JSONDecodeError, RecursionError):  # RecursionError: a line nested too deep
            continue
        if isinstance(row, dict):
            rows.append(row)
    if not rows and path.name != METRICS_FILE:  # some other file: "no rows yet" would say to wait for them
        raise MetricsError(
            f"{path} is not the {METRICS_FILE} of a run (no line of it is a JSON object); give a run directory or "
            f"its {METRICS_FILE}"
        )
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


def points(curve: Series, *, over_wall: bool) -> list[tuple[float, float]]:
    """(x, value) where x is finite; a non-finite value stays in, as a gap in the line."""
    xs = curve.wall if over_wall else curve.steps
    return [(x, value) for x, value in zip(xs, curve.values, strict=True) if math.isfinite(x)]


def drawable(curve: Series, *, over_wall: bool) -> bool:
    return any(math.isfinite(value) for _, value in points(curve, over_wall=over_wall))


def draw_panel(ax: Axes, curves: list[Series], *, over_wall: bool, title: str, ylabel: str) -> None:
    drawn = [curve for curve in curves if drawable(curve, over_wall=over_wall)]
    for curve in drawn:
        xs, ys = zip(*points(curve, over_wall=over_wall), strict=True)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=curve.name)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("wall-clock training time (s)" if over_wall else "step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    else:
        empty = "no finite values" if any(points(curve, over_wall=over_wall) for curve in curves) else "not logged"
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes, color="gray")


def check_drawable(curves: list[Series]) -> None:
    """Warn once about the curves logged only as NaN or infinity; refuse a log with nothing to draw."""
    unfinite = [curve.name for curve in curves if curve.values and not drawable(curve, over_wall=False)]
    if not any(drawable(curve, over_wall=False) for curve in curves):
        if unfinite:
            raise MetricsError(
                f"nothing to draw: {', '.join(unfinite)} logged only NaN or infinite values (a diverged run?) "
                "and no other curve is logged"
            )
        raise MetricsError(f"nothing to draw: no row logs any of {', '.join(curve.name for curve in curves)}")
    if unfinite:
        warnings.warn(
            f"{', '.join(unfinite)}: logged only NaN or infinite values (a diverged run?); not drawn",
            UserWarning,
            stacklevel=3,
        )


def curves_figure(rows: list[dict[str, Any]], *, title: str = "") -> Figure:
    """Two rows of three panels (loss, BLEU/chrF, learning rate): over steps, then over wall time."""
    curves = {key: series(rows, key) for _, _, keys in PANELS for key in keys}
    check_drawable(list(curves.values()))
    figure = Figure(figsize=(15, 8), layout="constrained")
    axes = figure.subplots(2, len(PANELS), squeeze=False)
    for row_index, over_wall in enumerate((False, True)):
        for column, (panel_title, ylabel, keys) in enumerate(PANELS):
            panel = [curves[key] for key in keys]
            draw_panel(axes[row_index, column], panel, over_wall=over_wall, title=panel_title, ylabel=ylabel)
    if title:  # a path, in any script; not TeX: "$" in it is a dollar sign
        fonts = fonts_for([title])
        warn_missing(fonts.missing)
        warn_unshaped(fonts.unshaped)
        figure.suptitle(title, parse_math=False, fontfamily=fonts.families)
    return figure


def save_curves_png(run_dir_or_file: str | Path, path: str | Path) -> Path:
    rows = read_metrics(run_dir_or_file)
    # a name that is not UTF-8 (bytes of another encoding, Python's surrogates) cannot be drawn: its bytes shown as
    # UTF-8, as `ls` shows them (a Latin-1 "ö" as "�"; under PYTHONUTF8=0 LC_ALL=C, a UTF-8 "ö" as itself)
    shown = os.fsencode(Path(run_dir_or_file)).decode("utf-8", errors="replace")
    figure = curves_figure(rows, title=f"{shown} ({len(rows)} rows)")
    return save_png(figure, path)  # a failed or interrupted write keeps the file that was there
