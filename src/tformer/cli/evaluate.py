"""Translate a test set with a trained run and score it against references with sacreBLEU.

Prints cased BLEU, lowercased BLEU and chrF, each with its sacreBLEU signature; --json prints one JSON object
instead (keys bleu, bleu_lowercase, chrf and their signatures bleu_signature, bleu_lowercase_signature,
chrf_signature, with checkpoint, step and ensemble).
Decoding uses the run's [decode] settings, changed by --set decode.KEY=VALUE, --beam and the flags below.
Several --ref files score against several references per line (sacreBLEU's multi-reference BLEU and
chrF). --output keeps the translations, one line per source line (written once all are translated;
an existing file is kept unless --overwrite).

BLEU splits words with sacreBLEU's --tokenize (default: the run's train.bleu_tokenize, 13a unless set).
Text written without spaces needs zh (Chinese), ja-mecab (Japanese, pip install 'sacrebleu[ja]'),
ko-mecab (Korean, 'sacrebleu[ko]') or char: under 13a a Chinese or Japanese sentence is one word, and
the command warns when the references look like that.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from tformer.cli.argument_types import path_argument, positive_integer
from tformer.cli.decode_options import (
    add_decode_arguments,
    add_dtype_argument,
    command_translator,
    decode_settings,
    merged_decode_config,
)
from tformer.cli.ensemble_option import add_ensemble_argument
from tformer.cli.output_paths import check_not_an_input, check_replaced_output, check_stdout
from tformer.cli.standard_streams import check_standard_input_once, file_beside_stdout, input_file
from tformer.config import BLEU_TOKENIZE

if TYPE_CHECKING:
    from tformer.evaluation import Scores
    from tformer.training.checkpoint_load import LoadedRun

HELP = "translate a test set and report BLEU, lowercased BLEU and chrF"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dir", type=path_argument, metavar="RUN_DIR", help="a run directory or one checkpoint directory"
    )
    parser.add_argument("--src", type=input_file, required=True, help="source sentences, one per line (-: stdin)")
    parser.add_argument(
        "--ref",
        type=input_file,
        nargs="+",
        action="extend",  # --ref A --ref B as --ref A B: argparse's default would keep only B
        required=True,
        help="reference translations, aligned with --src; several files (--ref A B or --ref A --ref B): "
        "several references per line (-: stdin)",
    )
    parser.add_argument("--beam", type=positive_integer, help="beam size (default: the run's decode.beam_size)")
    parser.add_argument(
        "--which", choices=["best", "last"], default="best", help="checkpoint of a run directory (default: best)"
    )
    parser.add_argument(
        "--max-batch-tokens",
        type=positive_integer,
        default=4096,
        help="token budget of a decoding batch (default: 4096)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    add_dtype_argument(parser)
    add_decode_arguments(parser)
    add_ensemble_argument(parser)
    parser.add_argument(
        "--tokenize",
        choices=BLEU_TOKENIZE,
        help="sacreBLEU's word splitting for BLEU (default: the run's train.bleu_tokenize, 13a unless set); "
        "zh, ja-mecab, ko-mecab or char for text written without spaces",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--output",
        type=file_beside_stdout,
        help="also write the translations to this file, one per --src line (not -: stdout holds the scores)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")


def run(args: argparse.Namespace) -> int:
    from tformer.data.corpus import CorpusError, read_lines
    from tformer.evaluation import bleu_metric, reference_advice, score
    from tformer.runtime import resolve_decode_dtype, resolve_device
    from tformer.training.checkpoint_load import load_run

    check_stdout("evaluate")  # the scores are printed
    settings = decode_settings(args.decode_settings)
    check_standard_input_once([("--src", args.src), *(("--ref", path) for path in args.ref)])
    if args.output is not None:
        _check_output(args)
    sources = read_lines(args.src)
    reference_sets = [read_lines(path) for path in args.ref]
    for path, references in zip(args.ref, reference_sets, strict=True):
        if len(sources) != len(references):
            raise CorpusError(f"{args.src} has {len(sources)} lines but {path} has {len(references)}")
    device = resolve_device(args.device, setting="--device")
    dtype = resolve_decode_dtype(args.dtype, device)
    loaded = load_run(args.run_dir, which=args.which, device=device, dtype=dtype)
    tokenize = args.tokenize or loaded.experiment.train.bleu_tokenize
    bleu_metric(tokenize)  # a missing MeCab is reported before translating
    for line in reference_advice(reference_sets[0], tokenize, loaded.tokenizer):
        warnings.warn(line, UserWarning, stacklevel=1)
    # the flags come after --set, and the merged settings are checked once: an error names what was typed
    changes = {} if args.beam is None else {"beam_size": args.beam, "nbest": 1}  # the best alone is scored
    decode = merged_decode_config(loaded.experiment.decode, settings, changes, args)
    translator = command_translator(loaded, decode, args, device)
    hypotheses = translator.translate_texts(sources)
    scores = score(hypotheses, *reference_sets, tokenize=tokenize)
    _print_scores(args, loaded, scores)  # first: a --output that cannot be written (a full disk) keeps them
    if args.output is not None:
        _write_lines(args.output, hypotheses)
    return 0


def _print_scores(args: argparse.Namespace, loaded: LoadedRun, scores: Scores) -> None:
    if args.json:
        members = [str(path) for path in args.ensemble]
        header = {"checkpoint": str(loaded.checkpoint_dir), "step": loaded.step, "ensemble": members}
        print(json.dumps({**header, **scores.to_dict()}))
    else:
        print(f"checkpoint {loaded.checkpoint_dir} (step {loaded.step})")
        if args.ensemble:
            print("ensemble with " + ", ".join(str(path) for path in args.ensemble))
        print(scores.summary())


def _check_output(args: argparse.Namespace) -> None:
    """--output can be written and holds nothing to keep: checked before any translating."""
    check_not_an_input(args.output, "--output", [("--src", args.src), *(("--ref", path) for path in args.ref)])
    check_replaced_output(args.output, overwrite=args.overwrite)


def _write_lines(path: Path, lines: list[str]) -> None:
    """`lines` into `path`, which appears only once complete (see `write_atomic`)."""
    from tformer.atomic_file import parents_made, write_atomic

    with parents_made(path):  # a failed write leaves no new folder
        write_atomic(path, "".join(f"{line}\n" for line in lines).encode("utf-8"))
