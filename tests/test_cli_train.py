"""End to end through the command line: train -> translate -> evaluate -> average, and every bad
input giving exit status 2, one line on stderr, no traceback, and nothing saved lost."""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from training_helpers import tiny_experiment, write_corpus

from tformer import runtime
from tformer.cli import train as train_cli
from tformer.cli.main import main
from tformer.data.tokenizer import Tokenizer
from tformer.runtime import Distributed
from tformer.training import checkpoint as ckpt
from tformer.training import checkpoint_save, load_run, loop, training_text
from tformer.training import resume as training_resume
from tformer.training import run as training_run
from tformer.training.loop import TrainResult

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = """
[model]
preset = "tiny"
max_positions = 64
[data]
vocab_size = 48
[train]
max_tokens = 256
max_steps = 6
schedule = "peak"
peak_lr = 5e-3
warmup_steps = 3
log_every = 2
valid_every = 2
bleu_every = 3
stop_metric = "bleu"
save_every = 2
device = "cpu"
[decode]
beam_size = 2
max_len_b = 8
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("cli")
    paths = write_corpus(directory, n_train=80, n_valid=6)
    paths["config"] = directory / "tiny.toml"
    paths["config"].write_text(CONFIG)
    paths["dir"] = directory
    return paths


def _train_args(ws: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "train", "--config", str(ws["config"]), "--out", str(out),
        "--train-src", str(ws["train_src"]), "--train-tgt", str(ws["train_tgt"]),
        "--valid-src", str(ws["valid_src"]), "--valid-tgt", str(ws["valid_tgt"]), "--quiet", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(workspace: dict[str, Path]) -> Path:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = workspace["dir"] / "run"
    assert main(_train_args(workspace, out)) == 0
    torch.set_num_threads(before)
    return out


def _digest(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def _fails_cleanly(capsys: pytest.CaptureFixture, argv: list[str], message: str) -> None:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err


def test_train_translate_evaluate_average(
    trained: Path, workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rows = {row["step"]: row for row in map(json.loads, (trained / ckpt.METRICS_FILE).read_text().splitlines())}
    assert sorted(rows) == [2, 3, 4, 6]  # logged at 2, 4, 6; BLEU at 3 and 6
    assert {"bleu", "chrf", "bleu_lowercase"} <= set(rows[3]) & set(rows[6]) and "valid_loss" in rows[2]
    assert ckpt.read_pointer_name(trained, "best") is not None

    output = tmp_path / "hyp.txt"
    assert main(["translate", str(trained), "--input", str(workspace["valid_src"]), "--output", str(output)]) == 0
    assert len(output.read_text().splitlines()) == len(workspace["valid_src"].read_text().splitlines())
    static = tmp_path / "hyp_static.txt"
    translate = ["translate", str(trained), "--input", str(workspace["valid_src"]), "--output", str(static)]
    assert main([*translate, "--static-step"]) == 0
    assert static.read_text() == output.read_text()

    capsys.readouterr()
    evaluate = ["evaluate", str(trained), "--src", str(workspace["valid_src"]), "--ref", str(workspace["valid_tgt"])]
    assert main(evaluate) == 0
    text = capsys.readouterr().out
    assert "BLEU " in text and "nrefs:1|case:mixed|eff:no|tok:13a" in text and "chrF " in text
    assert "BLEU lowercase" in text
    assert main([*evaluate, "--json", "--beam", "1"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert main([*evaluate, "--json", "--beam", "1", "--static-step"]) == 0
    assert json.loads(capsys.readouterr().out) == scores
    assert main([*evaluate, "--json", "--beam", "3", "--length-penalty", "0.0"]) == 0
    assert "bleu" in json.loads(capsys.readouterr().out)
    scored = {}
    for alpha in ("0.0", "2.0"):  # GNMT: score = log-prob / ((5 + length) / 6) ** alpha
        out = tmp_path / f"nbest_{alpha}.txt"
        nbest = ["--beam", "3", "--nbest", "1", "--length-penalty", alpha]
        assert main([*translate[:-2], "--output", str(out), *nbest]) == 0
        scored[alpha] = [float(line.rsplit("|||", 1)[1]) for line in out.read_text().splitlines()]
    assert scored["0.0"] != scored["2.0"]  # alpha reaches the search
    assert {"bleu", "bleu_lowercase", "chrf", "bleu_signature", "chrf_signature", "step"} <= set(scores)
    assert main([*evaluate, "--json", "--tokenize", "char"]) == 0  # for text written without spaces
    assert "|tok:char|" in json.loads(capsys.readouterr().out)["bleu_signature"]

    copy = Path(shutil.copytree(trained, tmp_path / "run"))
    assert main(["average", str(copy), "--last", "2"]) == 0
    averaged = Path(capsys.readouterr().out.strip())
    assert averaged.parent == copy / "checkpoints" and (averaged / ckpt.WEIGHTS_FILE).is_file()
    assert (
        main(["evaluate", str(averaged), "--src", str(workspace["valid_src"]), "--ref", str(workspace["valid_tgt"])])
        == 0
    )


def test_bad_training_inputs(
    trained: Path, workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    before = _digest(trained)
    short = tmp_path / "short.tgt"
    short.write_text("cat dog\n")
    bad_config = tmp_path / "bad.toml"
    bad_config.write_text("[optimizer]\nlr = 1\n")
    new = tmp_path / "new"
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory\n")
    missing_src = str(tmp_path / "missing.src")
    killed_early = tmp_path / "killed_early"  # what a run killed before its first checkpoint leaves
    killed_early.mkdir()
    (killed_early / ckpt.METRICS_FILE).write_text('{"step": 1, "train_loss": 4.0}\n')
    cases = [
        (_train_args(workspace, a_file), f"{a_file} is a file, not a directory; choose another --out"),
        (_train_args(workspace, killed_early), "holds files; no checkpoint to resume: pass --overwrite to replace"),
        (["train", "--out", str(killed_early), "--resume"], "no finished checkpoint; start afresh with --overwrite"),
        # the setting and its flag are named with the path (four data paths, relative to data.data_dir)
        (_train_args(workspace, new, "--train-src", missing_src), f"data.train_src not found: {missing_src} (set by"),
        # an unusable --out is found before the data is read (and a tokenizer trained on it, for minutes)
        (_train_args(workspace, a_file / "run", "--train-src", missing_src), "cannot create the run directory"),
        (_train_args(workspace, new, "--train-tgt", str(short)), "has 1; the files must be aligned"),
        (_train_args(workspace, new, "--set", "train.max_step=3"), "unknown key(s) max_step in [train]"),
        # refused before the data is read (the missing file would be named otherwise), not built until memory ends
        (
            _train_args(workspace, new, "--train-src", missing_src, "--set", "model.n_decoder_layers=100000000000"),
            "GiB of memory here, most of them for model.n_decoder_layers",
        ),
        # a run takes them from its tokenizer: a value given would play no part, silently
        (_train_args(workspace, new, "--set", "model.pad_id=3"), "model.pad_id cannot be set: a run takes its"),
        (
            _train_args(workspace, new, "--set", "model.src_vocab_size=300", "--set", "model.tgt_vocab_size=300"),
            "model.src_vocab_size, model.tgt_vocab_size cannot be set",
        ),
        (["train", "--config", str(bad_config), "--out", str(new)], "unknown section(s) optimizer"),
        (_train_args(workspace, trained), "already holds a run; pass --resume to continue it or --overwrite"),
        (["train", "--out", str(tmp_path / "none"), "--resume"], "nothing to resume"),
        (_train_args(workspace, trained, "--resume", "--set", "model.d_model=64"), "model.d_model is 64"),
        (["train", "--out", str(trained), "--resume", "--set", "model.dropout=0.5"], "only train.* and decode.*"),
    ]
    for argv, message in cases:
        _fails_cleanly(capsys, argv, message)
    assert not new.exists()
    assert _digest(trained) == before


def test_errors_name_the_flag_the_user_typed_and_the_key_a_set_gave(
    workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checks name config keys; a user who typed --device cuda is told about --device, not train.device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    new = tmp_path / "new"
    cases = [
        (
            _train_args(workspace, new, "--device", "cuda"),
            "error: --device cuda but no CUDA device is available; use --device cpu",
        ),
        (
            _train_args(workspace, new, "--set", 'train.device="cuda"'),
            "error: train.device=cuda but no CUDA device is available; use train.device=cpu",
        ),
        (  # --set comes after the flag: the value refused is the --set's
            _train_args(workspace, new, "--device", "cpu", "--set", 'train.device="cuda"'),
            "error: train.device=cuda but no CUDA",
        ),
        (_train_args(workspace, new, "--max-time", "-5"), "error: --max-time must be 0 (off) or positive, got -5.0"),
        (
            _train_args(workspace, new, "--max-steps", "0", "--set", "train.max_epochs=0"),
            "set at least one of --max-steps, train.max_epochs",
        ),
    ]
    for argv, message in cases:
        _fails_cleanly(capsys, argv, message)
    assert not new.exists()


def test_a_missing_partner_of_a_typed_flag_is_named_with_its_flag_too(
    workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """--valid-src without --valid-tgt said 'give both --valid-src and data.valid_tgt': a key the user of
    flags never met. The partner is named with its flag too; a config-file user still reads the keys."""
    new = tmp_path / "new"
    only_valid_src = [
        "train", "--out", str(new), "--train-src", str(workspace["train_src"]),
        "--train-tgt", str(workspace["train_tgt"]), "--valid-src", str(workspace["valid_src"]),
    ]  # fmt: skip
    _fails_cleanly(capsys, only_valid_src, "error: give both --valid-src and data.valid_tgt (--valid-tgt), or neither")
    in_set = [*only_valid_src[:-2], "--set", f'data.valid_src="{workspace["valid_src"]}"']
    _fails_cleanly(capsys, in_set, "error: give both data.valid_src and data.valid_tgt, or neither")
    assert not new.exists()


def test_a_tokenizer_that_is_not_a_directory_is_refused_before_the_data_is_read(
    workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A missing --tokenizer (or a file, or a directory without one) was found once the training text was read
    (a missing training file is named otherwise), a missing one as 'no tokenizer in X'; so was a corrupt model."""
    new, missing_src = tmp_path / "new", str(tmp_path / "missing.src")
    a_file, empty = tmp_path / "spm.model", tmp_path / "empty"
    a_file.write_text("not a directory\n")
    empty.mkdir()
    corrupt = tmp_path / "corrupt"  # refused only once the training text was read
    corrupt.mkdir()
    (corrupt / "spm.model").write_bytes(b"not a model")
    cases = [
        (corrupt, f"error: {corrupt / 'spm.model'} is not a valid sentencepiece model (corrupt or truncated)"),
        (tmp_path / "none", f"error: --tokenizer {tmp_path / 'none'}: no such directory; give the directory of a"),
        (a_file, f"error: --tokenizer {a_file} is a file; give the directory that holds the tokenizer"),
        (empty, f"error: --tokenizer {empty}: no tokenizer in it (expected spm.model, or spm.src.model and"),
    ]
    for tokenizer, message in cases:
        _fails_cleanly(
            capsys, _train_args(workspace, new, "--train-src", missing_src, "--tokenizer", str(tokenizer)), message
        )
    named = tmp_path / "named"  # a model under the name another toolkit gave it
    named.mkdir()
    (named / "en-de.model").write_bytes(b"")
    message = f"error: --tokenizer {named}: no tokenizer in it (expected spm.model, or spm.src.model and spm.tgt.model)"
    message += "; it holds en-de.model: copy a model of both languages to spm.model, or one per side to spm.src.model"
    _fails_cleanly(capsys, _train_args(workspace, new, "--tokenizer", str(named)), message)
    half = tmp_path / "half"  # one side's model: told to copy a model to the name it already had
    half.mkdir()
    (half / "spm.src.model").write_bytes(b"")
    message = f"error: --tokenizer {half}: no tokenizer in it (expected spm.model, or spm.src.model and spm.tgt.model)"
    message += "; it holds spm.src.model without spm.tgt.model: add the other side's model as spm.tgt.model"
    _fails_cleanly(capsys, _train_args(workspace, new, "--tokenizer", str(half)), message)
    set_key = ["--set", f'data.tokenizer="{tmp_path / "none"}"']
    _fails_cleanly(capsys, _train_args(workspace, new, *set_key), f"error: data.tokenizer {tmp_path / 'none'}: no such")
    assert not new.exists()


