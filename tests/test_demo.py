"""The built-in main job, shortened: the same pipeline end to end in seconds (the full demo is not a test)."""

from __future__ import annotations

import errno
import io
import re
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from tformer.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(list(args))
    return code, out.getvalue()


def test_quick_demo_trains_evaluates_and_saves_a_usable_run(tmp_path: Path, monkeypatch, capsys) -> None:
    run_dir = tmp_path / "demo"
    code, printed = run_cli("demo", "--quick", "--quiet", "--out", str(run_dir))
    assert code == 0
    match = re.search(r"exact match: (\d+\.\d+)%\s+chrF: (\d+\.\d+)", printed)
    assert match, printed
    assert 0.0 <= float(match.group(1)) <= 100.0 and 0.0 <= float(match.group(2)) <= 100.0
    assert "held-out numbers: 100" in printed
    assert (run_dir / "cross_attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for split in ("train", "valid", "test"):
        assert (run_dir / "data" / f"{split}.en").exists() and (run_dir / "data" / f"{split}.de").exists()

    monkeypatch.setattr("sys.stdin", io.StringIO("three hundred forty-two\n"))
    code, translated = run_cli("translate", str(run_dir), "--beam", "1")
    assert code == 0 and len(translated.splitlines()) == 1

    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    capsys.readouterr()
    assert main(["demo", "--quick", "--out", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "already holds a run; choose another --out, or delete it" in err and "--resume" not in err, err
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before


def test_a_demo_stopped_early_by_its_time_cap_says_so_with_advice_the_demo_takes(tmp_path: Path, capsys) -> None:
    """The trainer's own warm-up advice names `--set train.warmup_steps`, which `tformer demo` does not take."""
    code, _ = run_cli("demo", "--quick", "--train-seconds", "0.001", "--out", str(tmp_path / "demo"))
    err = capsys.readouterr().err
    assert code == 0
    assert "warning: training stopped at step 1 of 20, at the demo's 0.001-second cap (--train-seconds)" in err, err
    assert "rerun with --train-seconds 0 (no cap)" in err and "--set" not in err, err


def test_a_demo_that_trains_every_step_gives_no_time_cap_warning(tmp_path: Path, capsys) -> None:
    code, _ = run_cli("demo", "--quick", "--train-seconds", "0", "--out", str(tmp_path / "demo"))
    assert code == 0 and "warning" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--train-steps", "-5"], "argument --train-steps: 0 (no limit) or a positive number of steps; got -5"),
        (["--train-seconds", "nan"], "argument --train-seconds: 0 (no cap) or a positive number of seconds; got nan"),
        (["--train-seconds", "-1"], "argument --train-seconds: 0 (no cap) or a positive number of seconds; got -1"),
        (["--seed", "-1"], "argument --seed: a seed is an integer from 0 to 2**32 - 1; got -1"),
        (["--seed", str(2**32)], f"argument --seed: a seed is an integer from 0 to 2**32 - 1; got {2**32}"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    """A refused command must leave --out as it was, so that the corrected command can use it; the error
    names the demo's own flag (not the train.* setting it sets)."""
    run_dir = tmp_path / "demo"
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--quick", "--quiet", "--out", str(run_dir), *flags])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: tformer demo: {message} (see tformer demo --help)\n"
    assert not run_dir.exists()


def test_a_used_out_directory_is_refused_with_advice_that_demo_can_follow(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """demo has no --resume or --overwrite: the advice must not name them. Nothing is generated first."""
    run_dir = tmp_path / "demo"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine\n")
    assert main(["demo", "--quick", "--out", str(run_dir)]) == 2
    assert capsys.readouterr().err == (
        f"error: {run_dir} already holds files; choose another --out, or delete it to run the demo there again\n"
    )
    assert [path.name for path in run_dir.iterdir()] == ["notes.txt"]


def test_an_out_directory_under_a_file_is_refused_in_one_line_that_names_it(tmp_path: Path, capsys) -> None:
    """demo --out FILE/run started (printing what it would generate) and ended with
    "[Errno 20] Not a directory: 'FILE/run/data'", naming no flag."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n", encoding="utf-8")
    assert main(["demo", "--quick", "--out", str(a_file / "run")]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: --out {a_file / 'run'}: {a_file} is a file, not a directory\n"
    assert a_file.read_text(encoding="utf-8") == "mine\n" and sorted(tmp_path.iterdir()) == [a_file]


def test_a_full_disk_while_writing_the_data_names_the_file_and_leaves_out_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A full disk (or `ulimit -f`) while the demo wrote its corpus ended with "error: [Errno 27] File too
    large", naming no file, and left --out/data/ with the files cut short, so that once space was freed
    the same command was refused: "already holds files; choose another --out, or delete it"."""
    run_dir = tmp_path / "parent" / "demo"
    write_text = Path.write_text

    def fill_the_disk(path: Path, text: str, *args, **kwargs) -> int:
        if path.name == "train.de":
            write_text(path, text[: len(text) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(path, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", fill_the_disk)
    assert main(["demo", "--quick", "--quiet", "--out", str(run_dir)]) == 2
    train_de = run_dir / "data" / "train.de"
    assert capsys.readouterr().err == f"error: [Errno {errno.ENOSPC}] No space left on device: '{train_de}'\n"
    assert list(tmp_path.iterdir()) == []


def test_a_working_directory_that_cannot_be_written_is_refused_in_one_line_that_suggests_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cd /proc && tformer demo` (the default --out runs/demo, in a directory that access() lets root write
    but where nothing can be made) ended with "error: [Errno 2] No such file or directory: 'runs'", naming
    no flag, where train says "cannot create the run directory"."""
    monkeypatch.chdir(tmp_path)
    mkdir = Path.mkdir

    def like_proc(path: Path, *args, **kwargs) -> None:
        if path.absolute().is_relative_to(tmp_path):
            raise OSError(errno.ENOENT, "No such file or directory", "runs")
        mkdir(path, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", like_proc)
    assert main(["demo", "--quick", "--quiet"]) == 2
    assert capsys.readouterr().err == (
        "error: cannot create the run directory runs/demo: No such file or directory; choose another --out\n"
    )
    assert list(tmp_path.iterdir()) == []
