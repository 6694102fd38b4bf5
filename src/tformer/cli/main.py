"""Entry point of the `tformer` command. No logic here: each subcommand module parses its own
arguments and calls the library. User errors become one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import codecs
import os
import signal
import sys
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from types import ModuleType
from typing import NoReturn

from tformer import __version__
from tformer.cli import (
    align,
    attention,
    average,
    demo,
    download,
    evaluate,
    explain,
    export,
    import_hf,
    info,
    plot,
    serve,
    train,
    translate,
)
from tformer.cli.decode_options import error_line
from tformer.cli.out_of_memory import is_out_of_memory, out_of_memory_line
from tformer.termination import import_torch, sigterm_as_interrupt

# Each entry: (name, module). The module has HELP (one line), add_arguments(parser) and run(args) -> int;
# importing it and building its parser loads no heavy library (run imports what the command needs).
COMMANDS: list[tuple[str, ModuleType]] = [
    ("demo", demo),
    ("train", train),
    ("translate", translate),
    ("evaluate", evaluate),
    ("average", average),
    ("download", download),
    ("info", info),
    ("explain", explain),
    ("attention", attention),
    ("align", align),
    ("plot", plot),
    ("serve", serve),
    ("export", export),
    ("import-hf", import_hf),
]
TORCH_FREE_COMMANDS = ("download",)  # every other command loads torch first, whole (see `import_torch`)
# the commands that take SIGTERM like Ctrl-C (`sigterm_as_interrupt`): from the start, torch's import included
SIGTERM_INTERRUPTS = ("train", "translate", "average", "export", "import-hf")


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse's parser, whose errors are one line like every other error of the command (argparse prints
    the whole usage block first); the subcommands' parsers are of the same class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


class CommandParser(OneLineErrorParser):
    """The parser of one command. Every word after the command's name is its own, so a word it does not
    know is its error (`tformer COMMAND: unrecognized arguments: ...`); argparse would hand it back to
    the top-level parser, whose error names neither the command nor the help that lists its flags."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="tformer",
        description="The Transformer of 'Attention Is All You Need': train, translate, evaluate, explain, serve.",
    )
    parser.add_argument("--version", action="version", version=f"tformer {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=CommandParser)
    for name, module in COMMANDS:
        # the module docstrings are laid out by hand (paragraphs, example commands): keep their lines
        sub = subparsers.add_parser(
            name, help=module.HELP, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        # a SIGTERM held while torch loads is then an interrupt too, not the end of the process (status -15)
        with sigterm_as_interrupt() if args.command in SIGTERM_INTERRUPTS else nullcontext():
            if args.command not in TORCH_FREE_COMMANDS:
                _check_working_directory()
                import_torch()
            return int(args.run(args) or 0)
    except KeyboardInterrupt as interrupt:  # a TrainingInterrupted says what the run kept
        print(f"interrupted: {interrupt}" if str(interrupt) else "interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): end quietly, as SIGPIPE ends a Unix tool
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return CLOSED_PIPE_STATUS  # not 0: the work was cut short (which `set -o pipefail` then sees)
    except (ValueError, OSError) as error:  # user errors: one line, no traceback
        print(f"error: {_shortened(_unwritable_output(error) or error_line(error, args))}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as error:  # what was asked for does not fit (--beam 100000, say)
        if not is_out_of_memory(error):
            raise  # a bug: its traceback says where
        print(f"error: {out_of_memory_line(error)}", file=sys.stderr)
        return 2


def _check_working_directory() -> None:
    """Refuse a current directory that was removed (a shell still in it): torch cannot load there, and said
    so as "Intel oneMKL FATAL ERROR: Cannot load .../libtorch_cpu.so", as if the installation were broken."""
    try:
        os.getcwd()
    except FileNotFoundError:
        raise ValueError("the current directory no longer exists (it was removed): cd to one that does") from None


CLOSED_PIPE_STATUS = 128 + signal.SIGPIPE  # 141: what a shell reports of a tool SIGPIPE ended (`yes | head -1`)
MESSAGE_ENDS = 500  # characters kept at each end of an error message too long to read


def _shortened(message: str) -> str:
    """`message` with its middle left out when it is very long: a value quoted from a received file (a 10 MB
    string in experiment.json) made a 10 MB error line. Its start names the file and setting, its end the way
    out: both stay."""
    if len(message) <= 3 * MESSAGE_ENDS:
        return message
    left_out = len(message) - 2 * MESSAGE_ENDS
    return f"{message[:MESSAGE_ENDS]} ... ({left_out:,} characters left out) ... {message[-MESSAGE_ENDS:]}"


def _unwritable_output(error: BaseException) -> str | None:
    """What to do when standard output's encoding cannot write the text (PYTHONIOENCODING=ascii, a C locale
    with PYTHONUTF8=0, a Latin-1 locale: a translation in German or Chinese); Python's message names the
    character but not the way out. None for any other error (a UTF-8 output's, which writes every character)."""
    stdout_encoding = getattr(sys.stdout, "encoding", None)
    if not isinstance(error, UnicodeEncodeError) or not stdout_encoding:
        return None
    encoding = codecs.lookup(stdout_encoding).name
    if encoding != codecs.lookup(error.encoding).name or encoding == "utf-8":
        return None
    character = error.object[error.start : error.start + 1]
    return (
        f"standard output's encoding ({stdout_encoding}) cannot write {character!r}: set PYTHONIOENCODING=utf-8 "
        "(or a UTF-8 locale, e.g. LC_ALL=C.UTF-8), or write to a file (translate --output FILE is UTF-8)"
    )


def _one_line_warning(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> str:
    """Warnings on the command line read like the errors: one line, no file name or source line."""
    return f"warning: {str(message).splitlines()[0]}\n"


def program(argv: list[str] | None = None) -> NoReturn:
    """`main` as a program: exit with its status. A process of a torchrun job (WORLD_SIZE > 1) exits at
    once after flushing its output: left to the interpreter's teardown, the threads of a process group
    whose peer has gone are destroyed while still joinable, and about one such exit in eight aborted
    ("terminate called without an active exception", SIGABRT) instead of exiting with its status."""
    code = main(argv)
    _forget_caught_interrupt()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _forget_caught_interrupt() -> None:
    """Run as `python -m tformer`, CPython 3.11 ended an interrupted command by SIGINT, not with the status
    130 that `main` returned, when the interrupt came at an unlucky moment (3 of 40 SIGTERMs in the first
    1.5 s of `train`, 1 in 40 later on, as a checkpoint's validation imports decoding): a KeyboardInterrupt
    (Ctrl-C, or SIGTERM in train and translate) that leaves a string `exec`/`eval` (the methods a dataclass
    makes as a module is imported: thousands while torch loads) sets a "KeyboardInterrupt unhandled" flag,
    caught or not, and Py_RunMain kills the process by SIGINT at exit when it is set. The next string exec
    clears it; `main` returned, so no interrupt is unhandled. (The `tformer` script exits another way, with
    its status.)"""
    exec("pass", {})


if __name__ == "__main__":
    program()
