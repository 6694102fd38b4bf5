"""Decoding flags shared by the commands that decode a trained run (translate, evaluate)."""

from __future__ import annotations

import argparse
import dataclasses

from tformer.config import DecodeConfig


def add_decode_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--length-penalty",
        type=float,
        default=None,
        metavar="ALPHA",
        help="beam search's length penalty (default: the run's decode.length_penalty; docs/decoding.md)",
    )
    parser.add_argument(
        "--static-step",
        action="store_true",
        help="fixed-shape decoding step, replayed as a CUDA graph on a GPU (decode.static_step; same output)",
    )
    parser.add_argument(
        "--compile-step",
        action="store_true",
        help="--static-step, compiled with torch.compile before it is recorded (decode.compile_step; the first "
        "batch of each shape waits for the compiler)",
    )
    parser.add_argument(
        "--truncate",
        action="store_true",
        help="cut a line longer than the model accepts (model.max_positions pieces) to its first pieces, with a "
        "warning, instead of stopping with an error",
    )


def apply_decode_arguments(config: DecodeConfig, args: argparse.Namespace) -> DecodeConfig:
    """The run's decode settings with the flags of `add_decode_arguments` applied."""
    if args.static_step or args.compile_step:
        config = dataclasses.replace(config, static_step=True, compile_step=args.compile_step or config.compile_step)
    if args.length_penalty is not None:
        config = dataclasses.replace(config, length_penalty=args.length_penalty)
    return config
