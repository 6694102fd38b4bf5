"""Output directories of the converters: refused when they already hold something, written atomically."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def fresh_directory(out: str | Path) -> Path:
    """`out` as a Path, after checking that it does not exist or is an empty directory."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty directory; choose a new --out")
    return out


@contextlib.contextmanager
def written_atomically(out: Path) -> Iterator[Path]:
    """A temporary sibling of `out`, renamed to `out` only when the block finished without an error, so
    an interrupted conversion never leaves a half-written directory under the real name.

    An existing (empty) `out` is kept, not replaced: it may be the current directory (".") or a symbolic
    link to a directory, which a rename cannot replace. The temporary is then made inside it and its
    entries are moved up, one rename each, when complete."""
    existing = out.is_dir()  # empty: checked by fresh_directory
    if existing:
        temporary = out / f".tmp-{os.getpid()}"
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        temporary = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        yield temporary
        if existing:
            for entry in temporary.iterdir():
                os.replace(entry, out / entry.name)
        else:
            os.replace(temporary, out)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
