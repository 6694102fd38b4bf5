"""Files that appear whole or not at all: written beside their name, then renamed into place, so that a
failure while writing (a full disk, an interruption) leaves the file that was there before, never a
truncated one in its place."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_atomic(path: Path, data: bytes) -> Path:
    """Write `data` to a temporary file beside `path`, then rename it into place: readers see either
    the old file or the complete new one, never a partial write. A device or a pipe (/dev/stdout, a
    FIFO) is written in place: renaming a file onto it would replace it, and it holds nothing to keep.

    The temporary file is created with mode 0666 less the umask, as open() would create `path`
    (tempfile.mkstemp's 0600 would make the file private to its owner)."""
    path = Path(path)
    if path.exists() and not path.is_file():
        with open(path, "wb") as stream:
            stream.write(data)
        return path
    temporary = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.part"
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