def test_a_given_tokenizer_made_for_other_text_is_warned_about(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A tokenizer trained on another script read half the training text as <unk>, and the run trained on
    it without a word; one made for the text (or with a rare <unk>) is not warned about."""
    corpus = write_corpus(tmp_path, n_train=40, n_valid=4)
    latin, greek = "abcdefghiklmnoprstuvwxyz", "αβψδεφγηικλμνοπρστυωχξυζ"
    lines = corpus["train_src"].read_text(encoding="utf-8").splitlines()
    other = [line.translate(str.maketrans(latin, greek)) for line in lines]
    Tokenizer.train(other, other, vocab_size=60).to_files(tmp_path / "greek")
    targets = corpus["train_tgt"].read_text(encoding="utf-8").splitlines()
    Tokenizer.train(lines, targets, vocab_size=60).to_files(tmp_path / "own")
    for name, warned in (("greek", True), ("own", False)):
        experiment = tiny_experiment(corpus, f"data.tokenizer='{tmp_path / name}'", "data.vocab_size=8000")
        training_run.start_run(experiment, tmp_path / f"run_{name}")
        error = capsys.readouterr().err
        for side in ("source", "target"):
            warning = f"% of the {side} pieces of the training text are <unk>: the tokenizer in {tmp_path / name} has"
            assert (warning in error) is warned


def test_a_resume_says_when_the_tokenizer_it_was_given_changed_since(
    workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A resume goes on with the run's own copy of its tokenizer; one replaced in data.tokenizer since was
    passed over without a word. A removed one needs no word: the run never reads it again."""
    sources = workspace["train_src"].read_text(encoding="utf-8").splitlines()
    targets = workspace["train_tgt"].read_text(encoding="utf-8").splitlines()
    given, out = tmp_path / "spm", tmp_path / "run"
    Tokenizer.train(sources, targets, vocab_size=60).to_files(given)
    assert main(_train_args(workspace, out, "--tokenizer", str(given), "--max-steps", "1")) == 0
    warning = f"warning: the tokenizer in {given} changed since this run started; the run goes on with its own copy"
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "2", "--quiet"]) == 0
    assert warning not in capsys.readouterr().err
    Tokenizer.train(sources, targets, vocab_size=50).to_files(given)
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "3", "--quiet"]) == 0
    assert warning in capsys.readouterr().err
    shutil.rmtree(given)
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "4", "--quiet"]) == 0
    assert "warning: the tokenizer" not in capsys.readouterr().err


