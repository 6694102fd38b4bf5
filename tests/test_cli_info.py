"""`tformer info RUN_DIR`: the model a trained run holds, the step read and the run's checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from training_helpers import trained_run

from tformer.cli.main import main
from tformer.config import preset
from tformer.model import Transformer, count_parameters
from tformer.training import load_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    overrides = ("train.max_steps=4", "train.save_every=2", "train.valid_every=2")
    return trained_run(tmp_path_factory.mktemp("info"), *overrides, n_train=40)


def _info(capsys: pytest.CaptureFixture[str], *arguments: str) -> dict:
    capsys.readouterr()
    assert main(["info", *arguments]) == 0
    return json.loads(capsys.readouterr().out)


def test_info_of_a_run_shows_the_model_it_trained(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The vocabulary sizes are the run's tokenizer's, the parameters those of the loaded model."""
    loaded = load_run(trained, which="last")
    shown = _info(capsys, str(trained), "--which", "last")
    assert shown["run"] == str(trained) and shown["step"] == 4
    assert shown["checkpoint"] == str(trained / "checkpoints" / "step-00000004")
    assert shown["checkpoints"] == ["step-00000002", "step-00000004"] and shown["latest"] == "step-00000004"
    assert shown["best"] in shown["checkpoints"]
    assert shown["src_vocab_size"] == loaded.tokenizer.src_vocab_size
    assert shown["d_model"] == loaded.experiment.model.d_model
    assert shown["parameters"] == count_parameters(loaded.model)
    assert _info(capsys, str(trained))["checkpoint"] == str(trained / "checkpoints" / shown["best"])
    checkpoint = _info(capsys, shown["checkpoint"])  # a checkpoint directory works too
    assert checkpoint["step"] == 4 and checkpoint["parameters"] == count_parameters(
        Transformer(loaded.experiment.model)
    )


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--preset", "tiny"], "error: give a RUN_DIR, or --preset / --config (with --vocab-size), not both"),
        (["--vocab-size", "10"], "error: give a RUN_DIR, or --preset / --config (with --vocab-size), not both"),
    ],
)
def test_info_of_a_run_refuses_model_flags(
    trained: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], message: str
) -> None:
    assert main(["info", str(trained), *arguments]) == 2
    assert capsys.readouterr().err == message + "\n"


def test_info_of_something_that_is_not_a_run_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path} is neither a run directory nor a checkpoint (no experiment.json)\n"


