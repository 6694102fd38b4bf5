"""One training process per run directory: a second one given the same directory is refused in one
line and changes nothing; the lock goes with the process that held it, however it ended."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from training_helpers import tiny_experiment, write_corpus

from tformer.cli.main import main
from tformer.training import resume_run, start_run
from tformer.training.run_lock import LOCK_FILE, RunInUseError, RunLock

pytestmark = pytest.mark.usefixtures("one_thread")


def _digest(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


@contextmanager
def _held_by_another_process(run_dir: Path) -> Iterator[int]:
    """RUN_DIR locked, as a training process locks it, by a process that is then SIGKILLed."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from tformer.training.run_lock import RunLock; "
            "lock = RunLock(sys.argv[1]); print('locked', flush=True); time.sleep(120)",
            str(run_dir),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        yield holder.pid
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()


def test_a_run_another_process_trains_is_refused_and_left_alone(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    corpus = write_corpus(tmp_path, n_train=40)
    experiment = tiny_experiment(corpus, "train.max_steps=2", "train.save_every=2", valid=False)
    run = tmp_path / "run"
    start_run(experiment, run, quiet=True).train()
    (run / "checkpoints" / "step-00000002" / "model.safetensors").unlink()  # would fail a resume that ran
    arguments = ["train", "--train-src", str(corpus["train_src"]), "--train-tgt", str(corpus["train_tgt"])]
    arguments += ["--preset", "tiny", "--vocab-size", "48", "--max-steps", "2", "--device", "cpu", "--quiet"]
    with _held_by_another_process(run) as holder:
        before = _digest(run)
        # the line names the process, and says that no stale lock can be left to remove by hand
        in_use = f"error: {run} is in use: tformer process {holder} is training into it (its lock goes when it "
        in_use += "ends, however it ends); wait for it to end, or choose another --out\n"
        for mode in (["--resume"], ["--overwrite"], []):  # a new run: not 'already holds a run; pass --resume'
            capsys.readouterr()
            assert main([*arguments, "--out", str(run), *mode]) == 2
            assert capsys.readouterr().err == in_use
        with pytest.raises(RunInUseError):
            resume_run(run, quiet=True)
        assert _digest(run) == before
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".run.")]  # no staging left


def test_two_new_runs_into_one_directory(tmp_path: Path) -> None:
    """Both find the directory empty; the second to lock it is refused, and removes nothing of the first's."""
    corpus = write_corpus(tmp_path, n_train=40)
    run = tmp_path / "run"
    run.mkdir()
    with _held_by_another_process(run):
        with pytest.raises(RunInUseError):
            start_run(tiny_experiment(corpus, valid=False), run, quiet=True)
        assert [path.name for path in run.iterdir()] == [LOCK_FILE]
    # the lock went with the killed holder: nothing stale is left to refuse the next run
    assert start_run(tiny_experiment(corpus, "train.max_steps=1", valid=False), run, quiet=True).train().step == 1


def test_a_directory_holding_only_a_lock_file_takes_a_new_run(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path, n_train=40)
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).touch()  # what a run killed before it wrote anything leaves
    experiment = tiny_experiment(corpus, "train.max_steps=1", valid=False)
    assert start_run(experiment, run, quiet=True).train().step == 1


def test_a_lock_file_that_is_a_directory_is_named_with_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A directory where the lock file belongs ended every train into the run with a bare "error: [Errno 21]
    Is a directory: 'RUN/.lock'"."""
    corpus = write_corpus(tmp_path, n_train=40)
    run = tmp_path / "run"
    start_run(tiny_experiment(corpus, "train.max_steps=2", "train.save_every=2", valid=False), run, quiet=True).train()
    (run / LOCK_FILE).unlink()
    (run / LOCK_FILE).mkdir()
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / LOCK_FILE).mkdir()
    before = _digest(run)
    arguments = ["train", "--train-src", str(corpus["train_src"]), "--train-tgt", str(corpus["train_tgt"])]
    arguments += ["--preset", "tiny", "--vocab-size", "48", "--max-steps", "2", "--device", "cpu", "--quiet"]
    for directory, mode in ((run, "--resume"), (run, "--overwrite"), (tmp_path / "new", None)):
        capsys.readouterr()
        assert main([*arguments, "--out", str(directory), *([mode] if mode else [])]) == 2
        lock = directory / LOCK_FILE
        assert (
            capsys.readouterr().err
            == f"error: {lock} is a directory, where a run keeps its lock file; remove or rename it\n"
        )
    assert _digest(run) == before and (run / LOCK_FILE).is_dir()
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "new",
        "run",
        "train.src",
        "train.tgt",
        "valid.src",
        "valid.tgt",
    ]


