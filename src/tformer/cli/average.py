"""Average the weights of a run's last K checkpoints into a new checkpoint directory.

The paper averages the last 5 checkpoints of its base models (and 20 of its big ones). The result is a
self-describing checkpoint that `translate` and `evaluate` accept like any other; nothing existing is
modified or overwritten.

The last K are counted back from the checkpoint RUN_DIR/latest names: checkpoints newer than it (one a run
training now has saved but not yet named, or left behind by setting `latest` back by hand, docs/training.md)
are not part of the run and are left out, with a warning. Pruning (train.keep_last) keeps the checkpoint
`best` names however old, so a K above train.keep_last can reach back to it past the pruned ones: a warning
says so, naming the gap.
"""

from __future__ import annotations

import argparse

from tformer.cli.argument_types import path_argument
from tformer.cli.output_paths import check_output_dir

HELP = "average the weights of a run's last K checkpoints"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=path_argument, metavar="RUN_DIR", help="a training run directory")
    parser.add_argument("--last", type=int, required=True, metavar="K", help="how many of the newest checkpoints")
    parser.add_argument(
        "--out",
        type=path_argument,
        metavar="DIR",
        help="new checkpoint directory (default: inside RUN_DIR/checkpoints)",
    )


def run(args: argparse.Namespace) -> int:
    from tformer.training.average import average_checkpoints

    if args.out is not None:
        check_output_dir(args.out)  # before reading the checkpoints: a path under a file is one line
    path = average_checkpoints(args.run_dir, last=args.last, out=args.out)
    print(path)
    return 0
