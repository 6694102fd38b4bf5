"""One training process per run directory: an exclusive lock on RUN_DIR/.lock while it trains.

Two `tformer train --out DIR` started at once (or a `--resume`, or an `--overwrite`, of a run that is
still training) would interleave their metrics rows and replace or prune each other's checkpoints. The
lock is a POSIX record lock (`lockf`) on a hidden file: it belongs to the process, so Trainers made one
after another in one program do not shut each other out, it works on NFS, and the kernel releases it
when the process ends, however it ends (SIGKILL included), so a killed run never leaves a stale lock.
The file stays (deleting it would let a third process lock a fresh file while a second still holds the
old one); where a holder removes it anyway (a failed setup's cleanup) or `--overwrite` renames a new run
in, a process that locked the old file between its open and its lock locks the one there now. The holder
writes its PID and host name into the file, so that a process refused names it. Where files cannot be
locked (no `fcntl`, or a filesystem that refuses locks) the run goes on unlocked, as it did before locks.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shlex
import socket
from pathlib import Path
from typing import IO

from tformer.atomic_file import names_open_file

try:
    import fcntl
except ImportError:  # Windows: no advisory locks of this kind
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"
LOCK_ATTEMPTS = 3  # a lock file replaced that often while it is locked is refused


class RunInUseError(ValueError):
    """Another process is training into the run directory."""


class RunLock:
    """Held from construction until `release()` (or until the process ends)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._handle: IO[bytes] | None = None
        if fcntl is None:
            return
        path = self.run_dir / LOCK_FILE
        for _ in range(LOCK_ATTEMPTS):
            handle = _open_lock_file(path, self.run_dir)
            if not _locked(handle, self.run_dir):
                return  # locks unsupported here (e.g. ENOLCK): go on unlocked
            if names_open_file(path, handle.fileno(), follow_symlinks=False):  # opened without following
                break
            # its holder removed it between our open and our lock (a failed setup's cleanup, or --overwrite
            # renaming a new run in): the lock is on a file no other process will open; lock the one there now
            handle.close()
        else:
            raise RunInUseError(f"{self.run_dir} is in use: its lock file keeps being replaced; try again")
        self._handle = handle
        with contextlib.suppress(OSError):  # a full disk: the lock holds all the same, unnamed
            os.ftruncate(handle.fileno(), 0)
            os.write(handle.fileno(), f"{os.getpid()} {socket.gethostname()}\n".encode())

    def release(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(OSError):  # the PID and host stay out of a run that is copied or shared
                os.ftruncate(self._handle.fileno(), 0)
            self._handle.close()  # closing the file releases the process's lock on it
            self._handle = None


def _holder(descriptor: int) -> str:
    """The process that holds the lock, as the lock file names it: "tformer process PID" (with its host
    where that is another machine, a run directory on a shared filesystem); "another tformer process" where
    the file names none (written by a tformer before this one, or not yet by a holder that just locked it)."""
    with contextlib.suppress(OSError, UnicodeDecodeError, ValueError):
        pid, host = os.pread(descriptor, 256, 0).decode("utf-8").split()
        where = "" if host == socket.gethostname() else f" on {host}"
        return f"tformer process {int(pid)}{where}"
    return "another tformer process"


def _open_lock_file(path: Path, run_dir: Path) -> IO[bytes]:
    """RUN_DIR/.lock opened (created where missing), or a one-line error saying what to do."""
    try:  # a link (a received run's) is not followed: that would create or lock a file outside the run
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o666)
    except IsADirectoryError:
        raise ValueError(f"{path} is a directory, where a run keeps its lock file; remove or rename it") from None
    except OSError as error:
        if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):  # a bare errno line said nothing of what to do
            raise ValueError(
                f"cannot write into {run_dir} ({error.strerror}), where a run keeps its lock file and "
                "checkpoints; choose a directory that can be written (copy the run there to resume it)"
            ) from None
        if error.errno != errno.ELOOP:
            raise
        remove = f"rm {shlex.quote(str(path))}"
        raise ValueError(
            f"{path} is a symbolic link, where a run keeps its lock file; remove the link ({remove})"
        ) from None
    return os.fdopen(descriptor, "ab")  # held open for as long as the lock


def _locked(handle: IO[bytes], run_dir: Path) -> bool:
    """Lock the open lock file; False where this filesystem has no locks (the handle is then closed)."""
    try:
        fcntl.lockf(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = _holder(handle.fileno())
        handle.close()
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunInUseError(
                f"{run_dir} is in use: {holder} is training into it (its lock goes when it ends, "
                "however it ends); wait for it to end, or choose another --out"
            ) from None
        return False
    return True
