"""`-` as a text file's name means standard input (or output), as it does to Unix tools: `--input -`,
`--src -`, `--output -`. One place for it, used by every command that reads or writes text files.

An input `-` becomes /dev/stdin, which every reader that takes a path can open (and which names where a
line came from in an error); an output `-` becomes None, the command's default: standard output, written
in place (no OUTPUT.partial beside it). A file named `-` is still reachable as `./-`."""

from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import Iterable
from pathlib import Path

from tformer.cli.argument_types import path_text

STANDARD_STREAM = "-"
STANDARD_INPUT = Path("/dev/stdin")


def input_file(text: str) -> Path:
    """The argparse type of a text file to read: `-` is standard input, refused while the flags are parsed when
    there is none (started with `<&-`)."""
    path = path_text(text)
    if path != STANDARD_STREAM:
        return Path(path)
    if sys.stdin is None:
        raise argparse.ArgumentTypeError("- is standard input, which is closed; give a file, or pipe the text in")
    return STANDARD_INPUT


def output_file(text: str) -> Path | None:
    """The argparse type of a text file to write: `-` is standard output (None, the flag's default), as is a
    name of the regular file standard output already writes (/dev/stdout with `> FILE`: the file, existing, was
    refused as an output to keep, though the shell had just emptied it for this command)."""
    path = path_text(text)
    return None if path == STANDARD_STREAM or _is_standard_output(Path(path)) else Path(path)


def _is_standard_output(path: Path) -> bool:
    """Whether `path` names the regular file open as this process's standard output (a device or a pipe is
    written in place as it is, and keeps the name given in messages)."""
    try:
        status = os.stat(path)
        return (
            sys.stdout is not None
            and stat.S_ISREG(status.st_mode)
            and os.path.samestat(status, os.fstat(sys.stdout.fileno()))
        )
    except (OSError, ValueError, AttributeError):  # no such file; a stdout without a descriptor (a notebook)
        return False


def file_beside_stdout(text: str) -> Path:
    """The argparse type of a text file to write by a command whose standard output holds something else
    (evaluate's scores): `-` is refused, rather than mixed into it or taken as a file's name."""
    path = path_text(text)
    if path == STANDARD_STREAM:
        raise argparse.ArgumentTypeError("- (standard output) holds the command's results; give a file")
    return Path(path)


def check_standard_input_once(inputs: Iterable[tuple[str, Path | None]]) -> None:
    """At most one of `inputs` (flag, path) is standard input: it can be read only once, and the second
    reader would find it empty (`--src - --ref -`)."""
    flags = [flag for flag, path in inputs if path == STANDARD_INPUT]
    if len(flags) > 1:
        raise ValueError(f"{flags[0]} and {flags[1]} are both standard input (-), which can be read once; give files")
