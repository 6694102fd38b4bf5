"""End to end: train a tiny run with `tformer train`, then `tformer attention`, `plot` and `align` on it."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import select
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_viz_attention import assert_png, embedded_pngs
from training_helpers import write_corpus

from tformer.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    directory = tmp_path_factory.mktemp("viz_cli")
    corpus = write_corpus(directory)
    arguments = [
        "train",
        "--train-src", str(corpus["train_src"]), "--train-tgt", str(corpus["train_tgt"]),
        "--valid-src", str(corpus["valid_src"]), "--valid-tgt", str(corpus["valid_tgt"]),
        "--preset", "tiny", "--vocab-size", "48", "--max-tokens", "256", "--max-steps", "40", "--device", "cpu",
        "--quiet", "--out", str(directory / "run"),
        "--set", "train.valid_every=20", "--set", "train.bleu_every=20", "--set", "train.log_every=5",
        "--set", "train.warmup_steps=10", "--set", "train.schedule=peak", "--set", "train.peak_lr=0.005",
        "--set", "decode.beam_size=2", "--set", "decode.max_len_b=6",
    ]  # fmt: skip
    # one thread, as the tests get from `one_thread`: a module's fixture is set up before theirs is. And the
    # run's stderr in the failure: one failure under load (exit status not 0) left nothing to say why
    before, stderr = torch.get_num_threads(), io.StringIO()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stderr(stderr):
            status = main(arguments)
    finally:
        torch.set_num_threads(before)
    assert status == 0, f"tformer train exited with {status}: {stderr.getvalue()}"
    return directory / "run", corpus


def test_attention_png_and_html(trained_run: tuple[Path, dict[str, Path]], tmp_path: Path, capsys) -> None:
    run, _ = trained_run
    assert main(["attention", str(run), "ka lo mi", "--out", str(tmp_path / "maps.png")]) == 0
    assert capsys.readouterr().out.startswith("translation: ")
    assert_png(tmp_path / "maps.png", min_width=800, min_height=1500)  # 6 rows (kind x layer) of 4 heads
    assert main(["attention", str(run), "ka lo mi", "--out", str(tmp_path / "maps.html"), "--layer", "1"]) == 0
    page = (tmp_path / "maps.html").read_text(encoding="utf-8")
    assert len(embedded_pngs(page)) == page.count("<figure") == 3 * 4  # 3 kinds x 4 heads of layer 1
    arguments = ["attention", str(run), "ka", "--out", str(tmp_path / "one.html"), "--kind", "cross", "--head", "0"]
    assert main([*arguments, "--target", "cat"]) == 0
    assert len(re.findall("<figure", (tmp_path / "one.html").read_text(encoding="utf-8"))) == 2  # 2 layers


def test_attention_user_errors(trained_run: tuple[Path, dict[str, Path]], tmp_path: Path, capsys) -> None:
    run, _ = trained_run
    assert main(["attention", str(run), "ka", "--out", str(tmp_path / "maps.svg")]) == 2
    assert main(["attention", str(run), "ka", "--out", str(tmp_path / "maps.png"), "--head", "7"]) == 2
    assert "head 7 does not exist" in capsys.readouterr().err
    for empty in ("", "   "):  # drew the maps of eos alone, as if a sentence had been given
        assert main(["attention", str(run), empty, "--out", str(tmp_path / "empty.png")]) == 2
        assert (
            capsys.readouterr().err == "error: the sentence is empty; give the source sentence to translate and draw\n"
        )
        assert not (tmp_path / "empty.png").exists()


@pytest.mark.parametrize("extra", [[], ["--target", "cat"]], ids=["sentence", "target"])
def test_attention_refuses_an_argument_that_is_not_utf8(trained_run, tmp_path: Path, capsys, extra: list[str]) -> None:
    """A Latin-1 terminal's "é" reaches Python as a lone surrogate: sentencepiece raised a RuntimeError."""
    run, _ = trained_run
    latin1 = "ka lo caf\udce9"  # b"caf\xe9" as sys.argv decodes it
    sentence, target = (latin1, "cat") if not extra else ("ka lo", latin1)
    arguments = ["attention", str(run), sentence, "--out", str(tmp_path / "maps.png")]
    assert main([*arguments, *(["--target", target] if extra else [])]) == 2
    name = "--target" if extra else "the sentence"
    assert capsys.readouterr().err == f"error: {name} is not valid UTF-8 (character 10); give it in UTF-8\n"
    assert not (tmp_path / "maps.png").exists()


