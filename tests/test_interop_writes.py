"""`tformer export` and `import-hf` write their output whole or not at all: interrupted (Ctrl-C, SIGTERM) or
failing half-way (a full disk), they leave neither a half-filled --out nor their staging directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from test_export_hf import make_run

from tformer.cli.main import main

pytest.importorskip("transformers")

# Runs a command whose output is held up half-written: the hooked function says "writing" on stdout and
# waits for the signal the test sends then.
HELD_WRITE = """
import sys, time
import {module} as hooked
original = hooked.{owner}{name}

def held(*args, **kwargs):
    print("writing", flush=True)
    time.sleep(120)
    return original(*args, **kwargs)

setattr(hooked{owner_attr}, "{name}", held)
from tformer.cli.main import program
program(sys.argv[1:])
"""

HOOKS = {  # command -> (module, class or "", function) held while the staging directory is half-filled
    "hf": ("tformer.interop.marian_tokenizer", "VocabTokenizer", "write_marian_files"),
    "ctranslate2": ("ctranslate2.converters", "TransformersConverter", "convert"),
    "import-hf": ("tformer.interop.hf_import", "", "write_pointer"),
}


def held_write_script(command: str) -> str:
    module, owner, name = HOOKS[command]
    return HELD_WRITE.format(
        module=module, owner=f"{owner}." if owner else "", owner_attr=f".{owner}" if owner else "", name=name
    )


def entries(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


@pytest.mark.parametrize("command", ["hf", "ctranslate2", "import-hf"])
@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_an_interrupted_export_or_import_leaves_nothing_behind(tmp_path, command, signal_number):
    """SIGTERM (kill, timeout, a scheduler) ended export and import-hf at once: the staging directory
    (.tmp-OUT-PID beside --out, and CTranslate2's Hugging Face copy in the temporary folder) stayed."""
    if command == "ctranslate2":
        pytest.importorskip("ctranslate2")
    run = make_run(tmp_path / "run")
    if command == "import-hf":
        assert main(["export", str(run), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
        arguments = ["import-hf", str(tmp_path / "hf")]
    else:
        arguments = ["export", str(run), "--to", command]
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    before = entries(tmp_path)
    process = subprocess.Popen(
        [sys.executable, "-c", held_write_script(command), *arguments, "--out", str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(temporary)},
    )
    try:
        assert process.stdout.readline() == "writing\n"
        process.send_signal(signal_number)
        _, error = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, error
    assert error.splitlines()[-1] == "interrupted"
    assert entries(tmp_path) == before
    assert [name for name in entries(temporary) if name.startswith("tmp")] == []  # tempfile's (not torch's cache)


def full_disk(*args, **kwargs) -> None:
    raise OSError(28, "No space left on device", "written")


@pytest.mark.parametrize("command", ["hf", "import-hf"])
def test_a_write_failing_half_way_leaves_no_directory_it_made(tmp_path, capsys, monkeypatch, command):
    """--out below directories that do not exist yet: the export made them before writing, and a write that
    failed (a full disk) left them, empty, behind."""
    run = make_run(tmp_path / "run")
    assert main(["export", str(run), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    if command == "hf":
        monkeypatch.setattr("tformer.interop.marian_tokenizer.VocabTokenizer.write_marian_files", full_disk)
        arguments = ["export", str(run), "--to", "hf"]
    else:
        monkeypatch.setattr("tformer.interop.hf_import.write_pointer", full_disk)
        arguments = ["import-hf", str(tmp_path / "hf")]
    before = entries(tmp_path)
    capsys.readouterr()
    assert main([*arguments, "--out", str(tmp_path / "new" / "deeper" / "out")]) == 2
    assert capsys.readouterr().err == "error: [Errno 28] No space left on device: 'written'\n"
    assert entries(tmp_path) == before


@pytest.mark.parametrize("command", ["hf", "import-hf"])
def test_a_failed_fsync_names_out_not_the_staging_directory(tmp_path, capsys, monkeypatch, command):
    """The OSError of an fsync names no file, and import-hf's checkpoint is written inside the staging
    directory: export said only "error: [Errno 5] Input/output error", and import-hf named a file under
    `.tmp-OUT-PID`, which the failure removed."""
    run = make_run(tmp_path / "run")
    assert main(["export", str(run), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0

    def failing_fsync(descriptor: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("os.fsync", failing_fsync)
    out = tmp_path / "out"
    arguments = ["export", str(run), "--to", "hf"] if command == "hf" else ["import-hf", str(tmp_path / "hf")]
    named = out if command == "hf" else out / "checkpoints" / "step-00000000"
    before = entries(tmp_path)
    capsys.readouterr()
    assert main([*arguments, "--out", str(out)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: [Errno 5] Input/output error: '{named}'"
    assert entries(tmp_path) == before


@pytest.mark.parametrize("command", ["hf", "import-hf"])
def test_a_move_into_an_existing_empty_out_failing_half_way_leaves_it_empty(tmp_path, capsys, monkeypatch, command):
    """An existing empty --out is filled by moving the staged entries into it one by one: when a move
    failed, the entries moved before it stayed, a half-filled --out."""
    run = make_run(tmp_path / "run")
    assert main(["export", str(run), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    out = tmp_path / "out"
    out.mkdir()
    replace = os.replace
    moves: list[str] = []

    def second_move_fails(source: str | Path, target: str | Path) -> None:
        if Path(target).parent == out:
            moves.append(Path(target).name)
            if len(moves) == 2:
                raise OSError(5, "Input/output error", str(target))
        replace(source, target)

    monkeypatch.setattr("os.replace", second_move_fails)
    arguments = ["export", str(run), "--to", "hf"] if command == "hf" else ["import-hf", str(tmp_path / "hf")]
    before = entries(tmp_path)
    capsys.readouterr()
    assert main([*arguments, "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: [Errno 5] Input/output error")
    assert len(moves) == 2 and entries(out) == [] and entries(tmp_path) == before


@pytest.mark.parametrize("command", ["hf", "ctranslate2", "import-hf"])
def test_every_file_written_is_on_disk_before_the_output_gets_its_name(tmp_path, monkeypatch, command):
    """The export renamed its staging directory to --out without an fsync: after a power cut the complete
    looking directory could hold empty or truncated files (checkpoints are fsynced; exports were not).
    Files are told apart by inode, which a rename keeps."""
    if command == "ctranslate2":
        pytest.importorskip("ctranslate2")
    run = make_run(tmp_path / "run")
    assert main(["export", str(run), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    out = tmp_path / "out"
    synced: list[int] = []
    fsync, replace = os.fsync, os.replace
    synced_when_named: set[int] = set()

    def recorded(descriptor: int) -> None:
        synced.append(os.fstat(descriptor).st_ino)
        fsync(descriptor)

    def renamed(source: str | Path, target: str | Path) -> None:
        if Path(target) == out:
            synced_when_named.update(synced)
        replace(source, target)

    monkeypatch.setattr("os.fsync", recorded)
    monkeypatch.setattr("os.replace", renamed)
    arguments = ["export", str(run), "--to", command] if command != "import-hf" else ["import-hf", str(tmp_path / "hf")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the export's own about decoding settings
        assert main([*arguments, "--out", str(out)]) == 0
    unsynced = [path for path in (out, *out.rglob("*")) if path.stat().st_ino not in synced_when_named]
    assert unsynced == []
    assert synced[-1] == tmp_path.stat().st_ino  # then the rename itself


@pytest.mark.parametrize("out_exists", [False, True], ids=["new-out", "empty-out"])
def test_a_conversion_killed_outright_does_not_block_the_next_one(tmp_path, capsys, out_exists):
    """SIGKILL (or the memory killer) ends an export before any clean-up runs: its staging directory stayed
    (.tmp-PID inside an existing empty --out, .tmp-OUT-PID beside a new one), and the first made the empty
    --out look taken, so the next export into it was refused. A staging directory whose process is gone
    is now removed first; one whose writer still runs (pid 1 here) is left alone."""
    run = make_run(tmp_path / "run")
    out = tmp_path / "out"
    if out_exists:
        out.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-c", held_write_script("hf"), "export", str(run), "--to", "hf", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline() == "writing\n"
        process.kill()
        process.communicate(timeout=60)
    finally:
        process.kill()
    staging = out / f".tmp-{process.pid}" if out_exists else tmp_path / f".tmp-out-{process.pid}"
    assert staging.is_dir()  # what the killed export left
    capsys.readouterr()
    assert main(["export", str(run), "--to", "hf", "--out", str(out)]) == 0
    assert not staging.exists()
    assert (out / "config.json").is_file() and not [name for name in entries(out) if name.startswith(".tmp-")]
    assert not [name for name in entries(tmp_path) if name.startswith(".tmp-")]

    live = tmp_path / "taken"
    (live / ".tmp-1").mkdir(parents=True)  # pid 1 always runs
    capsys.readouterr()
    assert main(["export", str(run), "--to", "hf", "--out", str(live)]) == 2
    assert "already exists and is not an empty directory" in capsys.readouterr().err
    assert entries(live) == [".tmp-1"]


def test_an_out_whose_name_is_near_the_file_systems_limit_is_staged_under_a_shorter_name(tmp_path, capsys):
    """An --out of 248 characters (the limit is 255) failed with "File name too long" naming the staging
    directory `.tmp-OUT-PID`, which the user never gave: its name now holds OUT's first 200 characters, as
    write_atomic's temporaries do, and a killed conversion's staging directory is still found and removed."""
    run = make_run(tmp_path / "run")
    out = tmp_path / ("o" * 248)
    finished = subprocess.Popen([sys.executable, "-c", ""])
    finished.wait()
    stale = tmp_path / f".tmp-{'o' * 200}-{finished.pid}"
    stale.mkdir()
    assert main(["export", str(run), "--to", "hf", "--out", str(out)]) == 0, capsys.readouterr().err
    assert (out / "config.json").is_file() and not stale.exists()
    assert not [name for name in entries(tmp_path) if name.startswith(".tmp-")]


def test_a_hidden_folder_of_the_users_beside_out_is_not_taken_for_a_killed_conversions(tmp_path, capsys):
    """The clean-up took any `.tmp-OUT-...-N` beside --out whose N named no live process for a staging
    directory and removed it (`.tmp-hf-keep-99999999`, the user's own); only `.tmp-OUT-PID` is one."""
    run = make_run(tmp_path / "run")
    finished = subprocess.Popen([sys.executable, "-c", ""])
    finished.wait()
    kept = [tmp_path / f".tmp-hf-keep-{finished.pid}", tmp_path / ".tmp-hf-keep"]
    for folder in kept:
        folder.mkdir()
    stale = tmp_path / f".tmp-hf-{finished.pid}"
    stale.mkdir()
    assert main(["export", str(run), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0, capsys.readouterr().err
    assert all(folder.is_dir() for folder in kept) and not stale.exists()
