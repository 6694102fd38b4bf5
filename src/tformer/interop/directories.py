"""Output directories of the converters: refused when they already hold something, written atomically."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from tformer.atomic_file import (
    NAME_KEPT,
    abandoned,
    fsync_dir,
    fsync_tree,
    name_the_file,
    parents_made,
)
from tformer.termination import interrupts_held

SCRATCH = "scratch"  # in the name of `scratch_beside`'s directory


@contextlib.contextmanager
def scratch_beside(temporary: Path) -> Iterator[Path]:
    """A directory for intermediate files beside `written_atomically`'s `temporary`, removed after the block:
    on the output's file system, not in the system's temporary directory (which may be small, or full). Its
    name (`.tmp-OUT-scratch-PID`, or `.tmp-scratch-PID` inside an existing `out`) is one that `fresh_directory`
    removes once its process is gone, as it removes the staging directories."""
    head, pid = temporary.name.rsplit("-", 1)
    scratch = temporary.with_name(f"{head}-{SCRATCH}-{pid}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def fresh_directory(out: str | Path) -> Path:
    """`out` as a Path, after checking that it does not exist or is an empty directory.

    The staging directories of a conversion into `out` that was killed outright (SIGKILL, the machine's
    memory killer: no clean-up ran) are removed first, when their process is gone: `.tmp-PID` inside an
    existing `out`, `.tmp-OUT-PID` beside it (OUT cut to its first NAME_KEPT characters). Left, the first
    would make the empty `out` look taken."""
    out = Path(out)
    _remove_abandoned_stagings(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty directory; choose a new --out")
    return out


def _beside(out: Path, pid: str) -> str:
    """The name of the staging directory that process `pid` makes beside a new `out` (its scratch directory
    inserts SCRATCH before the pid: `scratch_beside`)."""
    return f".tmp-{out.name[:NAME_KEPT]}-{pid}"


def _remove_abandoned_stagings(out: Path) -> None:
    """Remove the staging directories that `written_atomically` made for `out` in a process now gone."""
    inside = list(out.glob(".tmp-*")) if out.is_dir() else []
    beside = list(out.parent.glob(glob.escape(_beside(out, "")) + "*"))
    for staging in inside + beside:
        pid = staging.name.rsplit("-", 1)[-1]
        inside_names = (f".tmp-{pid}", f".tmp-{SCRATCH}-{pid}")
        given = inside_names if staging.parent == out else (_beside(out, pid), _beside(out, f"{SCRATCH}-{pid}"))
        if staging.name not in given:
            continue  # not a name written_atomically gives (.tmp-hf-keep-123 beside hf): the user's own
        if pid.isdigit() and staging.is_dir() and not staging.is_symlink() and abandoned(staging):
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def written_atomically(out: Path) -> Iterator[Path]:
    """A temporary sibling of `out`, renamed to `out` only when the block finished without an error and
    everything in it is on the disk (fsynced, as checkpoints are), so an interrupted conversion, or a crash
    of the machine, never leaves a half-written directory under the real name. On an error, the
    directories made above `out` for it (a new --out inside folders that did not exist) are removed too.

    An existing (empty) `out` is kept, not replaced: it may be the current directory (".") or a symbolic
    link to a directory, which a rename cannot replace. The temporary is then made inside it and its
    entries are moved up, one rename each, when complete (`_move_entries`: all of them or none)."""
    existing = out.is_dir()  # empty: checked by fresh_directory
    temporary = out / f".tmp-{os.getpid()}" if existing else out.parent / _beside(out, str(os.getpid()))
    with parents_made(out):  # an existing `out`'s are all there: nothing to make
        try:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir()
            yield temporary
            fsync_tree(temporary)  # on the disk before it has its name: a crash then leaves it whole or unnamed
            if existing:
                _move_entries(temporary, out)
            else:
                os.replace(temporary, out)
            fsync_dir(out if existing else out.parent)
        except BaseException as error:
            shutil.rmtree(temporary, ignore_errors=True)
            name_the_file(error, out, staging=temporary)  # not the staging directory, which is gone
            raise
        finally:
            shutil.rmtree(temporary, ignore_errors=True)


def _move_entries(temporary: Path, out: Path) -> None:
    """Move every entry of `temporary` into `out`, or none: a move that fails takes the ones made before
    it back, and Ctrl-C or SIGTERM waits until the moves (or their undoing) are over."""
    moved: list[str] = []
    with interrupts_held():
        try:
            for entry in sorted(temporary.iterdir()):
                os.replace(entry, out / entry.name)
                moved.append(entry.name)
        except BaseException:
            for name in moved:
                os.replace(out / name, temporary / name)
            raise
