"""Word alignments from cross-attention for a file of sentence pairs, in Pharaoh format.

One line per pair: `i-j` links, source word i to target word j, 0-based, words being whitespace tokens.
The model reads each given target (teacher forcing); subword attention is summed over a source word's
pieces and averaged over a target word's; each target word links to the source word it attends to most.
The attention used is the average of all heads of one decoder layer: the penultimate by default
(`--layer` picks another; negative counts from the end). See docs/explain.md.

--out FILE is written once every pair is aligned, beside FILE and renamed into place; an existing FILE
is kept unless --overwrite is given.
"""

from __future__ import annotations

import argparse
import sys

from tformer.cli.argument_types import path_argument
from tformer.cli.output_paths import check_not_an_input, check_replaced_output, check_stdout
from tformer.cli.standard_streams import check_standard_input_once, input_file, output_file

HELP = "word alignments (Pharaoh i-j) from cross-attention for a file of sentence pairs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dir", type=path_argument, metavar="RUN_DIR", help="a run directory or one checkpoint directory"
    )
    parser.add_argument("--src", type=input_file, required=True, help="source sentences, one per line (-: stdin)")
    parser.add_argument("--tgt", type=input_file, required=True, help="target sentences, aligned with --src (-: stdin)")
    parser.add_argument("--out", type=output_file, help="write the alignments here (default, or -: standard output)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--layer", type=int, help="decoder layer to read (default: the penultimate)")
    parser.add_argument(
        "--which", choices=["best", "last"], default="best", help="checkpoint of a run directory (default: best)"
    )
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N (default: cpu)")


def run(args: argparse.Namespace) -> int:
    from tformer.align import align_files
    from tformer.atomic_file import parents_made, write_atomic
    from tformer.runtime import resolve_device
    from tformer.training.checkpoint_load import load_run

    check_standard_input_once([("--src", args.src), ("--tgt", args.tgt)])
    if args.out is None:
        check_stdout("align", output_flag="--out")
    else:
        check_not_an_input(args.out, "--out", [("--src", args.src), ("--tgt", args.tgt)])
        check_replaced_output(args.out, overwrite=args.overwrite, flag="--out")  # before loading the model
    loaded = load_run(args.run_dir, which=args.which, device=resolve_device(args.device, setting="--device"))
    lines = align_files(loaded.model, loaded.tokenizer, args.src, args.tgt, layer=args.layer)
    if args.out is None:
        for line in lines:
            print(line)
        sys.stdout.flush()
        return 0
    text = "".join(line + "\n" for line in lines)
    with parents_made(args.out):  # a failed write keeps the file that was there, and leaves no new folder
        write_atomic(args.out, text.encode("utf-8"))
    print(args.out)
    return 0
