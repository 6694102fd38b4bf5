"""`-` as a text file's name is standard input or output, as Unix tools take it: translate's --input and
--output, evaluate's --src and --ref, align's --src, --tgt and --out. It was a file named `-`."""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_export_hf import SOURCES, TARGETS, make_run

from tformer.cli.main import main


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("standard_streams") / "run")


@pytest.fixture
def texts(tmp_path: Path) -> tuple[Path, Path]:
    src, tgt = tmp_path / "src.txt", tmp_path / "tgt.txt"
    src.write_text("".join(line + "\n" for line in SOURCES), encoding="utf-8")
    tgt.write_text("".join(line + "\n" for line in TARGETS), encoding="utf-8")
    return src, tgt


@pytest.fixture
def stdin_from() -> Iterator[Callable[[Path], None]]:
    """Redirect this process's file descriptor 0 (what /dev/stdin opens) to a file, as `< FILE` would."""
    saved = os.dup(0)

    def redirect(path: Path) -> None:
        descriptor = os.open(path, os.O_RDONLY)
        os.dup2(descriptor, 0)
        os.close(descriptor)

    yield redirect
    os.dup2(saved, 0)
    os.close(saved)


def test_translate_reads_and_writes_dash_as_standard_streams(run, texts, tmp_path, capsys, monkeypatch) -> None:
    src, _ = texts
    monkeypatch.chdir(tmp_path)
    assert main(["translate", str(run), "--input", str(src), "--beam", "1"]) == 0
    expected = capsys.readouterr().out
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(src.read_bytes()), encoding="utf-8"))
    assert main(["translate", str(run), "--input", "-", "--output", "-", "--beam", "1"]) == 0
    assert capsys.readouterr().out == expected
    assert sorted(path.name for path in tmp_path.iterdir()) == ["src.txt", "tgt.txt"]  # no `-`, no `-.partial`


def test_evaluate_reads_src_or_ref_from_standard_input(run, texts, tmp_path, capsys, stdin_from) -> None:
    src, tgt = texts
    evaluate = ["evaluate", str(run), "--device", "cpu", "--beam", "1", "--json"]
    assert main([*evaluate, "--src", str(src), "--ref", str(tgt)]) == 0
    expected = json.loads(capsys.readouterr().out)
    for flags in (["--src", "-", "--ref", str(tgt)], ["--src", str(src), "--ref", str(tgt), "-"]):
        stdin_from(src if flags[1] == "-" else tgt)
        assert main([*evaluate, *flags]) == 0
        scores = json.loads(capsys.readouterr().out)
        if flags[1] == "-":
            assert scores["bleu"] == expected["bleu"] and scores["chrf"] == expected["chrf"]
        else:
            assert "nrefs:2" in scores["bleu_signature"]
    assert main([*evaluate, "--src", "-", "--ref", "-"]) == 2
    assert capsys.readouterr().err == (
        "error: --src and --ref are both standard input (-), which can be read once; give files\n"
    )
    with pytest.raises(SystemExit) as exited:  # argparse's error, while the flags are parsed
        main([*evaluate, "--src", str(src), "--ref", str(tgt), "--output", "-"])
    assert exited.value.code == 2
    assert "argument --output: - (standard output) holds the command's results" in capsys.readouterr().err


def test_align_reads_dash_as_standard_input_and_writes_it_as_standard_output(
    run, texts, tmp_path, capsys, stdin_from, monkeypatch
) -> None:
    src, tgt = texts
    monkeypatch.chdir(tmp_path)
    assert main(["align", str(run), "--src", str(src), "--tgt", str(tgt)]) == 0
    expected = capsys.readouterr().out
    stdin_from(tgt)
    assert main(["align", str(run), "--src", str(src), "--tgt", "-", "--out", "-"]) == 0
    assert capsys.readouterr().out == expected
    assert sorted(path.name for path in tmp_path.iterdir()) == ["src.txt", "tgt.txt"]