def test_plot_of_a_run_that_stopped_before_its_first_log_says_what_to_do(trained_run, tmp_path: Path, capsys) -> None:
    """It said only "a run that stopped before its first log": now the run's step, train.log_every and how to
    get a log (the run here: 40 steps, made to log every 100)."""
    run, _ = trained_run
    short = tmp_path / "short"
    shutil.copytree(run, short)
    (short / "metrics.jsonl").unlink()
    for described in (short / "checkpoints").glob("*/experiment.json"):
        document = json.loads(described.read_text(encoding="utf-8"))
        document["experiment"]["train"]["log_every"] = 100
        described.write_text(json.dumps(document), encoding="utf-8")
    capsys.readouterr()
    assert main(["plot", str(short), "--out", str(tmp_path / "curves.png")]) == 2
    assert capsys.readouterr().err == (
        f"error: {short} has no metrics to plot: the run stopped at step 40, before its first log (train.log_every "
        f"is 100); train it longer (tformer train --out {short} --resume --max-steps 100 --max-time 0), or train "
        "with --set train.log_every=40 or less\n"
    )


def test_plot_of_an_imported_run_says_it_was_never_trained_here(trained_run, tmp_path: Path, capsys) -> None:
    """It said the run 'stopped at step 0, before its first log' and advised `train --resume`, which an
    import-hf run cannot do (it names no training text)."""
    pytest.importorskip("transformers")
    run, _ = trained_run
    assert main(["export", str(run), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    imported = tmp_path / "imported"
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(imported)]) == 0
    capsys.readouterr()
    assert main(["plot", str(imported), "--out", str(tmp_path / "curves.png")]) == 2
    assert capsys.readouterr().err == (
        f"error: {imported} has no metrics to plot: it was imported (tformer import-hf), not trained by tformer train\n"
    )


def test_plot_given_a_checkpoint_names_the_run_that_holds_it(trained_run, tmp_path: Path, capsys) -> None:
    """It advised training longer (no metrics file in a checkpoint directory)."""
    run, _ = trained_run
    checkpoint = next((run / "checkpoints").iterdir())
    capsys.readouterr()
    assert main(["plot", str(checkpoint), "--out", str(tmp_path / "curves.png")]) == 2
    expected = f"error: {checkpoint} is one checkpoint of the run {run}, not a run directory; give {run}\n"
    assert capsys.readouterr().err == expected
    assert not (tmp_path / "curves.png").exists()


def test_plot(trained_run: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    run, _ = trained_run
    assert main(["plot", str(run), "--out", str(tmp_path / "curves.png")]) == 0
    assert_png(tmp_path / "curves.png", min_width=1000, min_height=600)
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "none.png")]) == 2


def test_align(trained_run: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    run, corpus = trained_run
    out = tmp_path / "align.txt"
    assert (
        main(
            ["align", str(run), "--src", str(corpus["valid_src"]), "--tgt", str(corpus["valid_tgt"]), "--out", str(out)]
        )
        == 0
    )
    lines = out.read_text(encoding="utf-8").splitlines()
    targets = corpus["valid_tgt"].read_text(encoding="utf-8").splitlines()
    sources = corpus["valid_src"].read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(targets)
    for line, source, target in zip(lines, sources, targets, strict=True):
        links = [tuple(map(int, link.split("-"))) for link in line.split()]
        assert sorted(j for _, j in links) == list(range(len(target.split())))  # each target word once
        assert all(0 <= i < len(source.split()) for i, _ in links)


FULL_DISK = """
import json, resource, signal, sys
import tformer.align, tformer.cli.main, tformer.training.checkpoint, tformer.viz.curves, tformer.viz.html
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (32, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
print(json.dumps([tformer.cli.main.main(command) for command in json.loads(sys.argv[1])]))
"""


def test_a_write_that_fails_keeps_the_file_that_was_there(trained_run: tuple[Path, dict[str, Path]], tmp_path: Path):
    """attention, plot and align wrote their --out in place: a disk that filled up while they wrote left
    the earlier file truncated. Simulated here with a file-size limit of 32 bytes in a process of its own
    (every write past it fails, as on a full disk); the earlier file must stay whole, with no leftovers."""
    run, corpus = trained_run
    outputs = [tmp_path / name for name in ("maps.png", "maps.html", "curves.png", "links.txt")]
    for path in outputs:
        path.write_text("earlier\n")
    commands = [  # an existing --out is kept without --overwrite
        ["attention", str(run), "ka lo mi", "--out", str(outputs[0]), "--overwrite"],
        ["attention", str(run), "ka lo mi", "--out", str(outputs[1]), "--overwrite"],
        ["plot", str(run), "--out", str(outputs[2]), "--overwrite"],
        [
            "align",
            str(run),
            "--src",
            str(corpus["valid_src"]),
            "--tgt",
            str(corpus["valid_tgt"]),
            "--out",
            str(outputs[3]),
            "--overwrite",
        ],
    ]
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK, json.dumps(commands)], capture_output=True, text=True, timeout=300
    )
    assert json.loads(done.stdout.splitlines()[-1]) == [2, 2, 2, 2], done.stderr
    assert done.stderr.count("error: [Errno 27] File too large") == 4, done.stderr
    assert [path.read_text() for path in outputs] == ["earlier\n"] * 4
    assert sorted(tmp_path.iterdir()) == sorted(outputs)


