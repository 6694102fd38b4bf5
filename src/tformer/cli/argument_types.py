"""argparse types shared by commands: the value is checked while the arguments are parsed, so an error
names the flag (`argument --seed: ...`) rather than the setting the flag sets."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

EMPTY_PATH = "an empty path; give a file or directory name (is a shell variable unset?)"


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def positive_integer(text: str) -> int:
    """1 or more (a beam size, a number of best translations)."""
    value = integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {text}")
    return value


def seed_below(bits: int) -> Callable[[str], int]:
    """The type of a seed flag whose consumers take seeds in [0, 2**bits)."""

    def seed_value(text: str) -> int:
        value = integer(text)
        if not 0 <= value < 2**bits:
            raise argparse.ArgumentTypeError(f"a seed is an integer from 0 to 2**{bits} - 1; got {text}")
        return value

    return seed_value


def path_text(text: str) -> str:
    """A file or directory name, refused when empty: Path("") is the working directory, so an unset shell
    variable (`--out "$DIR"`) would read or write there. A leading ~ is the home directory, as the shell
    gives it for `--out ~/runs/a` but not for `--out=~/runs/a`, which made a directory named ~ here (one
    that `rm -rf ~` then removes the wrong way)."""
    if not text:
        raise argparse.ArgumentTypeError(EMPTY_PATH)
    return os.path.expanduser(text)


def path_argument(text: str) -> Path:
    """`path_text` as a Path."""
    return Path(path_text(text))
