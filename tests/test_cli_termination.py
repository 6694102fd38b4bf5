"""Interrupts held back while torch is imported (tformer.termination.interrupts_held)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import tformer
from tformer.termination import interrupts_held

SOURCE = str(Path(tformer.__file__).resolve().parents[1])  # the tformer these tests import

# Sends Ctrl-C's signal (or TFORMER_TEST_SIGNAL's) to the process the first time anything looks for
# numpy.matrixlib: inside torch's import, whose C extension imports numpy and drops a KeyboardInterrupt
# raised there.
INTERRUPT_INSIDE_NUMPY_IMPORT = """\
import os, signal, sys
class InterruptOnce:
    sent = False
    def find_spec(self, name, path=None, target=None):
        if name == "numpy.matrixlib" and not InterruptOnce.sent:
            InterruptOnce.sent = True
            os.kill(os.getpid(), getattr(signal, os.environ.get("TFORMER_TEST_SIGNAL", "SIGINT")))
        return None
sys.meta_path.insert(0, InterruptOnce())
"""


def test_an_interrupt_inside_the_block_is_raised_when_it_ends() -> None:
    reached_the_end = False
    with pytest.raises(KeyboardInterrupt), interrupts_held():
        os.kill(os.getpid(), signal.SIGINT)
        reached_the_end = True
    assert reached_the_end
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_held_sigterm_goes_to_the_handler_that_was_there_before() -> None:
    received: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda number, frame: received.append(number))
    try:
        with interrupts_held():
            os.kill(os.getpid(), signal.SIGTERM)
            assert received == []
        assert received == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def _tformer_with_an_interrupt_in_torchs_import(
    tmp_path: Path, *argv: str, signal_name: str = "SIGINT"
) -> subprocess.CompletedProcess:
    (tmp_path / "sitecustomize.py").write_text(INTERRUPT_INSIDE_NUMPY_IMPORT)
    return subprocess.run(
        [sys.executable, "-m", "tformer", *argv],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), SOURCE]), "TFORMER_TEST_SIGNAL": signal_name},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_ctrl_c_while_torch_loads_exits_130_in_one_line(tmp_path: Path) -> None:
    """It was lost inside torch's import, numpy was left half-imported, and the command went on (here it
    printed the preset and exited 0; `train` failed later with a traceback)."""
    done = _tformer_with_an_interrupt_in_torchs_import(tmp_path, "info", "--preset", "tiny")
    assert (done.returncode, done.stderr, done.stdout) == (130, "interrupted\n", "")


def test_sigterm_while_torch_loads_is_an_interrupt_in_the_commands_that_take_it_so(tmp_path: Path) -> None:
    """translate took a SIGTERM like Ctrl-C (status 130, "interrupted") only once it was translating: one
    held while torch loaded was sent on to the default handler and the process died of it (status -15,
    no word)."""
    argv = ["translate", str(tmp_path / "no-run"), "--input", str(tmp_path / "no-input")]
    done = _tformer_with_an_interrupt_in_torchs_import(tmp_path, *argv, signal_name="SIGTERM")
    assert (done.returncode, done.stderr, done.stdout) == (130, "interrupted\n", "")


def test_download_does_not_load_torch(tmp_path: Path) -> None:
    """The one command that needs no torch does not wait for it (the hook above never fires)."""
    argv = ["download", "multi30k", "--out", str(tmp_path / "data"), "--base-url", "http://127.0.0.1:9/"]
    done = _tformer_with_an_interrupt_in_torchs_import(tmp_path, *argv)
    assert done.returncode == 2 and "error: could not download" in done.stderr, done.stderr
    probe = f"from tformer.cli.main import main; main({argv!r}); import sys; print('torch' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": SOURCE},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.stdout.splitlines()[-1] == "False", done.stderr


def _console_script() -> list[str]:
    """What the `tformer` script pip writes runs: `from MODULE import FUNCTION; sys.exit(FUNCTION())`, with
    MODULE:FUNCTION as pyproject.toml names them."""
    project = tomllib.loads((Path(SOURCE).parent / "pyproject.toml").read_text())
    module, function = project["project"]["scripts"]["tformer"].split(":")
    return ["-c", f"import sys; from {module} import {function}; sys.argv[0] = 'tformer'; sys.exit({function}())"]


@pytest.mark.parametrize("launcher", [["-m", "tformer"], _console_script()], ids=["python -m", "console script"])
def test_ctrl_c_while_the_command_loads_exits_130_in_one_line(tmp_path: Path, launcher: list[str]) -> None:
    """An interrupt in the first tenth of a second, as tformer.cli.main imports, was a KeyboardInterrupt
    traceback and death by SIGINT (the console script imported tformer.cli.main before any of tformer's code
    ran, so nothing could catch it)."""
    hook = INTERRUPT_INSIDE_NUMPY_IMPORT.replace('"numpy.matrixlib"', '"tformer.cli.decode_options"')
    (tmp_path / "sitecustomize.py").write_text(hook)
    done = subprocess.run(
        [sys.executable, *launcher, "info", "--preset", "tiny"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), SOURCE])},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (done.returncode, done.stderr, done.stdout) == (130, "interrupted\n", "")


def test_a_removed_current_directory_is_one_line(tmp_path: Path) -> None:
    """Run from a directory that was removed (`mkdir d; cd d; rmdir ../d`), every command that loads torch
    failed with "Intel oneMKL FATAL ERROR: Cannot load .../libtorch_cpu.so", as if torch were broken."""
    removed = tmp_path / "removed"
    removed.mkdir()
    command = f'cd "{removed}" && rmdir "{removed}" && exec "{sys.executable}" -m tformer info --preset tiny'
    done = subprocess.run(
        ["sh", "-c", command],
        env={**os.environ, "PYTHONPATH": SOURCE},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr == "error: the current directory no longer exists (it was removed): cd to one that does\n"
