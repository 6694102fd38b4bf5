"""Commands that need no trained run: `info` on presets and config files, and their one-line errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tformer.cli.main import main
from tformer.config import PRESETS
from tformer.recipes import RECIPES_DIR, recipe_names

TINY_COPY = RECIPES_DIR / "tiny_copy.toml"


def _info(capsys: pytest.CaptureFixture[str], *flags: str) -> dict:
    capsys.readouterr()
    assert main(["info", *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_info_shows_the_model_of_a_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--config reads [model] (preset included) as `train --config` does; the vocabulary is the file's
    data.vocab_size unless --vocab-size says otherwise."""
    shown = _info(capsys, "--config", str(TINY_COPY))
    assert shown["config"] == str(TINY_COPY)
    assert shown["d_model"] == PRESETS["tiny"]["d_model"] and shown["max_positions"] == 256
    assert shown["src_vocab_size"] == shown["tgt_vocab_size"] == 1000
    smaller = _info(capsys, "--config", str(TINY_COPY), "--vocab-size", "100")
    assert smaller["src_vocab_size"] == 100 and smaller["parameters"] < shown["parameters"]
    same_shape = _info(capsys, "--preset", "tiny", "--vocab-size", "1000")  # sinusoidal positions: no parameters
    assert same_shape["parameters"] == shown["parameters"]
    assert _info(capsys)["preset"] == "base"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--config", "missing.toml"],
            "error: config file not found: missing.toml; or give one of tformer's own recipes by name:"
            f" {', '.join(recipe_names())} (files in {RECIPES_DIR})",
        ),
        (
            ["--vocab-size", "0"],
            "error: --vocab-size 0 is one tformer train refuses: data.vocab_size must be at least 8, got 0",
        ),
    ],
)
def test_info_errors_are_one_line(flags: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", *flags]) == 2
    assert capsys.readouterr().err == message + "\n"


@pytest.mark.parametrize("given", ["tiny_copy", "configs/tiny_copy.toml", "file"])
def test_info_given_a_config_file_as_run_dir_names_the_flag(
    given: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`tformer info tiny_copy` said only that no such run directory exists."""
    if given == "file":
        given = str(tmp_path / "run.toml")
        Path(given).write_text('[model]\npreset = "tiny"\n')
    assert main(["info", given]) == 2
    assert capsys.readouterr().err == (
        f"error: {given} is a config file, not a run: show its model with tformer info --config {given}\n"
    )


def test_info_config_file_errors_name_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[model]\npreset = "tiny"\nd_modle = 64\n')
    assert main(["info", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown key(s) d_modle in [model]; valid keys: preset, ") and err.count("\n") == 1


def test_a_config_file_in_another_encoding_or_a_directory_is_one_line_naming_it(tmp_path: Path, capsys) -> None:
    """Latin-1 gave the codec's message without the file's name; a directory an errno message."""
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('[model]\npreset = "tiny" # café\n'.encode("latin-1"))
    assert main(["info", "--config", str(latin1)]) == 2
    assert capsys.readouterr().err == f"error: {latin1}: invalid UTF-8 at byte 30; re-encode the file as UTF-8\n"
    assert main(["info", "--config", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: config file {tmp_path} is a directory; give a TOML file\n"


def test_a_config_file_with_a_byte_order_mark_reads_as_without(tmp_path: Path, capsys) -> None:
    """Windows editors start UTF-8 files with a byte-order mark; tomllib called it an invalid statement."""
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + TINY_COPY.read_bytes())
    assert _info(capsys, "--config", str(path)) == {**_info(capsys, "--config", str(TINY_COPY)), "config": str(path)}


def test_info_on_a_model_too_large_to_build_here_is_one_line(capsys) -> None:
    from tformer.cli.main import main

    # (a vocabulary train accepts, 2e9 pieces, in a base model: about 3.8 TiB)
    assert main(["info", "--preset", "base", "--vocab-size", "2000000000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot build this model here") and err.count("\n") == 1


def test_resume_of_a_file_says_it_is_a_file(tmp_path, capsys) -> None:
    from tformer.cli.main import main

    (tmp_path / "a.txt").write_text("not a run\n")
    assert main(["train", "--out", str(tmp_path / "a.txt"), "--resume"]) == 2
    assert "is a file, not a run directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
            "allocate 40000000000 bytes. Error code 12 (Cannot allocate memory)"
        ),
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nGPU 0 has a total capacity of ..."),
        RuntimeError("Storage size calculation overflowed with sizes=[2, 4, 15, 1000000000000000000, 8]"),
        MemoryError(),
    ],
    ids=["cpu", "cuda", "overflowing-size", "python"],
)
def test_running_out_of_memory_is_one_line(monkeypatch, capsys, error: BaseException) -> None:
    """translate --beam 100000 asks torch's CPU allocator for 40 GB: it was a RuntimeError traceback."""
    from tformer.cli import info

    def run(args):
        raise error

    monkeypatch.setattr(info, "run", run)
    assert main(["info"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory (") and err.endswith("needs less\n") and err.count("\n") == 1


def test_another_runtime_error_keeps_its_traceback(monkeypatch) -> None:
    from tformer.cli import info

    def run(args):
        raise RuntimeError("shapes do not match")

    monkeypatch.setattr(info, "run", run)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        main(["info"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["translate", "run", "--beam", "x"], "tformer translate: argument --beam: not an integer: 'x'"),
        (["translate", "run", "--beam", "0"], "tformer translate: argument --beam: must be at least 1; got 0"),
        (["translate", "run", "--nbest", "-2"], "tformer translate: argument --nbest: must be at least 1; got -2"),
        (["evaluate", "run", "--beam", "0"], "tformer evaluate: argument --beam: must be at least 1; got 0"),
        (["attention", "run", "x", "--beam", "0"], "tformer attention: argument --beam: must be at least 1; got 0"),
        # the Translator's own "max_batch_tokens and chunk_lines must be positive; got 0, 256" named no flag
        (
            ["translate", "run", "--max-batch-tokens", "0"],
            "tformer translate: argument --max-batch-tokens: must be at least 1; got 0",
        ),
        (
            ["evaluate", "run", "--max-batch-tokens", "-5"],
            "tformer evaluate: argument --max-batch-tokens: must be at least 1; got -5",
        ),
        (["translate"], "tformer translate: the following arguments are required: RUN_DIR"),
        ([], "tformer: the following arguments are required: COMMAND"),
        (["trnslate"], "tformer: argument COMMAND: invalid choice: 'trnslate'"),
        (["translate", "run", "--bogus"], "tformer translate: unrecognized arguments: --bogus"),
        (["train", "--out", "x", "--maxsteps", "5", "y"], "tformer train: unrecognized arguments: --maxsteps 5 y"),
        (["--bogus", "info"], "tformer: unrecognized arguments: --bogus"),
    ],
)
def test_argument_errors_are_one_line(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    """argparse printed its whole usage block (nine lines for translate) before the error."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    command = message.split(":")[0]
    assert err.endswith(f" (see {command} --help)\n")


def test_a_very_long_error_keeps_its_start_and_end_and_leaves_out_the_middle(tmp_path: Path, capsys) -> None:
    """A value quoted from a file (a 1 MB string as model.activation) made a 1 MB error line: the middle is
    now left out, the start (the setting and what it may be) and the end stay."""
    config = tmp_path / "long.toml"
    config.write_text(f'[model]\nactivation = "{"x" * 1_000_000}"\n')
    assert main(["info", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) < 1200, len(err)
    assert err.startswith("error: activation in [model] must be one of relu, gelu, silu, swish; got 'xxx")
    assert " characters left out) ... " in err and err.endswith("xxx'\n")


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["translate", ""], "RUN_DIR"),
        (["translate", "RUN", "--input", ""], "--input"),
        (["translate", "RUN", "--output", ""], "--output"),
        (["translate", "RUN", "--ensemble", ""], "--ensemble"),
        (["evaluate", "RUN", "--src", "", "--ref", "REF"], "--src"),
        (["evaluate", "RUN", "--src", "SRC", "--ref", "REF", "--output", ""], "--output"),
        (["explain", "--out", ""], "--out"),
        (["download", "multi30k", "--out", ""], "--out"),
        (["export", "", "--to", "hf", "--out", "OUT"], "RUN_DIR"),
        (["import-hf", "HF", "--out", ""], "--out"),
        (["train", "--out", ""], "--out"),
        (["info", ""], "RUN_DIR"),
        (["plot", "RUN", "--out", ""], "--out"),
        (["serve", ""], "RUN_DIR"),
    ],
)
def test_an_empty_path_is_refused_naming_its_argument(
    argv: list[str], named: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """An empty path (an unset shell variable: --out "$DIR") was Path(""), the working directory: explain
    wrote its figures there, download would have written the corpus there, translate read '.' as a run."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: tformer {argv[0]}: argument {named}: an empty path; give a file or directory")
    assert err.count("\n") == 1 and not list(tmp_path.iterdir())


def test_output_its_encoding_cannot_write_says_what_to_do(monkeypatch, capsys) -> None:
    """Under PYTHONIOENCODING=ascii (or a C locale with PYTHONUTF8=0, or a Latin-1 one) the error was Python's
    "'ascii' codec can't encode character '\\xb7' in position 2751", which says neither where nor how to fix it."""
    import io

    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BytesIO(), encoding="ascii"))
    assert main(["explain"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: standard output's encoding (ascii) cannot write '·': set ") and err.count("\n") == 1
    assert "PYTHONIOENCODING=utf-8" in err


def test_a_path_that_begins_with_a_tilde_is_in_the_home_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """The shell expands `--out ~/runs/a` but not `--out=~/runs/a` (nor a quoted "~/runs/a"): tformer read
    and wrote a directory named ~ in the working directory, as most command lines do not."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main(["info", "~/run"]) == 2
    assert capsys.readouterr().err == f"error: no such run or checkpoint directory: {tmp_path / 'home' / 'run'}\n"
