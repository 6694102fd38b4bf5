"""Show a preset's (or a config file's) model shape and parameter count."""

from __future__ import annotations

import argparse
import json

from tformer.config import PRESETS, config_to_dict, preset
from tformer.model import Transformer, count_parameters

HELP = "show the shape and parameter count of a model preset"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="base", choices=list(PRESETS), help="model preset (default: base)")
    parser.add_argument("--vocab-size", type=int, default=37000, help="joint vocabulary size (default: 37000)")


def run(args: argparse.Namespace) -> int:
    config = preset(args.preset, src_vocab_size=args.vocab_size, tgt_vocab_size=args.vocab_size)
    model = Transformer(config)
    print(json.dumps({"preset": args.preset, "parameters": count_parameters(model), **config_to_dict(config)}))
    return 0