def test_a_failed_setup_leaves_no_parent_directory_of_out_behind(
    workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The run directory is made (with its parents) before the data is read; a setup that then fails
    removes what it made, parents included, as when nothing was made before the data was read."""
    out = tmp_path / "runs" / "today" / "run"
    _fails_cleanly(capsys, _train_args(workspace, out, "--train-src", str(tmp_path / "missing.src")), "not found")
    assert not (tmp_path / "runs").exists()
    kept = tmp_path / "kept"  # a parent that existed before stays
    kept.mkdir()
    _fails_cleanly(capsys, _train_args(workspace, kept / "run", "--train-src", str(tmp_path / "missing.src")), "found")
    assert [path.name for path in kept.iterdir()] == []
    # a setup that fails after the encoded training data was saved (no pair fits train.max_tokens) leaves
    # nothing either: the same command gives the same error again, not "already holds files"
    for _ in range(2):
        _fails_cleanly(capsys, _train_args(workspace, out, "--set", "train.max_tokens=3"), "raise train.max_tokens")
        assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "problem, message",
    [
        ("misaligned", "has 6 lines but"),
        ("missing", "data.valid_tgt not found: "),
        ("undecodable", "invalid UTF-8"),
    ],
)
def test_a_bad_validation_file_fails_before_the_training_text_is_read(
    workspace: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    problem: str,
    message: str,
) -> None:
    """The validation files were read after the tokenizer was trained and the training text encoded:
    on a large corpus, minutes before a misaligned or undecodable file was found."""
    valid_tgt = tmp_path / "valid.tgt"
    if problem == "misaligned":
        valid_tgt.write_text(workspace["valid_tgt"].read_text(encoding="utf-8") + "one line more\n", encoding="utf-8")
    elif problem == "undecodable":
        valid_tgt.write_bytes(b"caf\xe9\n" * 6)  # Latin-1

    def read_too_late(*args, **kwargs) -> None:  # the tokenizer is trained on it next
        raise AssertionError("the training text was read before the validation files")

    monkeypatch.setattr(training_run, "read_training_text", read_too_late)
    _fails_cleanly(capsys, _train_args(workspace, tmp_path / "run", "--valid-tgt", str(valid_tgt)), message)
    assert not (tmp_path / "run").exists()


def test_prepare_data_reads_the_validation_files_before_the_training_text(
    workspace: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a resume calls (without text already read): a resume whose encoded cache no longer matches
    the training files encoded the whole corpus before it read the validation files."""
    valid_tgt = tmp_path / "valid.tgt"
    valid_tgt.write_text("one line\n", encoding="utf-8")
    experiment = tiny_experiment({**workspace, "valid_tgt": valid_tgt})
    tokenizer = Tokenizer.train(["ka lo mi"], ["cat dog"], vocab_size=48)

    def encoding_first(*args, **kwargs) -> None:
        raise AssertionError("the training text was encoded before the validation files were read")

    monkeypatch.setattr(training_text, "_training_pairs", encoding_first)
    with pytest.raises(ValueError, match="has 1; the files must be aligned"):
        training_text.prepare_data(experiment, tokenizer, say=print)


def test_bad_checkpoints_and_evaluation_inputs(
    trained: Path, workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    src, ref = str(workspace["valid_src"]), str(workspace["valid_tgt"])
    _fails_cleanly(capsys, ["evaluate", str(run), "--src", src, "--ref", str(workspace["train_tgt"])], "lines but")
    _fails_cleanly(capsys, ["average", str(run), "--last", "9"], "ask for --last")
    _fails_cleanly(capsys, ["average", str(run), "--last", "1", "--out", str(workspace["dir"])], "already exists")

    last = run / "checkpoints" / ckpt.read_pointer_name(run, "latest")
    weights = last / ckpt.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:64])
    argv = ["evaluate", str(run), "--which", "last", "--src", src, "--ref", ref]
    _fails_cleanly(capsys, argv, f"{weights}: corrupt or truncated weights")
    _fails_cleanly(capsys, ["train", "--out", str(run), "--resume"], f"{weights}: corrupt or truncated")
    shutil.copy(trained / "checkpoints" / last.name / ckpt.WEIGHTS_FILE, weights)

    description = last / ckpt.EXPERIMENT_FILE
    description.write_text(json.dumps({**json.loads(description.read_text()), "format_version": 0}))
    _fails_cleanly(capsys, argv, "format_version 0 (written by tformer")
    state = last / ckpt.STATE_FILE
    state.write_bytes(b"not a torch file")
    _fails_cleanly(capsys, ["train", "--out", str(run), "--resume"], "format_version 0")


def test_evaluate_scores_several_references_and_keeps_its_translations(
    trained: Path, workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import sacrebleu

    src, ref = workspace["valid_src"], workspace["valid_tgt"]
    second = tmp_path / "second.tgt"  # another reference per line: every line with its words reversed
    second.write_text("".join(" ".join(line.split()[::-1]) + "\n" for line in ref.read_text().splitlines()))
    output = tmp_path / "out" / "hyp.txt"
    evaluate = ["evaluate", str(trained), "--src", str(src), "--json"]
    capsys.readouterr()
    assert main([*evaluate, "--ref", str(ref), str(second), "--output", str(output)]) == 0
    scores = json.loads(capsys.readouterr().out)
    hypotheses = output.read_text().splitlines()
    assert len(hypotheses) == len(src.read_text().splitlines())
    references = [ref.read_text().splitlines(), second.read_text().splitlines()]
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, references).score)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hypotheses, references).score)
    assert scores["bleu_signature"].startswith("nrefs:2|")
    # the translations are the ones translate gives, and the file is kept unless --overwrite
    translated = tmp_path / "translated.txt"
    assert main(["translate", str(trained), "--input", str(src), "--output", str(translated)]) == 0
    assert translated.read_text() == output.read_text()
    kept = output.read_bytes()
    _fails_cleanly(capsys, [*evaluate, "--ref", str(ref), "--output", str(output)], "pass --overwrite")
    _fails_cleanly(capsys, [*evaluate, "--ref", str(ref), "--output", str(ref)], "is the --ref file")
    assert output.read_bytes() == kept
    assert main([*evaluate, "--ref", str(ref), "--output", str(output), "--overwrite", "--beam", "1"]) == 0
    short = tmp_path / "short.tgt"
    short.write_text("cat\n")
    _fails_cleanly(capsys, [*evaluate, "--ref", str(ref), str(short)], f"but {short} has 1")


def test_evaluate_takes_repeated_ref_flags_as_several_references(
    trained: Path, workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`--ref A --ref B` scores against both, as `--ref A B` does (it kept only B: nrefs:1)."""
    src, ref = workspace["valid_src"], workspace["valid_tgt"]
    second = tmp_path / "second.tgt"
    second.write_text("".join(" ".join(line.split()[::-1]) + "\n" for line in ref.read_text().splitlines()))
    evaluate = ["evaluate", str(trained), "--src", str(src), "--json", "--beam", "1"]
    capsys.readouterr()
    assert main([*evaluate, "--ref", str(ref), str(second)]) == 0
    together = json.loads(capsys.readouterr().out)
    assert main([*evaluate, "--ref", str(ref), "--ref", str(second)]) == 0
    repeated = json.loads(capsys.readouterr().out)
    assert repeated["bleu_signature"].startswith("nrefs:2|")
    assert repeated == together


def test_evaluate_writes_its_output_into_a_pipe_in_place(
    trained: Path, workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """--output /dev/stdout or a FIFO is written into, as translate's --output is: not refused as an
    existing file, and never replaced by a regular file (as root, os.replace would replace a device)."""
    src, ref = workspace["valid_src"], workspace["valid_tgt"]
    expected = tmp_path / "expected.txt"
    assert main(["translate", str(trained), "--input", str(src), "--output", str(expected)]) == 0
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for extra in ([], ["--overwrite"]):
        received: list[str] = []
        reader = threading.Thread(target=lambda into=received: into.append(fifo.read_text()))
        reader.start()
        try:
            code = main(["evaluate", str(trained), "--src", str(src), "--ref", str(ref), "--output", str(fifo), *extra])
        finally:
            reader.join(timeout=10)
            if reader.is_alive():  # nothing was written into the pipe: let the reader go
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                reader.join()
        assert code == 0, capsys.readouterr().err
        assert stat.S_ISFIFO(fifo.stat().st_mode)
        assert received == [expected.read_text()]


def test_decoding_settings_from_the_command_line(
    trained: Path, workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    src = workspace["valid_src"]

    def translate(*flags: str) -> list[str]:
        capsys.readouterr()
        assert main(["translate", str(trained), "--input", str(src), *flags]) == 0
        return capsys.readouterr().out.splitlines()

    greedy = translate("--beam", "1")
    sampled = translate("--set", "decode.sampling=true", "--set", "decode.temperature=5.0", "--set", "decode.seed=3")
    assert sampled != greedy  # a hot temperature: not the most probable tokens
    assert translate("--set", "decode.sampling=true", "--set", "decode.temperature=5.0", "--set", "decode.seed=3") == (
        sampled
    )  # the seed makes it reproducible
    # an output length bound of the run's config changed for this command only: one token at most
    for line in translate("--set", "decode.max_len_a=0", "--set", "decode.max_len_b=1"):
        assert len(line.split()) <= 1
    # sampling draws --nbest samples whatever the run's beam (2 here): 3 lines per input line
    samples = translate("--set", "decode.sampling=true", "--nbest", "3")
    assert len(samples) == 3 * len(src.read_text().splitlines()) and all(" ||| " in line for line in samples)
    # the command's own flags come after --set
    assert translate("--set", "decode.beam_size=3", "--beam", "1") == greedy
    for bad, message in (
        ("model.d_model=8", "--set takes decoding settings"),
        ("decode.topk=3", "unknown key(s) topk in [decode]"),
        ("decode.temperature=0", "temperature must be positive"),
    ):
        _fails_cleanly(capsys, ["translate", str(trained), "--input", str(src), "--set", bad], message)
        evaluate = ["evaluate", str(trained), "--src", str(src), "--ref", str(workspace["valid_tgt"])]
        _fails_cleanly(capsys, [*evaluate, "--set", bad], message)


def test_overwrite_keeps_the_old_run_until_the_new_one_has_finished(
    trained: Path, workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    before = _digest(run)
    failing = _train_args(workspace, run, "--overwrite", "--set", "train.max_tokens=3")  # every pair overlong
    _fails_cleanly(capsys, failing, "raise train.max_tokens")
    assert _digest(run) == before
    diverging = _train_args(workspace, run, "--overwrite", "--set", "train.peak_lr=1e30")  # fails while training
    _fails_cleanly(capsys, diverging, "training diverged")
    assert _digest(run) == before
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".run.")]  # staging removed
    assert main(_train_args(workspace, run, "--overwrite", "--set", "train.max_steps=2")) == 0
    assert ckpt.read_pointer_name(run, "latest") == "step-00000002"
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".run.")]


def test_a_diverged_overwrite_names_the_run_it_keeps_not_its_removed_staging(
    trained: Path, workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A replacing run that diverged after a checkpoint named that checkpoint, inside the hidden staging
    directory it had just removed, as "the last good checkpoint"; RUN_DIR keeps the previous run."""
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    before = _digest(run)
    argv = _train_args(workspace, run, "--overwrite", "--set", "train.peak_lr=1e30", "--set", "train.save_every=1")
    _fails_cleanly(capsys, argv, f"the new run was discarded; {run} keeps the previous run unchanged")
    assert _digest(run) == before
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".run.")]


