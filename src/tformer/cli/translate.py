"""Translate text with a trained run: one line in, one line out (stdin to stdout by default, or when given as
`-`: --input -, --output -).

Input is read and translated in chunks of the lines that are ready (at most 1,024), and each translation
is written (and flushed) as soon as its chunk is done, so the command works in a pipe and interactively:
a line is translated as soon as it arrives. Input must be UTF-8; an empty line gives an empty line.
With --nbest K (or --set decode.nbest=K), each input line gives K lines `index ||| text ||| score`
(index counts input lines from 0).

--output FILE is written as FILE.partial, renamed to FILE once every line is translated (and fsynced): a job that
stops (an error, Ctrl-C, a kill) leaves FILE.partial holding the translations of the chunks finished
before it (up to 1,024 lines each), whole lines only, and never a FILE that looks complete; an error, Ctrl-C
or SIGTERM (what kill and timeout send) ends with one line that says how many. An existing FILE
(or FILE.partial) is kept unless --overwrite is given; a FILE.partial that another command is writing
(locked) is never written.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn, TextIO

try:
    import fcntl
except ImportError:  # Windows: no flock; OUTPUT.partial is then created exclusively only
    fcntl = None  # type: ignore[assignment]

from tformer.atomic_file import fsync_file, names_open_file, parents_made
from tformer.cli.argument_types import path_text, positive_integer
from tformer.cli.decode_options import (
    add_decode_arguments,
    add_dtype_argument,
    command_translator,
    decode_settings,
    error_line,
    merged_decode_config,
)
from tformer.cli.ensemble_option import add_ensemble_argument
from tformer.cli.out_of_memory import is_out_of_memory, out_of_memory_line
from tformer.cli.output_paths import check_not_an_input, check_replaced_output, check_stdout
from tformer.cli.standard_streams import STANDARD_INPUT, input_file, output_file
from tformer.config import config_to_dict
from tformer.termination import sigterm_as_interrupt

HELP = "translate text with a trained run (stdin to stdout by default)"
PARTIAL = ".partial"  # suffix of --output while it is written
NAME_MAX = 255  # bytes of a file's name on Linux, macOS and Windows file systems


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dir", type=path_text, metavar="RUN_DIR", help="a run directory or one checkpoint directory"
    )
    parser.add_argument(
        "--which", choices=["best", "last"], default="best", help="checkpoint of a run directory (default: best)"
    )
    parser.add_argument(
        "--input",
        type=input_file,
        default=None,
        help="input text file, one sentence per line (default, or -: stdin)",
    )
    parser.add_argument(
        "--output",
        type=output_file,
        default=None,
        help="output file, written as OUTPUT.partial until complete (default, or -: stdout)",
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
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N (default: cpu)")
    add_dtype_argument(parser)
    add_decode_arguments(parser)
    add_ensemble_argument(parser)


def run(args: argparse.Namespace) -> int:
    from tformer.runtime import resolve_decode_dtype, resolve_device
    from tformer.training.checkpoint_load import load_run

    settings = decode_settings(args.decode_settings)
    _check_input(args.input)
    output, partial = _output_files(args)
    device = resolve_device(args.device, setting="--device")
    dtype = resolve_decode_dtype(args.dtype, device)
    loaded = load_run(args.run_dir, which=args.which, device=device, dtype=dtype)
    # the flags come after --set, and the merged settings are checked once: an error names what was typed
    changes = _search_changes({**config_to_dict(loaded.experiment.decode), **settings}, settings, args)
    config = merged_decode_config(loaded.experiment.decode, settings, changes, args)
    nbest_lines = args.nbest is not None or "nbest" in settings  # --set decode.nbest=K asks for the K best too
    translator = command_translator(loaded, config, args, device)
    progress = _Progress()
    with _claimed(partial, output, overwrite=args.overwrite) as claim:
        try:
            _write_translations(translator, args, _Target(claim, output, partial), nbest_lines, progress)
        except (KeyboardInterrupt, ValueError, OSError, MemoryError, RuntimeError) as error:
            _raise_saying_what_is_kept(error, partial, progress.lines, args)
        if partial and output:
            _rename_complete(partial, output, overwrite=args.overwrite)
    return 0


@dataclass
class _Progress:
    lines: int = 0  # input lines whose translations are written


@dataclass(frozen=True)
class _Target:
    claim: int | None  # OUTPUT.partial's locked descriptor (`_claimed`)
    output: Path | None  # None: standard output
    partial: Path | None


def _write_translations(
    translator: Any, args: argparse.Namespace, target: _Target, nbest_lines: bool, progress: _Progress
) -> None:
    """Translate the input chunk by chunk, writing (and flushing) each chunk's lines as soon as it is done."""
    with ExitStack() as stack:
        stack.enter_context(sigterm_as_interrupt())  # `kill` and `timeout` say what was kept, as Ctrl-C does
        reads_a_file = args.input not in (None, STANDARD_INPUT)  # stdin is read as it is: a socket has no path
        source = stack.enter_context(open(args.input, "rb")) if reads_a_file else sys.stdin
        where = str(target.partial or target.output or "standard output")
        out: TextIO = sys.stdout
        if target.output:
            out = _open_output(target.claim, target.output)
            stack.callback(_close, out, where)
        for index, translations in enumerate(_translations(translator, source)):
            if not nbest_lines:
                _write(out, [translations[0].text + "\n"], where)
            else:
                _write(out, [f"{index} ||| {t.text} ||| {t.score:.4f}\n" for t in translations], where)
            progress.lines = index + 1


