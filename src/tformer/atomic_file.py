"""Files that appear whole or not at all: written beside their name, then renamed into place, so that a
failure while writing (a full disk, an interruption) leaves the file that was there before, never a
truncated one in its place. The fsync helpers put a file or a whole directory tree on the disk before
such a rename (checkpoints, exports); `abandoned` tells the staging directory of a writer that was killed
from one still being written."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

# of a name, in the temporary names made beside it (here, and the staging directories of `tformer train
# --overwrite`, of the converters and of checkpoints and averages): a name near the file system's 255
# characters made theirs too long
NAME_KEPT = 200


def write_atomic(path: Path, data: bytes) -> Path:
    """Write `data` to a temporary file beside `path`, then rename it into place: readers see either
    the old file or the complete new one, never a partial write. A device or a pipe (/dev/stdout, a
    FIFO) is written in place: renaming a file onto it would replace it, and it holds nothing to keep.

    A symbolic link is written through: the file it names is replaced, the link stays. The new file
    keeps the permissions of the file it replaces; a new one gets 0666 less the umask, as open() would
    create it (tempfile.mkstemp's 0600 would make the file private to its owner)."""
    given = Path(path)
    if given.exists() and not given.is_file():
        try:
            with open(given, "wb") as stream:
                stream.write(data)
        except OSError as error:  # /dev/full: a bare "[Errno 28]" would not say which output
            name_the_file(error, given)
            raise
        return given
    path = given.resolve() if given.is_symlink() else given
    temporary = path.parent / f".{path.name[:NAME_KEPT]}.{os.getpid()}-{secrets.token_hex(4)}.part"
    try:
        handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as error:  # a folder that takes no new file (/proc, /sys): named as given, not as the temporary
        name_the_file(error, given, staging=temporary)
        raise
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        if path.is_file():
            os.chmod(temporary, path.stat().st_mode & 0o7777)
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        name_the_file(error, given)
        raise
    return given


def name_the_file(error: BaseException, path: Path, *, staging: Path | None = None) -> None:
    """Raise `error` again as an OSError naming `path` where it is one that names no file: a failed write or
    fsync names none, and its one-line message ("[Errno 5] Input/output error") would not say what could not
    be written. One that names a file in `staging`, the temporary directory that becomes `path`, names it
    under `path` instead: the temporary's name says nothing to the user, and the failure removes it. Any
    other error is left for the caller to raise."""
    if not isinstance(error, OSError) or error.errno is None:
        return
    if error.filename is None:
        raise OSError(error.errno, error.strerror, str(path)) from None
    if staging is not None and isinstance(error.filename, str):
        with contextlib.suppress(ValueError):  # a file outside `staging` keeps its name
            inside = Path(error.filename).relative_to(staging)
            raise OSError(error.errno, error.strerror, str(path / inside)) from None


def fsync_file(path: Path) -> None:
    """Have the file's data on the disk (a rename after it then never names a file that a crash emptied)."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_tree(directory: Path) -> None:
    """fsync every file and folder under `directory`, and `directory` itself, before it is renamed into place."""
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            fsync_file(path)
        elif path.is_dir() and not path.is_symlink():
            fsync_dir(path)
    fsync_dir(directory)


def fsync_dir(path: Path) -> None:
    """Have the directory's entries (a rename into it) on the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def abandoned(temporary: Path) -> bool:
    """Whether the writer of a `.tmp-NAME-PID` or `.old-NAME-PID` directory is gone (or is this process,
    which is writing nothing now); never for a name that does not end in a process number."""
    pid = temporary.name.rsplit("-", 1)[-1]
    if not pid.isdigit():
        return False  # not a name tformer gives: the user's own, not tformer's to remove
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except PermissionError:
        return False  # it exists, under another user
    except (ProcessLookupError, OverflowError):
        return True
    return False


def names_open_file(path: Path, descriptor: int, *, follow_symlinks: bool = True) -> bool:
    """Whether `path` names the file open as `descriptor` now: a lock taken on a file that its holder removed
    or renamed meanwhile is a lock no other process will ask for (the lock-file identity check)."""
    try:
        return os.path.samestat(os.fstat(descriptor), os.stat(path, follow_symlinks=follow_symlinks))
    except FileNotFoundError:
        return False


def missing_directories(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first: what making it creates."""
    missing = []
    for directory in (path, *path.parents):
        if directory.exists():
            break
        missing.append(directory)
    return missing


def remove_empty_directories(directories: list[Path]) -> None:
    """Remove each of `directories` (deepest first) that is empty; one that holds something stays."""
    for directory in directories:
        with contextlib.suppress(OSError):
            directory.rmdir()


@contextlib.contextmanager
def directories_made(directory: Path) -> Iterator[None]:
    """Make `directory` and those of its parents that do not exist yet, for the block that writes into it: an
    error in the block (a full disk, Ctrl-C) removes those of them it left empty, so a failed command leaves
    no empty folders behind. Folders that were there before stay, empty or not."""
    made = missing_directories(Path(directory))
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        yield
    except BaseException:
        remove_empty_directories(made)
        raise


def parents_made(path: Path) -> contextlib.AbstractContextManager[None]:
    """`directories_made` of the folder above the file `path`."""
    return directories_made(Path(path).parent)
