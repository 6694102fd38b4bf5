"""What a user of the installed package meets before any model is trained: the ways to start the command."""

from __future__ import annotations

import subprocess
import sys

from tformer import __version__


def test_python_dash_m_tformer_runs_the_command() -> None:
    """`python -m tformer` is the usual fallback when the `tformer` script is not on PATH."""
    done = subprocess.run([sys.executable, "-m", "tformer", "--version"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"tformer {__version__}"
