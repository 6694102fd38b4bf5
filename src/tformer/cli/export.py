"""Export a run for other toolkits.

--to hf writes a Hugging Face MarianMT directory (config.json, model.safetensors, generation_config.json,
source.spm, target.spm, vocab.json, tokenizer_config.json) that `MarianMTModel.from_pretrained` and
`MarianTokenizer.from_pretrained` load. --to ctranslate2 converts that directory with CTranslate2's
TransformersConverter. Models Marian cannot express (pre-norm, learned positions, a layer-norm epsilon
other than 1e-5) are refused. See docs/interop.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tformer.cli.argument_types import path_text
from tformer.cli.extras import require
from tformer.cli.output_paths import check_output_dir, check_outside
from tformer.termination import sigterm_as_interrupt

HELP = "export a run as a Hugging Face MarianMT directory or a CTranslate2 model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=path_text, metavar="RUN_DIR", help="a training run (or checkpoint) directory")
    parser.add_argument("--to", required=True, choices=["hf", "ctranslate2"], help="output format")
    parser.add_argument(
        "--out",
        type=path_text,
        required=True,
        help="output directory (must not exist, or be empty; not inside RUN_DIR)",
    )
    parser.add_argument("--which", default="best", choices=["best", "last"], help="checkpoint (default: best)")


def run(args: argparse.Namespace) -> int:
    check_output_dir(Path(args.out))  # before loading anything: a path under a file is one line
    check_outside(Path(args.out), "--out", directory=Path(args.run_dir), name="run directory")
    if args.to == "hf":
        require(["transformers"], command="export --to hf", extra="hf")
    else:
        require(["transformers", "ctranslate2"], command="export --to ctranslate2", extra="ctranslate2")
    from tformer.interop.hf_export import export_ctranslate2, export_hf

    export = export_hf if args.to == "hf" else export_ctranslate2
    with sigterm_as_interrupt():  # `kill` and `timeout` leave no staging directory behind, as Ctrl-C does
        out = export(args.run_dir, args.out, which=args.which)
    print(f"wrote {out}")
    return 0
