"""Commands that write a file or a folder check the path first: a path under a file, or a directory where
a file is wanted, is one line naming --out, before any run is loaded or anything is computed (the run
directory given here does not even exist: the old order reported it, or failed after the work with an
errno message)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tformer.cli.main import main
from tformer.cli.output_paths import check_not_an_input


@pytest.mark.parametrize(
    "command",
    [
        ["attention", "{missing}", "seven", "--out", "{blocker}/x.png"],
        ["plot", "{missing}", "--out", "{blocker}/x.png"],
        ["align", "{missing}", "--src", "{missing}", "--tgt", "{missing}", "--out", "{blocker}/x.txt"],
        ["explain", "--out", "{blocker}/figures"],
        ["export", "{missing}", "--to", "hf", "--out", "{blocker}/exported"],
        ["import-hf", "{missing}", "--out", "{blocker}/imported"],
        ["average", "{missing}", "--last", "1", "--out", "{blocker}/averaged"],
    ],
)
def test_an_output_path_under_a_file_is_refused_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("mine\n")
    missing = tmp_path / "no_run"
    arguments = [part.format(blocker=blocker, missing=missing) for part in command]
    capsys.readouterr()
    assert main(arguments) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: --out {arguments[-1]}: {blocker} is a file, not a directory\n"
    assert captured.out == ""  # explain printed its walk-through before failing on the figures
    assert blocker.read_text() == "mine\n"


def test_a_directory_where_a_file_is_wanted_and_a_file_where_a_folder_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "picture.png"
    folder.mkdir()
    assert main(["attention", str(tmp_path / "no_run"), "seven", "--out", str(folder)]) == 2
    assert capsys.readouterr().err == f"error: --out {folder} is a directory; give a file name\n"
    afile = tmp_path / "figures"
    afile.write_text("mine\n")
    assert main(["explain", "--out", str(afile)]) == 2
    assert capsys.readouterr().err == f"error: --out {afile} is a file; give a directory\n"


def test_a_terminal_that_is_both_input_and_output_is_not_refused() -> None:
    """`--src /dev/stdin --out /dev/stdout` at a terminal name one device: writing to it erases nothing
    (a device or a pipe is written in place), so it is no reason to refuse the command."""
    controller, terminal = os.openpty()
    try:
        path = Path(os.ttyname(terminal))
        check_not_an_input(path, "--out", [("--src", path)])
    finally:
        os.close(controller)
        os.close(terminal)


@pytest.mark.parametrize(("read_only", "why"), [(True, "a read-only file system"), (False, "permission denied")])
def test_an_output_directory_that_cannot_be_written_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], read_only: bool, why: str
) -> None:
    """A directory on a read-only mount (root's case too, whom no permission stops) was refused as
    "(permission denied)", which sends the user to chmod, where nothing can help."""
    monkeypatch.setattr(os, "access", lambda path, mode, **kwargs: False)
    real_statvfs = os.statvfs

    def statvfs(path: str | os.PathLike[str]) -> os.statvfs_result:
        result = list(real_statvfs(path))
        result[8] = os.ST_RDONLY if read_only else 0  # f_flag
        return os.statvfs_result(result)

    monkeypatch.setattr(os, "statvfs", statvfs)
    capsys.readouterr()
    assert main(["explain", "--out", str(tmp_path / "figures")]) == 2
    assert capsys.readouterr().err == f"error: --out {tmp_path / 'figures'}: cannot write into {tmp_path} ({why})\n"
