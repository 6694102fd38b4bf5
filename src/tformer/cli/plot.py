"""Plot a run's training curves from RUN_DIR/metrics.jsonl: training and validation loss, BLEU and
chrF, and the learning rate, over optimizer steps (top row) and wall-clock training time (bottom row).

--out is drawn in memory, written beside its name and renamed into place; an existing file is kept unless
--overwrite is given."""

from __future__ import annotations

import argparse
from pathlib import Path

from tformer.cli.argument_types import path_argument
from tformer.cli.output_paths import check_replaced_output

HELP = "plot loss, BLEU/chrF and learning rate of a run over steps and wall-clock time"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=path_argument, metavar="RUN_DIR", help="a run directory (or its metrics.jsonl)")
    parser.add_argument("--out", type=path_argument, required=True, help="the PNG file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def run(args: argparse.Namespace) -> int:
    from tformer.viz.curves import MetricsError, save_curves_png

    if args.out.suffix.lower() != ".png":
        raise ValueError(f"--out {args.out}: plot writes a PNG image; give a file name ending in .png")
    check_replaced_output(args.out, overwrite=args.overwrite, flag="--out")
    try:
        print(save_curves_png(args.run_dir, args.out))
    except MetricsError:
        # a checkpoint (translate takes one) holds no metrics: name the run that does, not a short run's advice
        from tformer.training.checkpoint_load import checkpoint_given_for_run  # torch, only on this error's path

        if given_checkpoint := checkpoint_given_for_run(args.run_dir):
            raise ValueError(given_checkpoint) from None
        if too_short := _stopped_before_its_first_log(args.run_dir):
            raise ValueError(too_short) from None
        raise
    return 0


def _stopped_before_its_first_log(path: Path) -> str | None:
    """For a run directory without metrics whose last checkpoint is earlier than its first log: the line
    that says so, with the run's numbers and what to do; None for anything else (the reader's own
    message then stands)."""
    from tformer.training.checkpoint import METRICS_FILE, is_run_dir
    from tformer.training.checkpoint_load import CheckpointError, read_experiment, resolve_checkpoint

    if not is_run_dir(path) or (path / METRICS_FILE).exists():
        return None
    try:
        experiment, step = read_experiment(resolve_checkpoint(path, which="last")[0])
    except (CheckpointError, OSError):
        return None
    if experiment.data.train_src is None:  # written by import-hf: never trained here, nothing to resume
        return f"{path} has no metrics to plot: it was imported (tformer import-hf), not trained by tformer train"
    log_every = experiment.train.log_every
    if step >= log_every:
        return None
    return (
        f"{path} has no metrics to plot: the run stopped at step {step}, before its first log (train.log_every is "
        f"{log_every}); train it longer (tformer train --out {path} --resume --max-steps {log_every} --max-time 0), "
        f"or train with --set train.log_every={max(1, step)} or less"
    )
