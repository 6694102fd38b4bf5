"""Checks of an output path before the work that fills it, so that a path that cannot be written fails at
once, in one line that names the flag, instead of after translating or drawing with an errno message."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path


def check_stdout(command: str, *, output_flag: str | None = None) -> None:
    """Refuse to start with standard output closed (`>&-`): Python then drops every print, so what the
    command writes there would be lost with exit status 0 (or crash it once the work is done)."""
    if sys.stdout is None:
        give = f"give {output_flag} FILE, or " if output_flag else ""
        raise ValueError(f"there is no standard output: {give}redirect tformer {command}'s output")


def _check_parents(path: Path, flag: str) -> None:
    """The nearest existing ancestor of `path` must be a directory this process may write into."""
    for ancestor in path.absolute().parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise ValueError(f"{flag} {path}: {ancestor} is a file, not a directory")
            if not os.access(ancestor, os.W_OK | os.X_OK):
                why = "a read-only file system" if _read_only(ancestor) else "permission denied"
                raise ValueError(f"{flag} {path}: cannot write into {ancestor} ({why})")
            return


def _read_only(directory: Path) -> bool:
    """Whether `directory` lies on a file system mounted read-only (a DVD, a read-only bind mount), where
    no permission the user could change would let them write."""
    return hasattr(os, "statvfs") and bool(os.statvfs(directory).f_flag & os.ST_RDONLY)


def check_not_an_input(output: Path, flag: str, inputs: Iterable[tuple[str, str | Path | None]]) -> None:
    """`output` (given as `flag`) is none of the input files, given as (flag, path) pairs: writing it would
    erase an input before, or while, it is read. A device or a pipe (/dev/stdout at a terminal that is also
    /dev/stdin) is written in place and holds nothing to erase."""
    if not output.is_file():
        return
    for input_flag, path in inputs:
        if path is not None and Path(path).exists() and os.path.samefile(output, path):
            raise ValueError(f"{flag} {output} is the {input_flag} file: writing would erase it; choose another file")


def check_output_file(path: Path, flag: str = "--out") -> None:
    """`path` can be written as a file: it is not a directory, and its folder exists or can be made."""
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file name")
    _check_parents(path, flag)


def check_replaced_output(
    output: Path, *, overwrite: bool, beside: tuple[Path, ...] = (), flag: str = "--output"
) -> bool:
    """--output (or the `flag` given) before the work that fills it: a file that can be written
    (`check_output_file`) and that, with the files written `beside` it until it is complete, holds
    nothing unless `overwrite`. Returns
    False for a device or a pipe (/dev/stdout, a FIFO), which holds nothing to keep and is written in
    place; True for a file (or none yet), to be written beside and renamed."""
    check_output_file(output, flag)
    if output.exists() and not output.is_file():
        return False
    for path in (output, *beside):
        if path in beside and path.is_dir():  # opened as a file, --overwrite or not: an errno line named it
            raise ValueError(f"{flag}: {path} is a directory, where {output} is written until complete; move it")
        if path.exists() and not overwrite:
            raise ValueError(f"{flag}: {path} exists; pass --overwrite to replace it, or choose another file")
    return True


def check_replaced_files(directory: Path, names: Iterable[str], *, overwrite: bool, flag: str = "--out") -> None:
    """--out DIR (or the `flag` given), into which a command writes the files `names`: a directory that can
    be made or written into (`check_output_dir`), which holds none of them unless `overwrite`, and never a
    directory in the place of one."""
    check_output_dir(directory, flag)
    existing = [directory / name for name in names if (directory / name).exists()]
    for path in existing:
        if path.is_dir():  # a file cannot be renamed over it, --overwrite or not
            raise ValueError(f"{flag}: {path} is a directory, where a file goes; move it, or choose another directory")
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more of the files it writes)" if len(existing) > 1 else ""
        raise ValueError(
            f"{flag}: {existing[0]} exists{more}; pass --overwrite to replace them, or choose another directory"
        )


def check_output_dir(path: Path, flag: str = "--out") -> None:
    """`path` can be a directory to write files into: it is not a file, and it exists or can be made."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file; give a directory")
    if path.is_symlink() and not path.exists():  # no directory can be made where the link is
        raise ValueError(
            f"{flag} {path} is a symbolic link to {os.readlink(path)}, which does not exist; give a directory"
        )
    _check_parents(path, flag)


def check_outside(path: Path, flag: str, *, directory: Path, name: str) -> None:
    """`path` is not `directory` (called `name`, the command's input) or inside it: a converter's output
    written into its input would change what it converts, and be copied, uploaded or deleted with it."""
    inside = path.resolve()
    if directory.exists() and (inside == directory.resolve() or directory.resolve() in inside.parents):
        raise ValueError(f"{flag} {path} is inside the {name} {directory}; choose a directory outside it")