def test_a_loop_of_symbolic_links_given_as_data_is_refused_in_one_line(
    workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A link that leads back to itself stopped the run with pathlib's RuntimeError traceback."""
    loop = tmp_path / "loop.src"
    loop.symlink_to(loop.name)
    argv = _train_args(workspace, tmp_path / "run")
    argv[argv.index(str(workspace["train_src"]))] = str(loop)
    _fails_cleanly(capsys, argv, f"--train-src {loop} cannot be followed: it is a loop of symbolic links")
    argv = [*_train_args(workspace, tmp_path / "run"), "--data-dir", str(loop)]
    _fails_cleanly(capsys, argv, f"--data-dir {loop} cannot be followed")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("bleu_every", [None, "0"], ids=["bleu", "no-bleu"])
def test_a_banned_id_outside_the_vocabulary_stops_a_new_run_before_it_trains(
    workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, bleu_every: str | None
) -> None:
    """The run trained until its first validation BLEU, then failed there; without BLEU it trained to the
    end and saved checkpoints whose decoding settings no translate, evaluate or serve of them accepts."""
    run = tmp_path / "banned"
    no_bleu = ["--set", f"train.bleu_every={bleu_every}", "--set", "train.stop_metric=loss"] if bleu_every else []
    argv = _train_args(workspace, run, "--set", "decode.banned_ids=[99999]", *no_bleu)
    _fails_cleanly(capsys, argv, "decode.banned_ids holds")
    assert not run.exists()


def test_a_failed_checkpoint_save_names_the_checkpoint_the_run_keeps(
    trained: Path, workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    """A full disk during a save was "error: [Errno 28] No space left on device": which checkpoint the run
    kept, and that --resume continues it, went unsaid (and an --overwrite's staged run is discarded)."""
    real_save = checkpoint_save.save_checkpoint
    saves: list[str] = []

    def second_save_fails(run_dir, name, **kwargs):
        saves.append(name)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(run_dir, name, **kwargs)

    monkeypatch.setattr(checkpoint_save, "save_checkpoint", second_save_fails)
    run = tmp_path / "full"
    capsys.readouterr()
    assert main(_train_args(workspace, run)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: could not save checkpoint {saves[1]} (No space left on device); ")
    assert f"the run keeps its last checkpoint, {run / ckpt.CHECKPOINTS_DIR / saves[0]}; " in err
    assert f"continue it with: tformer train --out {run} --resume" in err and err.count("\n") == 1
    assert ckpt.read_pointer_name(run, "latest") == saves[0]
    monkeypatch.setattr(checkpoint_save, "save_checkpoint", real_save)
    assert main(_train_args(workspace, run, "--resume")) == 0  # the advice works

    saves.clear()
    monkeypatch.setattr(checkpoint_save, "save_checkpoint", second_save_fails)
    old = Path(shutil.copytree(trained, tmp_path / "old"))
    before = _digest(old)
    _fails_cleanly(capsys, _train_args(workspace, old, "--overwrite"), f"the new run was discarded; {old} keeps")
    assert _digest(old) == before
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".old.")]


def test_a_full_disk_while_logging_names_the_checkpoint_the_run_keeps(
    trained: Path, workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    """A metrics.jsonl row that could not be written (a full disk) ended the run with "error: [Errno 28] No
    space left on device", naming neither the file nor the checkpoint that a resume continues from."""
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    kept = ckpt.read_pointer_name(run, "latest")

    def disk_full(self, row):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loop.MetricsLog, "append", disk_full)
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "100", "--quiet"]) == 2
    assert capsys.readouterr().err == (
        f"error: could not write {run / ckpt.METRICS_FILE} (No space left on device); the run keeps its last "
        f"checkpoint, {run / ckpt.CHECKPOINTS_DIR / kept}; continue it with: tformer train --out {run} --resume\n"
    )
    assert ckpt.read_pointer_name(run, "latest") == kept


CPU_OUT_OF_MEMORY = (
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
    "allocate 5734400 bytes. Error code 12 (Cannot allocate memory)"
)


