"""Import a Hugging Face MarianMT directory (an OPUS-MT model, for instance) as a tformer run.

    hf download Helsinki-NLP/opus-mt-en-de --local-dir opus-mt-en-de
    tformer import-hf opus-mt-en-de --out runs/opus-en-de
    echo "How are you?" | tformer translate runs/opus-en-de

The directory needs config.json, model.safetensors or pytorch_model.bin (read without unpickling; or
their shards and index.json), source.spm, target.spm and vocab.json; decoding settings come from
generation_config.json. See docs/interop.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tformer.cli.argument_types import path_text
from tformer.cli.extras import require
from tformer.cli.output_paths import check_output_dir, check_outside
from tformer.input_paths import check_input_dir
from tformer.termination import sigterm_as_interrupt

HELP = "import a Hugging Face MarianMT (OPUS-MT) directory as a tformer run directory"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "hf_dir", type=path_text, metavar="HF_DIR", help="a local Hugging Face MarianMT model directory"
    )
    parser.add_argument(
        "--out",
        type=path_text,
        required=True,
        help="run directory to create (must not exist, or be empty; not inside HF_DIR)",
    )


def run(args: argparse.Namespace) -> int:
    check_output_dir(Path(args.out))  # first, as every command does: a path under a file is one line
    check_input_dir(args.hf_dir, f"HF_DIR {args.hf_dir}", holding="Hugging Face model")  # named as an argument
    check_outside(Path(args.out), "--out", directory=Path(args.hf_dir), name="Hugging Face directory")
    require(["transformers"], command="import-hf", extra="hf")
    from tformer.interop.hf_import import import_hf

    with sigterm_as_interrupt():  # `kill` and `timeout` leave no staging directory behind, as Ctrl-C does
        imported = import_hf(args.hf_dir, args.out)
    half = [dtype for dtype in imported.stored_dtypes if dtype != "float32"]
    note = ""
    if half:  # Hugging Face (transformers 5) computes in the stored type unless told dtype=torch.float32
        note = f" (weights stored as {', '.join(half)} in {args.hf_dir}, imported exactly as float32)"
    print(f"wrote {imported.run_dir}{note}")
    return 0
