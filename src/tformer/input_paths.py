"""Checks of an input directory before the work that reads it, so that a path that does not exist or is a
file fails at once, in one line that names it as it was given, instead of as a missing file inside it; and
`read_at_most`, for small files of a run or a model that someone else may have sent (`read_stream_at_most`
for a stream: a download, or what a gzip file unpacks to); `readable_name`, for readers that refuse a
path that is not valid UTF-8."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def check_input_dir(path: str | Path, name: str, *, holding: str, error: type[ValueError] = ValueError) -> Path:
    """`path` as a Path, after checking that it is an existing directory. `name` says how it was given (a flag
    or key with its value: "--tokenizer DIR", "HF_DIR DIR"); `holding` what the directory holds ("tokenizer",
    "Hugging Face model"), for the advice; `error` is the exception raised (a ValueError)."""
    path = Path(path)
    if not path.exists():
        raise error(f"{name}: no such directory; give the directory of a {holding}")
    if not path.is_dir():
        raise error(f"{name} is a file; give the directory that holds the {holding}")
    return path


def read_at_most(path: Path, limit: int) -> bytes | None:
    """The bytes of `path`, or None when it holds more than `limit`: it is never read further, since a
    received file may be huge, or a link to an endless device (/dev/zero)."""
    with path.open("rb") as file:
        return read_stream_at_most(file, limit)


def read_stream_at_most(stream: BinaryIO, limit: int) -> bytes | None:
    """What `stream` holds, or None when it holds more than `limit` bytes: it is read no further."""
    data = stream.read(limit + 1)
    return data if len(data) <= limit else None


@contextlib.contextmanager
def readable_name(path: Path) -> Iterator[str]:
    """A name of `path` that safetensors' readers open: they refuse a path that is not valid UTF-8 (a directory
    named in another encoding, Latin-1 bytes from an old archive), which tformer reported as corrupt weights.
    Such a file is opened here and read through its descriptor's name, /dev/fd/N: mapped as any other file,
    with no copy in memory. A valid path is given as it is."""
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        yield str(path)
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        yield f"/dev/fd/{descriptor}"
    finally:
        os.close(descriptor)