def test_running_out_of_memory_mid_run_names_what_to_lower_and_the_checkpoint_the_run_keeps(
    trained: Path, workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    """An out of memory in step 3 was "error: out of memory (...); a smaller beam, batch or model needs
    less": no training setting named, and the checkpoint of step 2 that --resume continues went unsaid."""
    real_step = loop.train_step
    steps: list[int] = []

    def third_step_fails(*args, **kwargs):
        steps.append(len(steps) + 1)
        if len(steps) == 3:
            raise RuntimeError(CPU_OUT_OF_MEMORY)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", third_step_fails)
    run = tmp_path / "run"
    _fails_cleanly(capsys, _train_args(workspace, run), "lower --max-tokens (train.max_tokens), pass --loss-chunk")
    assert ckpt.read_pointer_name(run, "latest") == "step-00000002"
    steps.clear()
    assert main(_train_args(workspace, tmp_path / "again")) == 2
    assert capsys.readouterr().err == (
        f"error: out of memory ({CPU_OUT_OF_MEMORY}); lower --max-tokens (train.max_tokens), pass --loss-chunk 1024 "
        f"or train a smaller model; the run keeps its last checkpoint, {tmp_path / 'again' / ckpt.CHECKPOINTS_DIR}"
        f"/step-00000002; continue it with: tformer train --out {tmp_path / 'again'} --resume\n"
    )

    steps.clear()
    old = Path(shutil.copytree(trained, tmp_path / "old"))
    before = _digest(old)
    _fails_cleanly(capsys, _train_args(workspace, old, "--overwrite"), f"the new run was discarded; {old} keeps")
    assert _digest(old) == before


def test_overwrite_names_the_checkpoints_where_the_replacing_run_ends_up(
    trained: Path, workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The replacing run trains in a hidden staging directory renamed to RUN_DIR at the end: its closing
    line named its last checkpoint inside the staging directory, a path gone by the time it was read."""
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    capsys.readouterr()
    args = [arg for arg in _train_args(workspace, run, "--overwrite", "--set", "train.max_steps=2") if arg != "--quiet"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"last checkpoint {run / ckpt.CHECKPOINTS_DIR / 'step-00000002'}" in err
    assert ".overwrite-" not in err
    assert (run / ckpt.CHECKPOINTS_DIR / "step-00000002").is_dir()


def test_overwrite_through_a_symbolic_link_replaces_the_run_it_names(
    trained: Path, workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """--overwrite of a RUN_DIR that is a symbolic link to a run trained the whole new run, then renamed
    the link away, put the new run where the link was, left the old run untouched and failed with
    "Cannot call rmtree on a symbolic link" (no path), leaving a hidden `.link.replaced-PID` behind."""
    real = Path(shutil.copytree(trained, tmp_path / "real"))
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    capsys.readouterr()
    assert main(_train_args(workspace, link, "--overwrite", "--set", "train.max_steps=2")) == 0
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert ckpt.read_pointer_name(real, "latest") == "step-00000002"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["link", "real"]


def test_overwrite_takes_the_old_runs_encoded_data_when_it_would_encode_the_same(
    trained: Path, workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    """--overwrite encoded the training text again even when the files, the tokenizer and the settings
    were those of the run it replaced (minutes on a large corpus); it now hard-links that run's cache."""
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    (old_cache,) = (run / "encoded").iterdir()
    before = _digest(run)
    encoded_sizes: list[int] = []
    real = training_text.encode_rows
    monkeypatch.setattr(
        training_text, "encode_rows", lambda e, texts: encoded_sizes.append(len(texts)) or real(e, texts)
    )
    # a new run that fails while training, after taking the cache: the old run keeps every file, unshared
    _fails_cleanly(capsys, _train_args(workspace, run, "--overwrite", "--set", "train.peak_lr=1e30"), "diverged")
    assert encoded_sizes == [6, 6]  # the validation set only: the 80 training pairs came from the old run
    assert _digest(run) == before
    assert all(path.stat().st_nlink == 1 for path in old_cache.iterdir())  # the links went with the new run
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".run.")]
    encoded_sizes.clear()
    assert main(_train_args(workspace, run, "--overwrite", "--set", "train.max_steps=2")) == 0
    assert encoded_sizes == [6, 6]
    assert [path.name for path in (run / "encoded").iterdir()] == [old_cache.name]
    assert {name: digest for name, digest in _digest(run).items() if name.startswith("encoded/")} == {
        name: digest for name, digest in before.items() if name.startswith("encoded/")
    }
    # other settings that decide the pairs: encoded again, and the new run keeps only its own cache
    encoded_sizes.clear()
    assert main(_train_args(workspace, run, "--overwrite", "--set", "data.max_chars=900")) == 0
    assert 80 in encoded_sizes
    assert [path.name for path in (run / "encoded").iterdir()] != [old_cache.name]


def test_overwrite_removes_the_hidden_directories_of_earlier_overwrites_whose_process_is_gone(
    trained: Path, workspace: dict[str, Path], tmp_path: Path
) -> None:
    """An --overwrite killed outright (SIGKILL, or the OOM killer) leaves its hidden staging directory, a
    whole run, or the replaced run it was deleting; the next --overwrite of that RUN_DIR removes them, but not
    one whose process still lives (the replaced run was left for good)."""
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    finished = subprocess.Popen([sys.executable, "-c", ""])
    finished.wait()
    gone = Path(shutil.copytree(trained, tmp_path / f".run.overwrite-{finished.pid}"))
    half_deleted = Path(shutil.copytree(trained, tmp_path / f".run.replaced-{finished.pid}"))  # killed deleting it
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as living:
        alive = tmp_path / f".run.overwrite-{living.pid}"
        alive.mkdir()
        other_run = Path(shutil.copytree(trained, tmp_path / f".other.overwrite-{finished.pid}"))
        users = [tmp_path / f".run.overwrite-keep-{finished.pid}", tmp_path / ".run.replaced-keep"]  # not --overwrite's
        for folder in users:
            folder.mkdir()
        try:
            assert main(_train_args(workspace, run, "--overwrite", "--set", "train.max_steps=2")) == 0
        finally:
            living.kill()
    assert not gone.exists() and not half_deleted.exists()
    assert alive.is_dir() and other_run.is_dir()  # a live writer's, and another RUN_DIR's
    assert all(folder.is_dir() for folder in users)
    assert ckpt.read_pointer_name(run, "latest") == "step-00000002"


def test_overwrite_of_a_run_whose_name_is_near_the_file_systems_limit_stages_it_under_a_shorter_name(
    trained: Path, workspace: dict[str, Path], tmp_path: Path
) -> None:
    """A RUN_DIR of 240 characters (the limit is 255) failed with "File name too long" naming the hidden
    `.NAME.overwrite-PID`, which the user never gave: the hidden names now hold NAME's first 200 characters,
    as write_atomic's do, and the clean-up of an earlier --overwrite killed outright still finds them."""
    run = Path(shutil.copytree(trained, tmp_path / ("r" * 240)))
    finished = subprocess.Popen([sys.executable, "-c", ""])
    finished.wait()
    gone = Path(shutil.copytree(trained, tmp_path / f".{'r' * 200}.overwrite-{finished.pid}"))
    assert main(_train_args(workspace, run, "--overwrite", "--set", "train.max_steps=2")) == 0
    assert not gone.exists() and sorted(tmp_path.iterdir()) == [run]
    assert ckpt.read_pointer_name(run, "latest") == "step-00000002"


def test_an_interrupt_while_overwrite_puts_the_new_run_in_place_waits_until_it_is_done(
    trained: Path, workspace: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Ctrl-C (or SIGTERM) while --overwrite renamed the runs and deleted the old one stopped it there: between
    the renames it left no RUN_DIR at all, during the deletion a hidden half-deleted `.run.replaced-PID`."""
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    rmtree = shutil.rmtree

    def interrupted_rmtree(path, *args, **kwargs) -> None:
        if ".replaced-" in Path(path).name:
            signal.raise_signal(signal.SIGINT)
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(train_cli.shutil, "rmtree", interrupted_rmtree)
    assert main(_train_args(workspace, run, "--overwrite", "--set", "train.max_steps=2")) == 130
    captured = capsys.readouterr()  # the interrupt comes after the line saying the swap was done, not instead
    assert "interrupted" in captured.err and f"run {run} (replaced the previous run): step 2" in captured.out
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]
    assert ckpt.read_pointer_name(run, "latest") == "step-00000002"


def test_overwrite_is_advised_only_for_a_directory_it_replaces(
    workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """--overwrite refuses a directory of files that are no run's, so a plain start or a --resume refused
    there must not send the user to --overwrite (both did, for any directory holding files)."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine\n")
    refusals = [
        (_train_args(workspace, mine), f"{mine} already holds files; no run is there to resume or replace"),
        (["train", "--out", str(mine), "--resume"], "it holds no finished checkpoint, nor anything of a run"),
    ]
    for argv, message in refusals:
        _fails_cleanly(capsys, argv, message)
        assert main(argv) == 2 and "--overwrite" not in capsys.readouterr().err
    _fails_cleanly(capsys, _train_args(workspace, mine, "--overwrite"), "--overwrite replaces a run, but")
    assert [path.name for path in mine.iterdir()] == ["notes.txt"]


