"""Translate text with a trained run: one line in, one line out (stdin to stdout by default).

Input is read and translated in chunks, and each translation is written (and flushed) as soon as its
chunk is done, so the command works in a pipe. With --nbest K, each input line gives K lines
`index ||| text ||| score` (index counts input lines from 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from contextlib import ExitStack

from tformer.cli.decode_options import add_decode_arguments, apply_decode_arguments
from tformer.cli.ensemble_option import add_ensemble_argument, model_with_ensemble

HELP = "translate text with a trained run (stdin to stdout by default)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory")
    parser.add_argument("--input", default=None, help="input text file, one sentence per line (default: stdin)")
    parser.add_argument("--output", default=None, help="output file (default: stdout)")
    parser.add_argument("--beam", type=int, default=None, help="beam size (default: the run's decode config)")
    parser.add_argument("--nbest", type=int, default=None, help="print the K best as 'index ||| text ||| score'")
    parser.add_argument("--max-batch-tokens", type=int, default=4096, help="source tokens per batch (default: 4096)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    add_decode_arguments(parser)
    add_ensemble_argument(parser)


def run(args: argparse.Namespace) -> int:
    from tformer.decoding.pipeline import Translator
    from tformer.training.checkpoint import load_run

    loaded = load_run(args.run_dir, device=args.device)
    config = loaded.experiment.decode
    if args.beam is not None:
        config = dataclasses.replace(config, beam_size=args.beam, nbest=min(config.nbest, args.beam))
    if args.nbest is not None:
        config = dataclasses.replace(config, nbest=args.nbest)
    config = apply_decode_arguments(config, args)
    model = model_with_ensemble(loaded, args, args.device)
    translator = Translator(model, loaded.tokenizer, config, device=args.device, max_batch_tokens=args.max_batch_tokens)
    with ExitStack() as stack:
        source = stack.enter_context(open(args.input, encoding="utf-8")) if args.input else sys.stdin
        target = stack.enter_context(open(args.output, "w", encoding="utf-8")) if args.output else sys.stdout
        lines = (line.rstrip("\r\n") for line in source)
        for index, translations in enumerate(translator.translate(lines)):
            if args.nbest is None:
                target.write(translations[0].text + "\n")
            else:
                target.writelines(f"{index} ||| {t.text} ||| {t.score:.4f}\n" for t in translations)
            target.flush()
    return 0
