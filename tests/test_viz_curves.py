"""Training curves read tolerantly from metrics.jsonl, and the positional-encoding picture."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from test_viz_attention import assert_png

from tformer.model.embeddings import sinusoidal_table
from tformer.viz.curves import MetricsError, curves_figure, read_metrics, save_curves_png, series
from tformer.viz.positional import positional_figure, save_positional_png

ROWS = [
    {"step": 10, "epoch": 0, "wall_s": 1.5, "train_loss": 5.0, "lr": 1e-4},
    {"step": 20, "epoch": 0, "wall_s": 3.0, "train_loss": 4.0, "lr": 2e-4, "valid_loss": 4.5, "bleu": 1.0, "chrf": 9.0},
    {"step": 30, "epoch": 1, "wall_s": 4.5, "train_loss": "nan", "lr": 1.5e-4},
]


def write_metrics(run_dir: Path, rows: list[dict], *, extra: str = "") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row) + "\n" for row in rows) + extra
    (run_dir / "metrics.jsonl").write_text(text, encoding="utf-8")
    return run_dir


def test_reading_skips_cut_lines_and_turns_nan_strings_into_floats(tmp_path: Path) -> None:
    run = write_metrics(tmp_path / "run", ROWS, extra='{"step": 40, "train_lo')  # a line cut by a crash
    rows = read_metrics(run)
    assert [row["step"] for row in rows] == [10, 20, 30]
    loss = series(rows, "train_loss")
    assert loss.steps == [10, 20, 30] and loss.wall == [1.5, 3.0, 4.5]
    assert loss.values[:2] == [5.0, 4.0] and math.isnan(loss.values[2])
    assert series(rows, "bleu").steps == [20]


def test_reading_skips_lines_that_are_not_objects_or_not_utf8(tmp_path: Path) -> None:
    run = write_metrics(tmp_path / "run", ROWS)
    with (run / "metrics.jsonl").open("ab") as handle:
        handle.write(b'\xbf\xff damaged\n[1, 2]\n"text"\n')
    assert read_metrics(run) == ROWS


def test_plot_draws_every_metric_over_steps_and_wall_time(tmp_path: Path) -> None:
    figure = curves_figure(read_metrics(write_metrics(tmp_path / "run", ROWS)))
    assert len(figure.axes) == 6
    labels = [sorted(line.get_label() for line in ax.get_lines()) for ax in figure.axes]
    assert labels[:3] == [["train_loss", "valid_loss"], ["bleu", "chrf"], ["lr"]]
    assert labels[3:] == labels[:3]
    steps_lr, wall_lr = figure.axes[2].get_lines()[0], figure.axes[5].get_lines()[0]
    assert list(steps_lr.get_xdata()) == [10, 20, 30] and list(wall_lr.get_xdata()) == [1.5, 3.0, 4.5]
    assert_png(save_curves_png(tmp_path / "run", tmp_path / "out" / "curves.png"), min_width=1000, min_height=600)


def test_rows_without_wall_time_or_scores_still_plot(tmp_path: Path) -> None:
    run = write_metrics(tmp_path / "run", [{"step": 1, "train_loss": 3.0}, {"step": 2, "elapsed": 2.0, "lr": 0.1}])
    rows = read_metrics(run)
    assert series(rows, "lr").wall == [2.0]
    assert math.isnan(series(rows, "train_loss").wall[0])
    assert_png(save_curves_png(run, tmp_path / "curves.png"))


def test_missing_or_empty_metrics_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(MetricsError, match=r"no metrics file.*stopped before its first log"):
        read_metrics(tmp_path)
    with pytest.raises(MetricsError, match=r"runz does not exist; give a run directory"):  # not "train longer"
        read_metrics(tmp_path / "runz")
    write_metrics(tmp_path, [])
    with pytest.raises(MetricsError, match="holds no metrics rows"):
        read_metrics(tmp_path)
    other = tmp_path / "notes.txt"  # "holds no metrics rows yet" said to wait for rows that never come
    other.write_text("hello\n")
    with pytest.raises(MetricsError, match=r"notes.txt is not the metrics.jsonl of a run \(no line of it is a JSON"):
        read_metrics(other)


def test_a_curve_logged_only_as_nan_is_left_out_with_one_warning(tmp_path: Path) -> None:
    """A diverged run logs its loss as "nan": matplotlib drew an empty panel with a legend, and said nothing."""
    rows = [{"step": step, "wall_s": step / 2, "train_loss": "nan", "lr": step / 10} for step in (1, 2, 3)]
    run = write_metrics(tmp_path / "run", rows)
    with pytest.warns(UserWarning, match=r"^train_loss: logged only NaN or infinite values.*; not drawn$"):
        figure = curves_figure(read_metrics(run))
    loss_over_steps, _, lr_over_steps, loss_over_wall = figure.axes[:4]
    for panel in (loss_over_steps, loss_over_wall):
        assert panel.get_lines() == [] and panel.get_legend() is None
        assert [text.get_text() for text in panel.texts] == ["no finite values"]
    assert [line.get_label() for line in lr_over_steps.get_lines()] == ["lr"]
    assert [text.get_text() for text in figure.axes[1].texts] == ["not logged"]  # bleu/chrf: never logged


def test_a_log_with_no_finite_value_to_draw_is_a_user_error(tmp_path: Path) -> None:
    rows = [{"step": 1, "train_loss": "nan", "lr": "inf"}, {"step": 2, "train_loss": "-inf", "lr": "nan"}]
    with pytest.raises(MetricsError, match=r"^nothing to draw: train_loss, lr logged only NaN or infinite values"):
        curves_figure(read_metrics(write_metrics(tmp_path / "nan", rows)))
    with pytest.raises(MetricsError, match=r"^nothing to draw: no row logs any of train_loss, valid_loss"):
        curves_figure(read_metrics(write_metrics(tmp_path / "none", [{"step": 1, "epoch": 0}])))


def test_positional_figure_draws_the_model_table(tmp_path: Path) -> None:
    for layout in ("interleaved", "concatenated"):
        figure = positional_figure(50, 16, layout=layout, dimensions=(0, 9))
        waves = figure.axes[0].get_lines()
        table = sinusoidal_table(50, 16, layout).numpy()
        np.testing.assert_allclose(waves[0].get_ydata(), table[:, 0])
        np.testing.assert_allclose(waves[1].get_ydata(), table[:, 9])
        assert waves[0].get_label() == "dim 0 (sin)"
        assert waves[1].get_label() == "dim 9 (cos)"
    assert_png(save_positional_png(tmp_path / "positions.png"), min_width=1000, min_height=400)


def test_a_dollar_sign_in_the_run_path_is_drawn_as_text(tmp_path: Path) -> None:
    """The title is the run's path; matplotlib read "$^$" in it as TeX and stopped with an error."""
    run = write_metrics(tmp_path / "run$^$", ROWS)
    assert_png(save_curves_png(run, tmp_path / "curves.png"))


def test_a_run_path_that_is_not_utf8_is_drawn(tmp_path: Path) -> None:
    """A directory named in Latin-1 (b"r\\xf6", Python's "r\\udcf6") stopped matplotlib with a TypeError
    traceback: a surrogate cannot be drawn. Its bytes are shown as UTF-8 shows them."""
    run = write_metrics(tmp_path / os.fsdecode(b"r\xf6"), ROWS)
    assert_png(save_curves_png(run, tmp_path / "curves.png"))