def test_overwrite_refuses_a_directory_that_holds_no_run(
    workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / "data"  # e.g. --out given the data directory by mistake
    data.mkdir()
    for name in ("train.src", "train.tgt"):
        shutil.copy(workspace[name.replace(".", "_")], data / name)
    (data / "notes.txt").write_text("mine\n")
    before = _digest(data)
    argv = [*_train_args(workspace, data, "--overwrite"), "--train-src", str(data / "train.src")]
    _fails_cleanly(capsys, argv, f"--overwrite replaces a run, but {data} holds no run (it holds notes.txt and 2 more)")
    assert _digest(data) == before
    assert [path.name for path in tmp_path.iterdir()] == ["data"]

    killed_early = tmp_path / "killed_early"  # a run killed before its first checkpoint: replaced
    killed_early.mkdir()
    (killed_early / ckpt.METRICS_FILE).write_text('{"step": 1, "train_loss": 4.0}\n')
    assert main(_train_args(workspace, killed_early, "--overwrite", "--max-steps", "2")) == 0
    assert ckpt.read_pointer_name(killed_early, "latest") == "step-00000002"


def test_overwrite_refuses_to_delete_the_data_the_new_run_reads(
    trained: Path, workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Training text kept in the run directory would be deleted with the old run, and a --resume of the
    new one reads it again: --overwrite refuses before training (it deleted it, and the resume failed)."""
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    for name in ("train.src", "train.tgt"):
        shutil.copy(workspace[name.replace(".", "_")], run / name)
    before = _digest(run)
    argv = [*_train_args(workspace, run, "--overwrite"), "--train-src", str(run / "train.src")]
    _fails_cleanly(capsys, argv, f"--overwrite would delete {(run / 'train.src').resolve()} (--train-src)")
    assert _digest(run) == before


def _interrupt_at_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Ctrl-C arrives while the loop computes the learning rate of `step`."""
    schedule = loop.learning_rate

    def learning_rate(at: int, *args: object, **kwargs: object) -> float:
        if at == step:
            raise KeyboardInterrupt
        return schedule(at, *args, **kwargs)

    monkeypatch.setattr(loop, "learning_rate", learning_rate)


def test_ctrl_c_says_what_the_run_kept(
    trained: Path,
    workspace: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    run = tmp_path / "run"
    _interrupt_at_step(monkeypatch, 5)
    capsys.readouterr()
    assert main(_train_args(workspace, run)) == 130
    kept = run / "checkpoints" / "step-00000004"
    resume = f"tformer train --out {run} --resume"
    assert (
        capsys.readouterr().err
        == f"interrupted: the run keeps its last checkpoint, {kept}; continue it with: {resume}\n"
    )

    _interrupt_at_step(monkeypatch, 1)
    assert main(_train_args(workspace, tmp_path / "early")) == 130
    nothing_kept = f"no checkpoint of {tmp_path / 'early'} was saved yet, so nothing to resume"
    assert capsys.readouterr().err == f"interrupted: {nothing_kept}: start afresh with --overwrite\n"

    replaced = Path(shutil.copytree(trained, tmp_path / "replaced"))
    before = _digest(replaced)
    assert main(_train_args(workspace, replaced, "--overwrite")) == 130
    expected = f"interrupted: the new run was discarded; {replaced} keeps the previous run unchanged\n"
    assert capsys.readouterr().err == expected
    assert _digest(replaced) == before


def test_sigterm_during_an_overwrite_keeps_the_old_run_and_leaves_nothing_hidden(
    trained: Path, workspace: dict[str, Path], tmp_path: Path
) -> None:
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    before = _digest(run)
    argv = _train_args(workspace, run, "--overwrite", "--max-steps", "100000")
    process = subprocess.Popen(
        [sys.executable, "-m", "tformer.cli.main", *argv],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    staging = tmp_path / f".run.overwrite-{process.pid}"
    deadline = time.monotonic() + 120
    while not (staging / "latest").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # a checkpoint of the new run exists: it is well under way
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr  # not killed by SIGINT: test_an_interrupt_that_left_a_string_exec...
    assert stderr == f"interrupted: the new run was discarded; {run} keeps the previous run unchanged\n"
    assert _digest(run) == before
    assert [path.name for path in tmp_path.iterdir()] == ["run"]


@pytest.mark.parametrize("evaluated", ["exec", "eval"])
def test_an_interrupt_that_left_a_string_exec_still_exits_130_under_python_m(tmp_path: Path, evaluated: str) -> None:
    """A Ctrl-C or SIGTERM that lands in a string exec/eval (the methods a dataclass makes while a module is
    imported, as when validation first imports decoding) left CPython's "unhandled KeyboardInterrupt" flag
    set, so `python -m tformer` died by SIGINT after main() had said "interrupted" and returned 130 (the
    flaky exit of test_sigterm_during_an_overwrite...). Made certain here: the command raises it in one."""
    (tmp_path / "interrupted_in_exec.py").write_text(
        "import sys\n"
        "from tformer.cli import info\n"
        f"info.run = lambda args: {evaluated}('(_ for _ in ()).throw(KeyboardInterrupt)', {{}})\n"
        "from tformer.cli.main import program\n"
        "program(['info'])\n"
    )
    source = str(Path(train_cli.__file__).resolve().parents[2])  # the tformer these tests import
    done = subprocess.run(
        [sys.executable, "-m", "interrupted_in_exec"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), source])},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stderr) == (130, "interrupted\n")


def test_plain_flags_and_resume_with_a_larger_budget(
    workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "flags"
    argv = [
        "train", "--train-src", str(workspace["train_src"]), "--train-tgt", str(workspace["train_tgt"]),
        "--preset", "tiny", "--vocab-size", "40", "--max-tokens", "200", "--max-steps", "2", "--device", "cpu",
        "--out", str(out), "--quiet",
    ]  # fmt: skip
    assert main(argv) == 0
    assert "step 2, reached max_steps=2" in capsys.readouterr().out
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "3", "--quiet"]) == 0
    assert "step 3, reached max_steps=3" in capsys.readouterr().out
    assert main([*argv[:-3], "--max-steps", "4", "--out", str(out), "--resume", "--quiet"]) == 0
    assert "step 4, reached max_steps=4" in capsys.readouterr().out


def test_compile_flag_takes_an_optional_mode() -> None:
    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    out = ["--out", "run"]
    assert parser.parse_args(out).compile == "none"
    assert parser.parse_args([*out, "--compile"]).compile == "layers"
    assert parser.parse_args([*out, "--compile", "model"]).compile == "model"