def _raise_saying_what_is_kept(
    error: BaseException, partial: Path | None, written: int, args: argparse.Namespace
) -> NoReturn:
    """Re-raise a failed or interrupted translation; where OUTPUT.partial holds lines, with one line that
    says how many (an OUTPUT.partial with none is removed)."""
    out_of_memory = is_out_of_memory(error)
    if partial is not None and written == 0:  # nothing to keep
        partial.unlink(missing_ok=True)
    if partial is None or (isinstance(error, RuntimeError) and not out_of_memory) or written == 0:
        raise error
    kept = f"the translations of the first {written} input lines are in {partial}"
    if isinstance(error, KeyboardInterrupt):
        raise KeyboardInterrupt(kept) from None
    line = out_of_memory_line(error) if out_of_memory else error_line(error, args)
    raise ValueError(f"{line}; {kept}") from None


@contextmanager
def _claimed(partial: Path | None, output: Path | None, *, overwrite: bool) -> Iterator[int | None]:
    """OUTPUT.partial, created (or, with --overwrite, emptied) and locked (`flock`) by this process until it
    is renamed: two commands given one --output at once both passed the check of existing files while their
    models loaded, then wrote into one OUTPUT.partial, and the first to finish renamed it with the other's
    lines in it. The lock goes with the process however it ends, so a killed writer blocks no one. Yields
    the locked descriptor (None without OUTPUT.partial: standard output, a device or a pipe)."""
    if partial is None or output is None:
        yield None
        return
    busy = f"--output {output}: another process is writing {partial} now; wait for it to end, or choose another file"
    with parents_made(partial):  # as evaluate and align make theirs; a failure that keeps no lines removes them
        try:
            claim = os.open(partial, os.O_WRONLY | os.O_CREAT | (0 if overwrite else os.O_EXCL), 0o666)
        except FileExistsError:
            raise ValueError(busy) from None  # it was not there when the command started
        try:
            try:
                if fcntl is not None:
                    fcntl.flock(claim, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ValueError(busy) from None
            if not names_open_file(partial, claim):  # its writer renamed it meanwhile
                raise ValueError(busy)
            os.ftruncate(claim, 0)
            yield claim
        finally:
            os.close(claim)  # after the rename: it lets another writer take OUTPUT.partial


def _open_output(claim: int | None, output: Path) -> TextIO:
    """The file the translations go to: OUTPUT.partial through a descriptor of its own (closing it keeps the
    lock, which `_claimed` holds until the rename), else a device or a pipe, written in place."""
    if claim is not None:
        return os.fdopen(os.dup(claim), "w", encoding="utf-8")
    return open(output, "w", encoding="utf-8")


def _rename_complete(partial: Path, output: Path, *, overwrite: bool) -> None:
    """Give the complete OUTPUT.partial its name once its lines are on the disk (as `write_atomic` does the
    other commands' outputs): renamed unsynced, a crash soon after could leave an empty or truncated file in
    place of the one --overwrite replaced. A failed fsync keeps OUTPUT.partial, and says which file it was;
    so does an OUTPUT that another process wrote meanwhile, which only --overwrite replaces."""
    with _failed_write_named(str(partial)):
        fsync_file(partial)
    if output.exists() and not overwrite:
        raise ValueError(
            f"--output {output} was written by another process while this one translated; the translations are "
            f"in {partial} (rename it to replace {output})"
        )
    os.replace(partial, output)


@contextmanager
def _failed_write_named(where: str) -> Iterator[None]:
    """A failed write (a full disk, /dev/full) names what was being written, which the OSError alone does
    not ("[Errno 28] No space left on device"). A reader that went away (`| head`) is no error: its
    BrokenPipeError passes as it is."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as error:
        raise OSError(f"could not write {where} ({error.strerror or error})") from None


def _write(target: TextIO, lines: list[str], where: str) -> None:
    with _failed_write_named(where):
        target.writelines(lines)
        target.flush()


def _close(target: TextIO, where: str) -> None:
    """Close the output file: its last flush may fail as a write does (after a failed write, the lines it
    still holds fail again)."""
    with _failed_write_named(where):
        target.close()


def _search_changes(values: dict[str, Any], settings: dict[str, object], args: argparse.Namespace) -> dict[str, Any]:
    """--beam and --nbest as changes to the decode settings `values` (the run's, with --set's `settings`):
    --beam lowers the run's own nbest to the beam (a beam search returns at most the beam), but an nbest
    that was asked for over the beam is refused naming both as typed (DecodeConfig's own error names
    beam_size)."""
    changes = {key: value for key, value in (("beam_size", args.beam), ("nbest", args.nbest)) if value is not None}
    if _nbest_over_the_beam({**values, **changes}):
        _refuse_an_asked_nbest({**values, **changes}, settings, args)
        if args.beam is not None:  # the run's own nbest
            changes["nbest"] = args.beam
    return changes


def _nbest_over_the_beam(values: dict[str, Any]) -> bool:
    """A beam search asked for more than the beam returns (sampling draws nbest paths, whatever the beam);
    a value of the wrong type or under 1 is left to the check of the merged settings, which names it."""
    nbest, beam, sampling = values["nbest"], values["beam_size"], values["sampling"]
    return type(nbest) is int and type(beam) is int and sampling is False and 1 <= beam < nbest


def _refuse_an_asked_nbest(values: dict[str, Any], settings: dict[str, object], args: argparse.Namespace) -> None:
    """An nbest over the beam (`values`) that --nbest or --set decode.nbest asked for, refused naming both."""
    nbest, beam = values["nbest"], _beam_as_typed(values, settings, args)
    if args.nbest is not None:
        raise ValueError(f"--nbest {nbest} needs a beam of at least {nbest}, not {beam}: give --beam {nbest}")
    if "nbest" in settings:
        raise ValueError(
            f"--set decode.nbest={nbest} needs a beam of at least {nbest}, not {beam}: give --beam {nbest}, "
            "or a smaller decode.nbest"
        )


def _beam_as_typed(values: dict[str, Any], settings: dict[str, object], args: argparse.Namespace) -> str:
    """Where the beam came from, as typed: --beam N, --set decode.beam_size=N or the run's."""
    if args.beam is not None:
        return f"--beam {args.beam}"
    if "beam_size" in settings:
        return f"--set decode.beam_size={values['beam_size']}"
    return f"the run's decode.beam_size {values['beam_size']}"


def _check_input(path: Path | None) -> None:
    """--input names a file that exists, said before the model is loaded (instead of an `[Errno 2]` after)."""
    if path in (None, STANDARD_INPUT):
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
    if len(os.fsencode(partial.name)) > NAME_MAX and len(os.fsencode(output.name)) <= NAME_MAX:
        raise ValueError(
            f"--output: {output.name} is written as {output.name}{PARTIAL} until it is complete, a name over the "
            f"{NAME_MAX} bytes a file system takes; choose a name of at most {NAME_MAX - len(PARTIAL)} bytes"
        )
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