def test_a_lock_file_that_is_a_link_is_refused_and_what_it_names_left_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A received run whose .lock is a symbolic link had every train into it open the file the link names:
    one that did not exist was created, outside the run, and one that did was locked."""
    corpus = write_corpus(tmp_path, n_train=40)
    run = tmp_path / "run"
    start_run(tiny_experiment(corpus, "train.max_steps=2", "train.save_every=2", valid=False), run, quiet=True).train()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run / LOCK_FILE).unlink()
    (run / LOCK_FILE).symlink_to(elsewhere / "created")
    before = _digest(run)
    capsys.readouterr()
    command = ["train", "--out", str(run), "--resume", "--max-steps", "4", "--quiet"]
    assert main(command) == 2
    lock = run / LOCK_FILE
    assert capsys.readouterr().err == (
        f"error: {lock} is a symbolic link, where a run keeps its lock file; remove the link (rm {lock})\n"
    )
    assert not list(elsewhere.iterdir()) and _digest(run) == before


def test_a_run_on_a_read_only_file_system_is_named_with_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`train --resume` of a run on a read-only disk (a DVD, a read-only mount) ended with a bare
    "error: [Errno 30] Read-only file system: 'RUN/.lock'"."""
    import errno

    from tformer.training import run_lock

    corpus = write_corpus(tmp_path, n_train=40)
    run = tmp_path / "run"
    start_run(tiny_experiment(corpus, "train.max_steps=2", "train.save_every=2", valid=False), run, quiet=True).train()
    (run / LOCK_FILE).unlink()
    before = _digest(run)
    open_file = os.open

    def read_only(path: object, *args: object, **kwargs: object) -> int:
        if Path(str(path)).name == LOCK_FILE:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return open_file(path, *args, **kwargs)

    monkeypatch.setattr(run_lock.os, "open", read_only)
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "4", "--quiet"]) == 2
    assert capsys.readouterr().err == (
        f"error: cannot write into {run} (Read-only file system), where a run keeps its lock file and checkpoints; "
        "choose a directory that can be written (copy the run there to resume it)\n"
    )
    assert _digest(run) == before


def test_a_run_locked_from_another_machine_names_its_host(tmp_path: Path) -> None:
    """A run directory on a shared filesystem: the PID alone would name a process of this machine."""
    run = tmp_path / "run"
    run.mkdir()
    with _held_by_another_process(run):
        (run / LOCK_FILE).write_text("4242 gpu-node-7\n", encoding="utf-8")  # as a holder there writes it
        with pytest.raises(RunInUseError, match=r"in use: tformer process 4242 on gpu-node-7 is training into it"):
            RunLock(run)
        (run / LOCK_FILE).write_text("", encoding="utf-8")  # a holder that just locked it, or an older tformer
        with pytest.raises(RunInUseError, match=r"in use: another tformer process is training into it"):
            RunLock(run)


def test_a_lock_file_removed_by_its_holder_while_it_is_locked_is_not_what_the_run_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A holder removes RUN_DIR/.lock (a failed setup cleans up) between another process's open and lock: that
    process locked the removed file, which no one else opens, and a third then locked a new one beside it."""
    from tformer.training import run_lock

    run = tmp_path / "run"
    run.mkdir()
    lockf = run_lock.fcntl.lockf
    removed = []

    def lock_after_the_holder_removed_it(descriptor: int, operation: int) -> None:
        if not removed:
            removed.append((run / LOCK_FILE).unlink())  # the holder's cleanup, then its release
        lockf(descriptor, operation)

    monkeypatch.setattr(run_lock.fcntl, "lockf", lock_after_the_holder_removed_it)
    held = RunLock(run)
    monkeypatch.undo()
    third = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from tformer.training.run_lock import RunLock; RunLock(sys.argv[1])",
            str(run),
        ],
        capture_output=True,
        text=True,
    )
    held.release()
    assert removed and "RunInUseError" in third.stderr and f"tformer process {os.getpid()}" in third.stderr
