"""The main job on the built-in default: generate an English -> German number-words corpus, train a small
Transformer on the CPU (1,300 steps, stopped at 150 s on a slower or busy machine; about 2½ minutes in all
on 2 cores), report exact-match accuracy and chrF on numbers never seen in training, and save the run (with
a cross-attention map) for `tformer translate`."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from tformer.cli.argument_types import integer, path_argument, seed_below
from tformer.cli.output_paths import check_output_dir

if TYPE_CHECKING:
    from tformer.demo import DemoConfig

HELP = "train and evaluate the built-in English -> German number-words translator (no download)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=path_argument, default=Path("runs/demo"), help="run directory (default: runs/demo)"
    )
    parser.add_argument("--train-steps", type=step_count, help="optimizer steps (default: 1300; 0: no step limit)")
    parser.add_argument(
        "--train-seconds", type=seconds, help="cap on training time, for slow machines (default: 150; 0: no cap)"
    )
    parser.add_argument(  # the data generator and the tokenizer trainer take unsigned 32-bit seeds
        "--seed", type=seed_below(32), default=0, help="seed for the data, the model and the batches (default: 0)"
    )
    parser.add_argument("--quick", action="store_true", help="a seconds-long run with little data (a smoke test)")
    parser.add_argument("--quiet", action="store_true", help="print only the results")


def step_count(text: str) -> int:
    """A number of steps: 0 (no limit) or more. Checked here so the error names the flag, not the setting."""
    value = integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"0 (no limit) or a positive number of steps; got {text}")
    return value


def seconds(text: str) -> float:
    """A time limit in seconds: 0 (no cap) or more."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"0 (no cap) or a positive number of seconds; got {text}")
    return value


def run(args: argparse.Namespace) -> int:
    from tformer.demo import run_demo

    check_output_dir(args.out)  # a path under a file (or unwritable) is one line that names --out
    run_demo(args.out, _demo_config(args), quiet=args.quiet)  # checks everything before writing
    return 0


def _demo_config(args: argparse.Namespace) -> DemoConfig:
    """The demo's sizes: --quick's or the full ones, with the flags given applied."""
    from tformer.demo import DemoConfig, quick_config

    config = quick_config() if args.quick else DemoConfig()
    config = dataclasses.replace(config, seed=args.seed)
    if args.train_steps is not None:
        config = dataclasses.replace(config, train_steps=args.train_steps)
    if args.train_seconds is not None:
        config = dataclasses.replace(config, train_seconds=args.train_seconds)
    return config
