"""Plot a run's training curves from RUN_DIR/metrics.jsonl: training and validation loss, BLEU and
chrF, and the learning rate, over optimizer steps (top row) and wall-clock training time (bottom row)."""

from __future__ import annotations

import argparse
from pathlib import Path

from tformer.cli.output_paths import check_output_file

HELP = "plot loss, BLEU/chrF and learning rate of a run over steps and wall-clock time"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory (or its metrics.jsonl)")
    parser.add_argument("--out", type=Path, required=True, help="the PNG file to write")


def run(args: argparse.Namespace) -> int:
    from tformer.viz.curves import save_curves_png

    if args.out.suffix.lower() != ".png":
        raise ValueError(f"--out {args.out}: plot writes a PNG image; give a file name ending in .png")
    check_output_file(args.out)
    if (args.run_dir / "experiment.json").is_file():  # a checkpoint (translate takes one): name its run
        from tformer.training.checkpoint import checkpoint_given_for_run  # torch, only on this error's path

        raise ValueError(checkpoint_given_for_run(args.run_dir))
    print(save_curves_png(args.run_dir, args.out))
    return 0