@pytest.mark.parametrize("command", ["attention.png", "attention.html", "plot"])
def test_a_figure_keeps_an_existing_out_unless_overwrite(
    trained_run: tuple[Path, dict[str, Path]], tmp_path: Path, capsys, command: str
) -> None:
    """attention and plot replaced an existing --out without a word, while align (and translate, evaluate)
    keep one unless --overwrite: a figure drawn from an earlier run or checkpoint was lost."""
    run, _ = trained_run
    name, _, suffix = command.partition(".")
    out = tmp_path / f"earlier.{suffix or 'png'}"
    out.write_bytes(b"an earlier figure")
    arguments = ["attention", str(run), "ka lo mi"] if name == "attention" else ["plot", str(run)]
    assert main([*arguments, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: --out: {out} exists; pass --overwrite to replace it, or choose another file\n"
    assert captured.out == ""  # refused before the model is loaded or anything is drawn
    assert out.read_bytes() == b"an earlier figure"
    assert main([*arguments, "--out", str(out), "--overwrite"]) == 0
    assert out.read_bytes() != b"an earlier figure"
    assert sorted(tmp_path.iterdir()) == [out]


def test_plot_refuses_a_file_name_it_would_not_write_as_named(tmp_path: Path, capsys) -> None:
    """The image is a PNG: --out curves.svg would hold PNG bytes under an SVG name."""
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "curves.svg")]) == 2
    assert "ending in .png" in capsys.readouterr().err
    assert not (tmp_path / "curves.svg").exists()


def test_plot_of_a_diverged_run_names_the_curve_it_left_out_in_one_line(tmp_path: Path, capsys) -> None:
    import subprocess
    import sys

    from test_viz_curves import write_metrics

    rows = [{"step": step, "wall_s": step, "train_loss": "nan", "lr": step / 10} for step in (1, 2)]
    run = write_metrics(tmp_path / "run", rows)
    command = [sys.executable, "-m", "tformer.cli.main", "plot", str(run), "--out", str(tmp_path / "curves.png")]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        "warning: train_loss: logged only NaN or infinite values (a diverged run?); not drawn"
    ]
    assert_png(tmp_path / "curves.png", min_width=1000, min_height=600)
    write_metrics(run, [{**row, "lr": "nan"} for row in rows])
    assert main(["plot", str(run), "--out", str(tmp_path / "nothing.png")]) == 2
    assert capsys.readouterr().err == (
        "error: nothing to draw: train_loss, lr logged only NaN or infinite values (a diverged run?) "
        "and no other curve is logged\n"
    )
    assert not (tmp_path / "nothing.png").exists()


def test_explain_refuses_a_seed_torch_cannot_take(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", "--seed", "99999999999999999999"])
    assert exit_info.value.code == 2
    assert "a seed is an integer from 0 to 2**63 - 1" in capsys.readouterr().err


def test_translate_answers_each_line_of_a_pipe_that_stays_open(trained_run: tuple[Path, dict[str, Path]]) -> None:
    """An interactive filter: a line sent through a pipe is translated before more input or its end."""
    import subprocess
    import sys

    run, _ = trained_run
    command = [sys.executable, "-m", "tformer.cli.main", "translate", str(run), "--which", "last", "--beam", "1"]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for line in (b"ka lo mi\n", b"\n"):
            process.stdin.write(line)
            process.stdin.flush()
            ready = select.select([process.stdout], [], [], 60)[0]
            assert ready, "no translation came back while the pipe stayed open"
            answer = process.stdout.readline()
            assert answer.endswith(b"\n") and (answer.strip() or line == b"\n")
            assert answer.rstrip(b"\n") == answer.rstrip(b"\n").strip()  # no stray spaces
        assert answer == b"\n"  # an empty line gives an empty line
        process.stdin.close()
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()


@pytest.mark.parametrize("command", ["attention", "attention.html", "plot", "align", "evaluate", "translate"])
def test_a_failed_write_leaves_no_folder_it_made(trained_run, tmp_path: Path, monkeypatch, capsys, command) -> None:
    """A write that failed (a full disk) left the folders made above --out/--output behind, empty; those
    that were there before stay."""
    run, corpus = trained_run
    (tmp_path / "kept").mkdir()
    out = tmp_path / "kept" / "new" / "deeper" / "out.png"
    src, tgt = str(corpus["valid_src"]), str(corpus["valid_tgt"])
    bad_input = tmp_path / "in.txt"
    bad_input.write_bytes(b"\xff\n")  # translate fails on its first line, having made --output's folders
    arguments = {
        "attention": ["attention", str(run), "ka lo mi", "--out", str(out)],
        "attention.html": ["attention", str(run), "ka lo mi", "--out", str(out.with_suffix(".html"))],
        "plot": ["plot", str(run), "--out", str(out)],
        "align": ["align", str(run), "--src", src, "--tgt", tgt, "--out", str(out)],
        "evaluate": ["evaluate", str(run), "--src", src, "--ref", tgt, "--device", "cpu", "--output", str(out)],
        "translate": ["translate", str(run), "--input", str(bad_input), "--output", str(out)],
    }[command]

    def full_disk(descriptor: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    assert main(arguments) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert list((tmp_path / "kept").iterdir()) == []
