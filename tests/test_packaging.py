"""What a user of the installed package meets before any model is trained: the ways to start the command,
and the commands whose libraries are optional extras."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tformer import __version__
from tformer.cli.main import main


def test_python_dash_m_tformer_runs_the_command() -> None:
    """`python -m tformer` is the usual fallback when the `tformer` script is not on PATH."""
    done = subprocess.run([sys.executable, "-m", "tformer", "--version"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"tformer {__version__}"


@pytest.mark.parametrize(
    ("command", "hidden", "what", "extra"),
    [
        (["serve", "RUN"], ["fastapi"], "`tformer serve` needs fastapi", "serve"),
        (["serve", "RUN"], ["fastapi", "uvicorn"], "`tformer serve` needs fastapi and uvicorn", "serve"),
        (
            ["export", "RUN", "--to", "hf", "--out", "OUT"],
            ["transformers"],
            "`tformer export --to hf` needs transformers",
            "hf",
        ),
        (
            ["export", "RUN", "--to", "ctranslate2", "--out", "OUT"],
            ["ctranslate2"],
            "`tformer export --to ctranslate2` needs ctranslate2",
            "ctranslate2",
        ),
        (["import-hf", "HF", "--out", "OUT"], ["transformers"], "`tformer import-hf` needs transformers", "hf"),
    ],
    ids=["serve", "serve-both", "export-hf", "export-ct2", "import-hf"],
)
def test_a_missing_extra_is_one_line_naming_what_to_install(
    command: list[str],
    hidden: list[str],
    what: str,
    extra: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without the extra the command used to stop with a ModuleNotFoundError traceback (import-hf after
    creating --out). A module set to None in sys.modules cannot be imported, as if not installed."""
    for name in hidden:
        monkeypatch.setitem(sys.modules, name, None)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text('{"model_type": "marian"}')
    places = {"RUN": str(tmp_path / "run"), "OUT": str(tmp_path / "out"), "HF": str(hf_dir)}
    assert main([places.get(word, word) for word in command]) == 2
    install = f"which tformer does not install by itself: pip install 'tformer[{extra}]'"
    assert capsys.readouterr().err == f"error: {what}, {install}\n"
    assert not (tmp_path / "out").exists()