def test_a_runs_json_given_as_a_config_file_says_to_give_the_run(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """info --config RUN/checkpoints/step-N/experiment.json said only 'invalid TOML: Invalid statement'."""
    experiment = trained / "checkpoints" / "step-00000004" / "experiment.json"
    for command in (
        ["info", "--config", str(experiment)],
        ["train", "--config", str(experiment), "--out", str(tmp_path / "x")],
    ):
        assert main(command) == 2
        assert capsys.readouterr().err == (
            f"error: {experiment} is JSON, not a TOML config file; for the run that holds it, give its directory "
            "(tformer info RUN_DIR, tformer train --resume RUN_DIR)\n"
        )


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("model.safetensors", "{step}/model.safetensors: corrupt or truncated weights (Error while deserializing"),
        ("tokenizer/spm.model", "{step}/tokenizer/spm.model is not a valid sentencepiece model (corrupt or truncated)"),
    ],
)
def test_info_of_a_run_with_damaged_files_names_them(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str, message: str
) -> None:
    """info showed the model of a checkpoint whose weights or tokenizer were cut short, and exited 0: it
    now checks what translate reads (the weights by their header alone), for the checkpoint it shows."""
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    step = run / "checkpoints" / "step-00000004"
    path = step / damage
    path.write_bytes(path.read_bytes()[: path.stat().st_size - 10])
    assert main(["info", str(run), "--which", "last"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message.format(step=step)}") and err.count("\n") == 1, err
    assert _info(capsys, str(run / "checkpoints" / "step-00000002"))["step"] == 2


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--preset", "tiny", "--vocab-size", "3"], "data.vocab_size must be at least 8, got 3"),
        (["--vocab-size", "0"], "data.vocab_size must be at least 8, got 0"),
        (["--config", "tiny_copy", "--vocab-size", "7"], "data.vocab_size must be at least 8, got 7"),
        (["--config", "{byte_fallback}", "--vocab-size", "100"], "data.vocab_size must be at least 261 with data."),
    ],
)
def test_info_refuses_a_vocabulary_train_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], message: str
) -> None:
    """`info --preset tiny --vocab-size 3` showed a model no run can have (training needs a tokenizer of at
    least 8 pieces, more with data.byte_fallback): it is refused in the line train gives, naming the flag."""
    config = tmp_path / "byte_fallback.toml"
    config.write_text("[data]\nbyte_fallback = true\nvocab_size = 300\n", encoding="utf-8")
    size = arguments[-1]
    assert main(["info", *(argument.format(byte_fallback=config) for argument in arguments)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: --vocab-size {size} is one tformer train refuses: {message}")
    assert captured.err.count("\n") == 1 and captured.out == ""
    assert main(["info", "--preset", "tiny", "--vocab-size", "8"]) == 0
    assert json.loads(capsys.readouterr().out)["src_vocab_size"] == 8


def test_vocab_size_replaces_the_files_own_before_it_is_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`info --config bad.toml --vocab-size 100` failed on the file's data.vocab_size = 3, which the flag replaces
    (train accepts it): the flag is applied before the file is checked, as train applies it."""
    config = tmp_path / "bad.toml"
    config.write_text('[model]\npreset = "tiny"\n[data]\nvocab_size = 3\n', encoding="utf-8")
    assert main(["info", "--config", str(config), "--vocab-size", "100"]) == 0
    assert json.loads(capsys.readouterr().out)["src_vocab_size"] == 100
    assert main(["info", "--config", str(config)]) == 2  # the file's own value is still checked
    assert capsys.readouterr().err == "error: data.vocab_size must be at least 8, got 3\n"


def test_a_config_that_names_a_tokenizer_shows_that_tokenizers_vocabulary(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run uses the tokenizer data.tokenizer names as it is, so its model has that tokenizer's vocabulary;
    `info --config` showed data.vocab_size's (8000 by default, or --vocab-size's), and a parameter count the
    run would not have. The directory is found as train finds it, under data.data_dir."""
    loaded = load_run(trained, which="last")
    checkpoint = trained / "checkpoints" / "step-00000004"
    config = tmp_path / "given_tokenizer.toml"
    config.write_text(f'[model]\npreset = "tiny"\n[data]\ndata_dir = "{checkpoint}"\ntokenizer = "tokenizer"\n')
    for vocab_size in ([], ["--vocab-size", "5000"]):
        shown = _info(capsys, "--config", str(config), *vocab_size)
        assert (shown["src_vocab_size"], shown["tgt_vocab_size"]) == (
            loaded.tokenizer.src_vocab_size,
            loaded.tokenizer.tgt_vocab_size,
        )
        sizes = {"src_vocab_size": shown["src_vocab_size"], "tgt_vocab_size": shown["tgt_vocab_size"]}
        assert shown["parameters"] == count_parameters(Transformer(preset("tiny", **sizes)))
    config.write_text('[model]\npreset = "tiny"\n[data]\ntokenizer = "no-such-directory"\n')
    assert main(["info", "--config", str(config)]) == 2
    assert capsys.readouterr().err.startswith("error: data.tokenizer ")


def test_a_config_train_refuses_for_its_vocabulary_keys_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A file setting model.src_vocab_size or model.pad_id, which train refuses (a run takes them from its
    tokenizer), was shown as a model (with pad_id 3, the sizes replaced): info now refuses it in train's words."""
    config = tmp_path / "vocabulary_keys.toml"
    config.write_text('[model]\npreset = "tiny"\npad_id = 3\nsrc_vocab_size = 100\n', encoding="utf-8")
    assert main(["info", "--config", str(config)]) == 2
    assert capsys.readouterr().err.startswith(
        "error: model.src_vocab_size, model.pad_id cannot be set: a run takes its vocabulary sizes and pad_id from its "
        "tokenizer"
    )