def test_an_output_that_is_the_file_on_standard_input_is_refused(run, texts, capsys, stdin_from) -> None:
    """`translate --input - --output F < F` would erase F while it is read, as `--input F --output F` would."""
    src, _ = texts
    stdin_from(src)
    assert main(["translate", str(run), "--input", "-", "--output", str(src), "--overwrite"]) == 2
    assert (
        capsys.readouterr().err
        == f"error: --output {src} is the --input file: writing would erase it; choose another file\n"
    )


def test_dash_with_standard_input_closed_is_refused_while_the_flags_are_parsed(monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "stdin", None)  # started with `<&-`
    with pytest.raises(SystemExit):
        main(["align", "RUN", "--src", "-", "--tgt", "t.txt"])
    assert "argument --src: - is standard input, which is closed" in capsys.readouterr().err


def test_a_reader_that_goes_away_ends_translate_quietly_with_the_status_of_sigpipe(run, tmp_path) -> None:
    """`tformer translate RUN < big | head -1` ended with status 0, as if every line had been translated; a
    Unix tool that a closed pipe stops ends by SIGPIPE (status 141 in the shell), which `set -o pipefail` sees."""
    import subprocess

    source = tmp_path / "big.txt"
    source.write_text("the cat sat on the mat\n" * 5000, encoding="utf-8")
    command = [sys.executable, "-m", "tformer.cli.main", "translate", str(run), "--beam", "1"]
    with source.open("rb") as stdin:
        process = subprocess.Popen(command, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdout.readline().endswith(b"\n")
        process.stdout.close()  # `head -1` exits
        assert process.wait(timeout=120) == 141
        assert process.stderr.read() == b""  # quiet: no traceback, no error line
    finally:
        process.kill()


@pytest.mark.parametrize("command", ["translate", "evaluate", "align"])
def test_text_file_flags_expand_a_leading_tilde(tmp_path, capsys, monkeypatch, command) -> None:
    """`--input=~/in.txt` (which the shell leaves as it is) named a file in a directory called ~ here, as
    every other path flag did before they expanded it: the flags that also take `-` kept the ~."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "in.txt").write_text("a\n", encoding="utf-8")
    (home / "out.txt").write_text("kept\n", encoding="utf-8")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    flags = {
        "translate": ["--input=~/in.txt", "--output=~/out.txt"],
        "evaluate": ["--src=~/in.txt", "--ref=~/in.txt", "--output=~/out.txt"],
        "align": ["--src=~/in.txt", "--tgt=~/in.txt", "--out=~/out.txt"],
    }[command]
    assert main([command, "RUN", *flags]) == 2  # refused before the run is read: OUTPUT exists
    flag = "--out" if command == "align" else "--output"
    assert capsys.readouterr().err == (
        f"error: {flag}: {home / 'out.txt'} exists; pass --overwrite to replace it, or choose another file\n"
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["home"]  # no directory named ~


def test_an_output_named_as_the_file_standard_output_writes_is_standard_output(run, texts, tmp_path) -> None:
    """`translate --output /dev/stdout > FILE` was refused ('FILE exists; pass --overwrite'): the link was
    followed to the file the shell had just emptied for this command, taken as an output to keep."""
    import subprocess

    src, _ = texts
    command = [sys.executable, "-m", "tformer.cli.main", "translate", str(run), "--input", str(src), "--beam", "1"]
    expected = subprocess.run(command, capture_output=True, check=True).stdout
    out = tmp_path / "out.txt"
    for output in ("/dev/stdout", str(out)):  # the shell's name for it, or the file's own
        with out.open("wb") as stdout:
            finished = subprocess.run([*command, "--output", output], stdout=stdout, stderr=subprocess.PIPE)
        assert (finished.returncode, finished.stderr) == (0, b"")
        assert out.read_bytes() == expected
        assert sorted(path.name for path in tmp_path.iterdir()) == ["out.txt", "src.txt", "tgt.txt"]  # no .partial
