"""write_atomic: the file appears whole or not at all, through symbolic links and with its permissions."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from tformer import atomic_file
from tformer.atomic_file import write_atomic


def test_a_symbolic_link_is_written_through_and_kept(tmp_path: Path) -> None:
    """The rename replaced the link itself with a plain file, leaving the file it named unchanged."""
    target = tmp_path / "plots" / "curves.png"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link = tmp_path / "latest.png"
    link.symlink_to(target)
    assert write_atomic(link, b"new") == link
    assert link.is_symlink() and target.read_bytes() == b"new"
    assert [path.name for path in target.parent.iterdir()] == ["curves.png"]  # no temporary file left


def test_the_replaced_file_keeps_its_permissions(tmp_path: Path) -> None:
    """The new file had 0666 less the umask whatever the old one had (0640 became 0644 under umask 022)."""
    path = tmp_path / "align.txt"
    path.write_text("old")
    path.chmod(0o640)
    write_atomic(path, b"new")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and path.read_bytes() == b"new"


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_beside_it(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "out.html"
    path.write_text("old")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic_file.os, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, b"new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.html"]


def test_a_failed_write_names_the_file(tmp_path: Path, monkeypatch) -> None:
    """The OSError of a write or an fsync names no file: `tformer plot` on a full disk said only
    "error: [Errno 28] No space left on device", and a resume that rewrote metrics.jsonl the same."""
    path = tmp_path / "curves.png"

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic_file.os, "fsync", disk_full)
    with pytest.raises(OSError) as raised:
        write_atomic(path, b"new")
    assert str(raised.value) == f"[Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}: '{path}'"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_failed_write_to_a_device_names_it() -> None:
    """A device is written in place, and its failed write named no file: `tformer evaluate --output /dev/full`
    and `tformer align --out /dev/full` said only "error: [Errno 28] No space left on device"."""
    with pytest.raises(OSError) as raised:
        write_atomic(Path("/dev/full"), b"new")
    assert str(raised.value) == f"[Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}: '/dev/full'"


def test_a_name_near_the_file_systems_limit_is_written(tmp_path: Path) -> None:
    """The temporary beside a file named with 240 characters (of the usual 255) was longer than any name the
    file system takes: "File name too long", naming a hidden file the user never gave."""
    path = tmp_path / ("a" * 236 + ".png")
    assert write_atomic(path, b"data") == path and path.read_bytes() == b"data"
    assert [entry.name for entry in tmp_path.iterdir()] == [path.name]


def test_a_temporary_that_cannot_be_made_is_named_as_the_file_asked_for(tmp_path: Path, monkeypatch) -> None:
    """A folder that takes no new file (/proc, where access() lets root write) failed naming the hidden
    temporary (`[Errno 2] ...: '/proc/.foo.1234-5af98718.part'`), not the file the user gave."""
    open_file = os.open

    def no_new_file(path, flags, *args):
        if str(path).endswith(".part"):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        return open_file(path, flags, *args)

    monkeypatch.setattr(atomic_file.os, "open", no_new_file)
    with pytest.raises(OSError) as raised:
        write_atomic(tmp_path / "foo", b"text")
    assert str(raised.value) == f"[Errno 2] No such file or directory: '{tmp_path / 'foo'}'"
