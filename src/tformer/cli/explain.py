"""A walk-through of the Transformer on a tiny example (4 tokens, d_model 8, 2 heads), every number
computed by tformer's own modules: input vectors, q/k/v, scores, softmax, weighted sums, the matrix
form, heads, one encoder block, the causal mask, cross-attention, the cross-entropy of a training
step (plain and label-smoothed) with the paper's learning-rate schedule, and autoregressive decoding,
each checked against the module that computes it in the real model. --out also writes figures (PNG):
figures of an earlier --out in that directory are kept unless --overwrite is given."""

from __future__ import annotations

import argparse

from tformer.cli.argument_types import path_argument, seed_below
from tformer.cli.output_paths import check_replaced_files, check_stdout

HELP = "walk through the Transformer on a tiny example, step by step, with every number printed"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # torch.Generator takes a signed 64-bit seed
    parser.add_argument("--seed", type=seed_below(63), default=0, help="seed of the toy model's weights (default: 0)")
    parser.add_argument("--out", type=path_argument, help="directory to write the figures (PNG) into")
    parser.add_argument("--overwrite", action="store_true", help="replace figures that --out already holds")


def run(args: argparse.Namespace) -> int:
    from tformer.explain import walkthrough
    from tformer.explain_report import FIGURE_NAMES, render, save_figures

    check_stdout("explain")  # the walk-through is printed
    if args.out is not None:
        check_replaced_files(args.out, FIGURE_NAMES, overwrite=args.overwrite)  # before printing anything
    result = walkthrough(args.seed)
    print(render(result), end="")
    if args.out is not None:
        for path in save_figures(result, args.out):
            print(path)
    return 0