def test_ensembles_in_translate_and_evaluate(
    trained: Path, workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """--ensemble decodes with the average of the members' log-probabilities: a model with itself
    scores as the model alone, another checkpoint changes the scores; a member with another tokenizer
    is refused in one line."""
    first = trained / "checkpoints" / "step-00000002"
    translate = ["translate", str(trained), "--input", str(workspace["valid_src"]), "--nbest", "2", "--beam", "2"]

    def nbest(*extra: str) -> list[tuple[str, float]]:
        output = tmp_path / "nbest.txt"
        assert main([*translate, "--output", str(output), "--overwrite", *extra]) == 0
        rows = [line.split(" ||| ") for line in output.read_text().splitlines()]
        return [(text, float(score)) for _, text, score in rows]

    alone = nbest()
    with_itself = nbest("--ensemble", str(trained))
    assert [text for text, _ in with_itself] == [text for text, _ in alone]
    assert [score for _, score in with_itself] == pytest.approx([score for _, score in alone], abs=2e-4)
    assert [score for _, score in nbest("--ensemble", str(first))] != [score for _, score in alone]

    capsys.readouterr()
    evaluate = ["evaluate", str(trained), "--src", str(workspace["valid_src"]), "--ref", str(workspace["valid_tgt"])]
    assert main([*evaluate, "--json", "--ensemble", str(first), str(trained)]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["ensemble"] == [str(first), str(trained)] and "bleu" in row

    other = tmp_path / "other"
    assert main(_train_args(workspace, other, "--vocab-size", "40", "--set", "train.max_steps=2")) == 0
    _fails_cleanly(capsys, [*evaluate, "--ensemble", str(other)], "trained with a different tokenizer")

    # the other direction, with the same tokenizer: accepted before, its average of log-probabilities garbage
    backwards = tmp_path / "backwards"
    swapped = _train_args(workspace, backwards, "--set", "train.max_steps=2", "--tokenizer", str(first / "tokenizer"))
    swapped[swapped.index("--train-src") + 1], swapped[swapped.index("--train-tgt") + 1] = (
        str(workspace["train_tgt"]),
        str(workspace["train_src"]),
    )
    assert main(swapped) == 0
    _fails_cleanly(capsys, [*evaluate, "--ensemble", str(backwards)], "the opposite direction of")


def test_train_and_resume_leave_the_process_group_after_success(
    workspace: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tformer train` ends a (torchrun) run by Distributed.shutdown: a barrier, then the process group is
    destroyed, as NCCL and gloo expect before the processes exit; a resumed run too."""
    from tformer.runtime import Distributed

    calls = []
    monkeypatch.setattr(Distributed, "shutdown", lambda self: calls.append(self.world_size))
    out = tmp_path / "run"
    assert main(_train_args(workspace, out, "--set", "train.max_steps=2")) == 0
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "3", "--quiet"]) == 0
    assert calls == [1, 1]


def test_resume_accepts_unchanged_settings_and_names_a_changed_one(
    trained: Path, workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """--resume lays what the command gives over the run's own settings, not over the defaults: a data
    flag repeated with its value is accepted, and a really different value is named, key and values, with
    the other keys that differ and the presets the user chose rather than the d_model they imply."""
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    resume = ["train", "--out", str(run), "--resume", "--quiet"]
    assert main([*resume, "--train-src", str(workspace["train_src"]), "--max-steps", "7"]) == 0
    assert "step 7, reached max_steps=7" in capsys.readouterr().out
    assert main([*resume, "--vocab-size", "48", "--preset", "tiny", "--max-steps", "8"]) == 0
    assert "step 8, reached max_steps=8" in capsys.readouterr().out
    before = _digest(run)
    small_config = tmp_path / "small.toml"  # a recipe's [model] table, as `--config multi30k_en_de` gives it
    small_config.write_text('[model]\npreset = "small"\ndropout = 0.3\n')
    cases = [
        (["--vocab-size", "200"], "error: --resume: --vocab-size is 200 but the run has 48; a resumed run keeps"),
        (
            ["--preset", "base"],
            "error: --resume: the command asks for preset base's shape but the run has preset tiny's: model.d_model "
            "is 512 but the run has 32 (and model.n_heads, model.d_ff, model.n_encoder_layers, model.n_decoder_layers, "
            "model.dropout differ); a resumed run keeps its model and data (only train.* and decode.* may change): "
            "leave model and data settings out of the command (and out of its --config file) to keep the run's, or "
            "train with the changed ones into another --out\n",
        ),
        (["--config", str(small_config)], "the command asks for preset small's shape but the run has preset tiny's"),
        (["--set", "model.d_model=48"], "the run has preset tiny's shape: model.d_model is 48 but the run has 32; a"),
        (["--preset", "tiny", "--set", "model.dropout=0.2"], "error: --resume: model.dropout is 0.2 but the run has"),
        (["--train-src", str(workspace["valid_src"])], "error: --resume: --train-src is '"),
        (["--set", "model.nonsense=1"], "unknown key(s) nonsense in [model]; valid keys: preset, "),
        # taken from the run's tokenizer when the command leaves them out, so a value given must be the run's
        (["--set", "model.pad_id=3"], "error: --resume: model.pad_id is 3 but the run has 0, its tokenizer's"),
        (
            ["--set", "model.src_vocab_size=40", "--set", "model.tgt_vocab_size=40"],
            "error: --resume: model.src_vocab_size is 40 but the run has 48, its tokenizer's",
        ),
    ]
    for extra, message in cases:
        _fails_cleanly(capsys, [*resume, *extra], message)
    assert _digest(run) == before
    assert training_resume.resumed_experiment(run, {"model": {"pad_id": 0, "src_vocab_size": 48}}).model.pad_id == 0


def test_train_help_keeps_the_layout_of_its_description(capsys: pytest.CaptureFixture) -> None:
    """The --resume/--overwrite explanation is a list; argparse's default formatter would join it up."""
    parser = argparse.ArgumentParser(description=train_cli.__doc__)
    train_cli.add_arguments(parser)
    for text in (parser.format_help(), _help_of("train", capsys)):
        assert "\n  --resume     continue RUN_DIR from its last checkpoint" in text
        assert "\n  --overwrite  replace RUN_DIR, all of it" in text
        assert "\n\nSeveral processes" in text


def _help_of(command: str, capsys: pytest.CaptureFixture) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return capsys.readouterr().out


def test_non_finite_numbers_are_one_line_errors_naming_the_key(
    trained: Path, workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    new = tmp_path / "new"
    cases = [
        (_train_args(workspace, new, "--max-time", "nan"), "--max-time must be a finite number, got nan"),
        (_train_args(workspace, new, "--set", "train.peak_lr=nan"), "train.peak_lr must be a finite number"),
        (_train_args(workspace, new, "--set", "decode.length_penalty=nan"), "decode.length_penalty must be a finite"),
        (
            ["translate", str(trained), "--input", str(workspace["valid_src"]), "--length-penalty", "inf"],
            "--length-penalty must be a finite number, got inf",  # the flag typed, as train names its flags
        ),
    ]
    for argv, message in cases:
        _fails_cleanly(capsys, argv, message)
    assert not new.exists()


class _FakeTrainer:
    def train(self) -> TrainResult:
        return TrainResult(3, "reached max_steps=3", None, 0, Path("unused"))


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_0_prints_the_closing_line(
    rank: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Every process of a torchrun run ends `tformer train`; only rank 0 prints "run DIR: step N, ..."
    (a fake rank of a 2-process group stands in for torchrun; training is faked too)."""
    monkeypatch.setattr(runtime, "init_distributed", lambda device, rendezvous: Distributed(rank=rank, world_size=2))
    monkeypatch.setattr(training_run, "start_run", lambda *args, **kwargs: _FakeTrainer())
    monkeypatch.setattr(training_resume, "resume_run", lambda *args, **kwargs: _FakeTrainer())
    monkeypatch.setattr(
        training_resume, "resumed_experiment", lambda run_dir, given, processes: tiny_experiment(write_corpus(tmp_path))
    )
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--quiet"]) == 0
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 0
    printed = capsys.readouterr().out
    expected = f"run {out}: step 3, reached max_steps=3\n"
    assert printed == (2 * expected if rank == 0 else "")


def test_a_run_that_stops_between_log_rows_prints_the_loss_of_its_last_steps(
    workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A run shorter than train.log_every printed no loss at all; the stop line now gives the loss of the
    steps no row covers: the same number a row at that step gives in a run that logs every step."""
    argv = [arg for arg in _train_args(workspace, tmp_path / "a", "--max-steps", "3") if arg != "--quiet"]
    capsys.readouterr()
    assert main(argv) == 0
    stopped = [line for line in capsys.readouterr().err.splitlines() if line.startswith("stopped at step")]
    match = re.fullmatch(
        r"stopped at step 3: reached max_steps=3 \(loss (\S+) over step 3, which no log row covers\);.*", stopped[0]
    )
    assert match, stopped
    every_step = [*_train_args(workspace, tmp_path / "b", "--max-steps", "3"), "--set", "train.log_every=1"]
    assert main(every_step) == 0
    rows = {row["step"]: row for row in map(json.loads, (tmp_path / "b" / ckpt.METRICS_FILE).read_text().splitlines())}
    assert float(match.group(1)) == pytest.approx(rows[3]["train_loss"], abs=5e-4)
    rows_a = {
        row["step"]: row for row in map(json.loads, (tmp_path / "a" / ckpt.METRICS_FILE).read_text().splitlines())
    }
    assert "train_loss" not in rows_a.get(3, {})  # printed only: the log keeps its rows every log_every steps


def test_references_that_normalisation_changes_are_warned_about_by_evaluate_and_validation(
    trained: Path, workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Translations are NFKC text: references with full-width punctuation score low however good the
    translation; evaluate and the run's validation now say why, in one line each."""
    lines = workspace["valid_tgt"].read_text(encoding="utf-8").splitlines()
    full_width = tmp_path / "valid.tgt"
    full_width.write_text("".join(f"{line}！\n" for line in lines), encoding="utf-8")
    with pytest.warns(UserWarning, match="normalisation") as warned:
        assert main(["evaluate", str(trained), "--src", str(workspace["valid_src"]), "--ref", str(full_width)]) == 0
    advice = [str(warning.message) for warning in warned if "normalisation" in str(warning.message)]
    assert len(advice) == 1 and f"{len(lines)} of {len(lines)} references" in advice[0] and "'！' -> '!'" in advice[0]
    capsys.readouterr()
    argv = _train_args(workspace, tmp_path / "run", "--max-steps", "3")
    argv[argv.index(str(workspace["valid_tgt"]))] = str(full_width)
    argv.remove("--quiet")
    assert main(argv) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if "normalisation" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: ")


def test_a_pipe_given_as_training_text_is_refused_in_one_line(
    workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`--train-src <(cut -f1 corpus.tsv)` names /dev/fd/N, a pipe: it was resolved to a path that does not
    exist ("file not found: /proc/PID/fd/pipe:[N]"), and as a named FIFO it is read more than once (the
    digest, then the text, then a --resume), so the run would wait forever or read an empty second pass."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, workspace["train_src"].read_bytes()[:1000])
        argv = _train_args(workspace, tmp_path / "run")
        argv[argv.index(str(workspace["train_src"]))] = f"/dev/fd/{read_end}"
        _fails_cleanly(capsys, argv, f"--train-src /dev/fd/{read_end} is a pipe")
    finally:
        os.close(read_end)
        os.close(write_end)
    fifo = tmp_path / "fifo.src"
    os.mkfifo(fifo)
    argv = _train_args(workspace, tmp_path / "run")
    argv[argv.index(str(workspace["valid_tgt"]))] = str(fifo)
    _fails_cleanly(capsys, argv, f"--valid-tgt {fifo} is a pipe")
    assert not (tmp_path / "run").exists()


def test_standard_input_given_as_training_text_is_refused_saying_why(
    workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`--train-src -` (as translate --input - reads standard input) was read as a file named - in the working
    directory: "not found: CWD/-". A run reads its text more than once, so standard input cannot be its data."""
    argv = _train_args(workspace, tmp_path / "run")
    argv[argv.index(str(workspace["train_src"]))] = "-"
    _fails_cleanly(capsys, argv, "--train-src is - (standard input), which cannot be a run's data: a run reads")
    assert not (tmp_path / "run").exists()


def test_a_run_that_ends_before_its_warmup_is_warned_about_even_under_quiet(
    workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """max_steps below warmup_steps (a short run with the paper's 4000 warm-up steps): the learning rate
    only rises and never reaches the maximum the schedule was set for; one warning line says so."""
    capsys.readouterr()
    assert main(_train_args(workspace, tmp_path / "short", "--max-steps", "2")) == 0  # warmup_steps = 3
    printed = capsys.readouterr()
    warned = [line for line in (printed.out + printed.err).splitlines() if "warmup_steps" in line]
    assert warned == [
        "warning: train.warmup_steps=3 is above train.max_steps=2: the learning rate rises for the whole run and "
        "never reaches its maximum; set train.warmup_steps to a fraction of max_steps (e.g. --set "
        "train.warmup_steps=1)"
    ]
    assert main(_train_args(workspace, tmp_path / "long", "--max-steps", "4")) == 0  # reaches it at step 3
    printed = capsys.readouterr()
    assert "warmup_steps" not in printed.out + printed.err


def test_a_run_that_ends_as_its_warmup_does_is_warned_about_as_well(
    workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """max_steps equal to warmup_steps was not warned about, though its learning rate rises for the whole
    run as well, reaching the maximum the schedule was set for only at the last update and never decaying
    (one step more of warm-up was warned about)."""
    capsys.readouterr()
    assert main(_train_args(workspace, tmp_path / "run", "--max-steps", "3")) == 0  # warmup_steps = 3
    printed = capsys.readouterr()
    warned = [line for line in (printed.out + printed.err).splitlines() if "warmup_steps" in line]
    assert warned == [
        "warning: train.warmup_steps=3 equals train.max_steps=3: the learning rate rises for the whole run and "
        "reaches its maximum only at the last step; set train.warmup_steps to a fraction of max_steps (e.g. --set "
        "train.warmup_steps=1)"
    ]


def test_a_run_stopped_inside_its_warmup_by_another_limit_is_warned_about_as_it_ends(
    workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A --max-time or --max-epochs budget ending the run inside its warm-up said nothing: a 150-second run
    with the default 4000 warm-up steps stopped at step 216, its rate still rising, and translated every
    sentence to nothing. (One epoch here: a budget the test can rely on, unlike time.)"""
    argv = _train_args(workspace, tmp_path / "short", "--max-steps", "0", "--max-epochs", "1", "--quiet")
    capsys.readouterr()
    assert main([*argv, "--set", "train.warmup_steps=1000"]) == 0
    printed = capsys.readouterr()
    (warned,) = [line for line in (printed.out + printed.err).splitlines() if "warm-up" in line]
    steps = load_run(tmp_path / "short", which="last").step
    assert 1 < steps < 1000
    assert warned == (
        f"warning: the run stopped at step {steps}, inside its warm-up (train.warmup_steps=1000): the learning rate "
        "was still rising and never reached its maximum; give it the time to finish the warm-up, or set "
        f"train.warmup_steps to a fraction of the steps it trains (e.g. --set train.warmup_steps={max(1, steps // 10)} "
        "for a run this long)"
    )
    argv = _train_args(workspace, tmp_path / "done", "--max-steps", "0", "--max-epochs", "1", "--quiet")
    assert main([*argv, "--set", f"train.warmup_steps={steps}"]) == 0  # its last update at the peak
    printed = capsys.readouterr()
    assert "warm-up" not in printed.out + printed.err


@pytest.mark.parametrize(("max_steps", "warmup_steps", "warned"), [(1, 1, False), (1, 2, True), (2, 2, True)])
def test_a_one_step_run_at_its_peak_is_not_warned_about(max_steps: int, warmup_steps: int, warned: bool) -> None:
    """A one-step run with warmup_steps 1 updates at the peak, and the advice could only repeat its setting."""
    from tformer.config import TrainConfig
    from tformer.training.schedule import warmup_advice

    train = TrainConfig(max_steps=max_steps, warmup_steps=warmup_steps)
    assert (warmup_advice(train) is not None) == warned


def test_a_run_stopped_early_is_warned_about_its_warmup_only_where_the_rate_was_still_rising() -> None:
    """warmup_ramp = false holds the peak from the first update (no rate ever rose), and a run stopped
    before its first update has no rate to speak of: neither is told it stopped inside a rising warm-up."""
    from dataclasses import replace

    from tformer.config import TrainConfig
    from tformer.training.schedule import stopped_in_warmup_advice

    timed = TrainConfig(max_steps=0, max_time_s=150, warmup_steps=4000)
    assert stopped_in_warmup_advice(216, timed) is not None
    assert stopped_in_warmup_advice(216, replace(timed, warmup_ramp=False)) is None
    assert stopped_in_warmup_advice(0, timed) is None


def test_a_max_chars_below_one_is_refused_with_the_other_settings_naming_it(
    workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """--set data.max_chars=0 passed the config's checks, so the run began (and warned about its warm-up)
    before the corpus reader refused it as "max_chars must be at least 1", naming no section."""
    capsys.readouterr()
    assert main(_train_args(workspace, tmp_path / "run", "--max-steps", "1", "--set", "data.max_chars=0")) == 2
    printed = capsys.readouterr()
    assert printed.err == "error: data.max_chars must be at least 1, got 0\n" and printed.out == ""
    assert not (tmp_path / "run").exists()
