"""Translate text with a trained run: one line in, one line out (stdin to stdout by default).

Input is read and translated in chunks of the lines that are ready (at most 256), and each translation
is written (and flushed) as soon as its chunk is done, so the command works in a pipe and interactively:
a line is translated as soon as it arrives. Input must be UTF-8; an empty line gives an empty line.
With --nbest K (or --set decode.nbest=K), each input line gives K lines `index ||| text ||| score`
(index counts input lines from 0).

--output FILE is written as FILE.partial, renamed to FILE once every line is translated: a job that
stops (an error, Ctrl-C, a kill) leaves FILE.partial holding the translations of the chunks finished
before it (up to 256 lines each), whole lines only, and never a FILE that looks complete; an error, Ctrl-C
or SIGTERM (what kill and timeout send) ends with one line that says how many. An existing FILE
(or FILE.partial) is kept unless --overwrite is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

from tformer.cli.argument_types import positive_integer
from tformer.cli.decode_options import (
    add_decode_arguments,
    apply_decode_arguments,
    apply_decode_settings,
    decode_flags_named,
    decode_settings,
)
from tformer.cli.ensemble_option import add_ensemble_argument, model_with_ensemble
from tformer.cli.output_paths import check_not_an_input, check_replaced_output, check_stdout
from tformer.config import DecodeConfig
from tformer.termination import sigterm_as_interrupt

HELP = "translate text with a trained run (stdin to stdout by default)"
PARTIAL = ".partial"  # suffix of --output while it is written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory or one checkpoint directory")
    parser.add_argument(
        "--which", choices=["best", "last"], default="best", help="checkpoint of a run directory (default: best)"
    )
    parser.add_argument("--input", default=None, help="input text file, one sentence per line (default: stdin)")
    parser.add_argument(
        "--output", default=None, help="output file, written as OUTPUT.partial until complete (default: stdout)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    parser.add_argument(
        "--beam",
        type=positive_integer,
        default=None,
        help="beam size (default: the run's decode config; one too large for the memory is refused: "
        "docs/decoding.md, Memory)",
    )
    parser.add_argument(
        "--nbest",
        type=positive_integer,
        default=None,
        help="print the K best as 'index ||| text ||| score' (beam search: a beam of K or more; sampling: K "
        "samples; default: the best alone, as text)",
    )
    parser.add_argument(
        "--max-batch-tokens", type=positive_integer, default=4096, help="source tokens per batch (default: 4096)"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    add_decode_arguments(parser)
    add_ensemble_argument(parser)


def run(args: argparse.Namespace) -> int:
    from tformer.decoding.pipeline import Translator
    from tformer.runtime import resolve_device
    from tformer.training.checkpoint_load import load_run

    settings = decode_settings(args.decode_settings)
    _check_input(args.input)
    output, partial = _output_files(args)
    device = resolve_device(args.device, setting="--device")
    loaded = load_run(args.run_dir, which=args.which, device=device)
    config = apply_decode_settings(loaded.experiment.decode, settings)
    with decode_flags_named(args):  # the flags come after --set: an error names the flag that set the key
        config = _apply_flags(config, settings, args)
    nbest_lines = args.nbest is not None or "nbest" in settings  # --set decode.nbest=K asks for the K best too
    model = model_with_ensemble(loaded, args, device)
    translator = Translator(
        model, loaded.tokenizer, config, device=device, max_batch_tokens=args.max_batch_tokens, truncate=args.truncate
    )
    written = 0  # input lines whose translations are written
    try:
        with ExitStack() as stack:
            stack.enter_context(sigterm_as_interrupt())  # `kill` and `timeout` say what was kept, as Ctrl-C does
            source = stack.enter_context(open(args.input, "rb")) if args.input else sys.stdin
            if partial:  # a new folder is made, as evaluate and align make theirs
                partial.parent.mkdir(parents=True, exist_ok=True)
            target = stack.enter_context(open(partial or output, "w", encoding="utf-8")) if output else sys.stdout
            for index, translations in enumerate(_translations(translator, source)):
                if not nbest_lines:
                    target.write(translations[0].text + "\n")
                else:
                    target.writelines(f"{index} ||| {t.text} ||| {t.score:.4f}\n" for t in translations)
                target.flush()
                written = index + 1
    except (KeyboardInterrupt, ValueError, OSError) as error:
        if partial is None:
            raise
        if written == 0:  # nothing to keep
            partial.unlink(missing_ok=True)
            raise
        kept = f"the translations of the first {written} input lines are in {partial}"
        if isinstance(error, KeyboardInterrupt):
            raise KeyboardInterrupt(kept) from None
        raise ValueError(f"{str(error).splitlines()[0]}; {kept}") from None
    if partial:
        os.replace(partial, output)
    return 0


def _apply_flags(config: DecodeConfig, settings: dict[str, object], args: argparse.Namespace) -> DecodeConfig:
    """The decode settings (the run's, with --set's `settings`) with --beam, --nbest and the decoding
    flags applied; --nbest over the beam is refused naming where the beam came from."""
    if args.beam is not None:
        _check_set_nbest_fits(config, settings, args)
        nbest = config.nbest if config.sampling else min(config.nbest, args.beam)  # samples: any number, any beam
        config = dataclasses.replace(config, beam_size=args.beam, nbest=nbest)
    if args.nbest is not None:
        # (beam search returns at most beam_size; DecodeConfig's own error names beam_size, not the flag)
        if args.nbest > config.beam_size and not config.sampling:
            if args.beam is not None:
                beam = f"--beam {args.beam}"
            elif "beam_size" in settings:
                beam = f"--set decode.beam_size={config.beam_size}"
            else:
                beam = f"the run's decode.beam_size {config.beam_size}"
            raise ValueError(
                f"--nbest {args.nbest} needs a beam of at least {args.nbest}, not {beam}: give --beam {args.nbest}"
            )
        config = dataclasses.replace(config, nbest=args.nbest)
    return apply_decode_arguments(config, args)


def _check_set_nbest_fits(config: DecodeConfig, settings: dict[str, object], args: argparse.Namespace) -> None:
    """--beam lowers the run's nbest to the beam, but not one that --set decode.nbest asked for (unless
    --nbest replaces it): a beam search returns at most the beam, so it is refused naming both as typed."""
    if args.nbest is not None or "nbest" not in settings or config.sampling or config.nbest <= args.beam:
        return
    raise ValueError(
        f"--set decode.nbest={config.nbest} needs a beam of at least {config.nbest}, not --beam {args.beam}: "
        f"give --beam {config.nbest}, or a smaller decode.nbest"
    )


def _check_input(path: str | None) -> None:
    """--input names a file that exists, said before the model is loaded (instead of an `[Errno 2]` after)."""
    if path is None:
        return
    if not Path(path).exists():
        raise ValueError(f"--input {path}: no such file")
    if Path(path).is_dir():
        raise ValueError(f"--input {path} is a directory; give a text file, one sentence per line")


def _output_files(args: argparse.Namespace) -> tuple[Path | None, Path | None]:
    """--output and the OUTPUT.partial written until it is complete, after the checks that need no model;
    (None, None) for stdout. A device or a pipe (/dev/stdout, a FIFO) is written in place, without
    OUTPUT.partial: it holds nothing to keep. A symbolic link is written through (the file it names is
    replaced, with its .partial beside it; the link stays), as `write_atomic` writes the other outputs."""
    if args.output is None:
        check_stdout("translate", output_flag="--output")
        return None, None
    output = Path(args.output)
    check_not_an_input(output, "--output", [("--input", args.input)])
    if output.is_symlink():
        output = output.resolve()
    partial = output.with_name(output.name + PARTIAL)
    return output, partial if check_replaced_output(output, overwrite=args.overwrite, beside=(partial,)) else None


def _translations(translator: Any, source: IO | None) -> Iterator[list[Any]]:
    """The n-best lists of the input's lines, translated in chunks of the lines that are ready on its file
    descriptor (at most the translator's chunk_lines); a stream without one (stdin replaced by a string
    buffer, as in tests or an embedding program) is read in the translator's fixed chunks."""
    from tformer.cli.line_input import ready_chunks

    if source is None:  # started with standard input closed (`<&-`)
        raise ValueError("there is no standard input: give --input FILE, or pipe text into tformer translate")
    try:
        fd = source.fileno()
    except (AttributeError, OSError):  # io.UnsupportedOperation is an OSError
        return translator.translate(line.rstrip("\r\n") for line in source)
    return translator.translate_chunks(ready_chunks(fd, translator.chunk_lines))
