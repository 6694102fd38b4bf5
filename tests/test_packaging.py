"""What a user of the installed package meets before any model is trained: what the wheel holds, the
ways to start the command, and the commands whose libraries are optional extras."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

from tformer import __version__
from tformer.cli.main import main
from tformer.recipes import recipe_names

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
BUILD_REQUIRES = next(name for name in PROJECT["build-system"]["requires"] if name.startswith("setuptools"))
NOT_SOURCES = shutil.ignore_patterns(
    ".git", "__pycache__", "*.egg-info", "build", "dist", "runs", ".venv", ".pytest_cache", ".ruff_cache", ".hypothesis"
)


def _build(tmp_path: Path, hook: str) -> Path:
    """Build a wheel (hook build_wheel) or sdist (build_sdist) of a copy of the source tree, since a build
    writes egg-info beside the sources, with the installed setuptools: no network. The dev extra installs a
    setuptools that can read pyproject.toml; elsewhere (a bare venv) the build tests are skipped."""
    pytest.importorskip("setuptools", minversion=BUILD_REQUIRES.split(">=")[1], reason="the build tests need it")
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCES)
    out = tmp_path / "dist"
    out.mkdir()
    code = f"from setuptools import build_meta; print(build_meta.{hook}({str(out)!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    # setuptools turns what it deprecates into build errors at a set date (the license table: 2027-02-18)
    assert "SetuptoolsDeprecationWarning" not in done.stderr, done.stderr
    return out / done.stdout.strip().splitlines()[-1]


def test_the_wheel_holds_the_recipes_and_runs_them_outside_the_source_tree(tmp_path: Path) -> None:
    """`tformer train --config multi30k_en_de` as the README shows it, from an installed wheel: the recipes
    were a folder of the source checkout, missing from the wheel."""
    wheel = _build(tmp_path, "build_wheel")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "installed")
    assert {f"tformer/configs/{name}.toml" for name in recipe_names()} <= names
    assert "tformer/py.typed" in names  # PEP 561: a type checker reads the annotations of a program using tformer
    metadata = (tmp_path / "installed" / f"tformer-{__version__}.dist-info" / "METADATA").read_text()
    assert "License-Expression: MIT" in metadata.splitlines()
    assert f"tformer-{__version__}.dist-info/licenses/LICENSE" in names
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    environment = {**os.environ, "PYTHONPATH": str(tmp_path / "installed")}
    command = [sys.executable, "-m", "tformer.cli.main", "info", "--config", "multi30k_en_de"]
    done = subprocess.run(command, cwd=elsewhere, env=environment, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["src_vocab_size"] == 8000


def test_the_sdist_holds_the_tests_with_their_helpers_the_docs_and_the_benchmarks(tmp_path: Path) -> None:
    """Every file of tests/, docs/, benchmarks/ and src/ is in the sdist: setuptools alone took only
    tests/test_*.py, so the tests of an unpacked sdist failed for want of conftest.py and helpers.py."""
    sdist = _build(tmp_path, "build_sdist")
    with tarfile.open(sdist) as archive:
        root = archive.getnames()[0].split("/")[0]
        names = {name.removeprefix(root + "/") for name in archive.getnames()}
    copied = tmp_path / "source"
    expected = {
        path.relative_to(copied).as_posix()
        for top in ("tests", "docs", "benchmarks", "src")
        for path in (copied / top).rglob("*")
        if path.is_file() and ".egg-info" not in path.as_posix()  # the build's own, next to the sources
    }
    assert {"tests/conftest.py", "tests/helpers.py", "docs/training.md", "benchmarks/decode.py"} <= expected
    assert sorted(expected - names) == []


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


def test_the_serve_extra_requires_the_pydantic_the_api_is_written_for() -> None:
    """fastapi >= 0.110 also installs with pydantic 1, which ignores `model_config = ConfigDict(extra=
    "forbid")` and `Field(strict=True)`: the server then answered 200 to an unknown field and to
    `"beam": "2"` or `true`, which docs/serving.md says are refused (422)."""
    extras = PROJECT["project"]["optional-dependencies"]
    assert "pydantic>=2" in [requirement.replace(" ", "") for requirement in extras["serve"]]


def test_the_bench_extra_installs_the_client_of_the_serving_benchmark() -> None:
    """benchmarks/serve.py sends its requests with httpx (tformer.serving.load); only the dev extra installed
    it, so `pip install 'tformer[serve,bench]'` then the load test of docs/serving.md ended in a traceback."""
    extras = PROJECT["project"]["optional-dependencies"]
    assert "httpx>=0.27" in [requirement.replace(" ", "") for requirement in extras["bench"]]


def test_the_dev_extra_installs_the_setuptools_the_build_tests_use() -> None:
    """The tests above build the wheel and sdist with the environment's setuptools; the setuptools of a
    fresh Python 3.11 venv (65.5) cannot read this pyproject.toml, and Python 3.12's venvs have none."""
    assert BUILD_REQUIRES in PROJECT["project"]["optional-dependencies"]["dev"]


def test_every_benchmark_record_the_docs_cite_exists() -> None:
    cited = {
        name
        for path in [REPO / "README.md", *(REPO / "docs").glob("*.md")]
        for name in re.findall(r"benchmarks/results/[\w.-]*\w\.md", path.read_text(encoding="utf-8"))
    }
    assert cited and sorted(name for name in cited if not (REPO / name).is_file()) == []


def test_the_goal_table_of_the_performance_page_names_records_that_exist() -> None:
    """The goal table's record column named records by abbreviations (`..._session13.md`) that matched no
    file, or a file other than the one measured: each name there must be a whole record's name."""
    text = (REPO / "docs" / "performance.md").read_text(encoding="utf-8")
    section = text.split("## Where the goals stand", 1)[1].split("\n## ", 1)[0]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| #")]
    names = [name for row in rows for name in re.findall(r"`([^`]+\.md)`", row[3])]
    assert rows and names
    assert [name for name in names if not (REPO / "benchmarks" / "results" / name).is_file()] == []


def test_tformer_requires_the_torch_its_multi_process_runs_and_transformers_5_work_with() -> None:
    """Below torch 2.8 gloo's process group held the GIL while its destructor joined threads that needed it
    (torch PR 154976): on torch 2.4 and 2.6 a process of a multi-process run hung in leave_process_group,
    and tests/test_distributed.py with it. transformers 5 (what the extras install) disables its PyTorch
    support below torch 2.6 with a log line, not an install error."""
    requirements = [requirement.replace(" ", "") for requirement in PROJECT["project"]["dependencies"]]
    assert "torch>=2.8" in requirements
    for name, extra in PROJECT["project"]["optional-dependencies"].items():
        assert not [requirement for requirement in extra if requirement.startswith("torch")], name  # one floor
