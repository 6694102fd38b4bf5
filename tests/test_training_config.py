"""Loading an ExperimentConfig from TOML and --set overrides, strictly."""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from pathlib import Path

import pytest
import torch

from tformer.cli import train as train_command
from tformer.config import (
    PRESETS,
    ConfigError,
    DataConfig,
    DecodeConfig,
    ExperimentConfig,
    ModelConfig,
    TrainConfig,
    experiment_from_dict,
    experiment_to_dict,
    load_experiment,
)
from tformer.recipes import RECIPES_DIR, recipe_names


def test_preset_selects_the_model_and_other_keys_override_it(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text('[model]\npreset = "small"\ndropout = 0.2\n[train]\nmax_steps = 50\n[decode]\nbeam_size = 2\n')
    experiment = load_experiment(path, ["train.peak_lr=1e-3", "model.activation=gelu", "data.train_src=a.txt"])
    assert experiment.model.d_model == PRESETS["small"]["d_model"]
    assert experiment.model.dropout == 0.2 and experiment.model.activation == "gelu"
    assert experiment.train.max_steps == 50 and experiment.train.peak_lr == 1e-3
    assert experiment.decode.beam_size == 2 and experiment.data.train_src == "a.txt"


def test_defaults_and_round_trip_through_a_dict() -> None:
    experiment = load_experiment(None, ["model.preset=tiny"])
    assert experiment_from_dict(experiment_to_dict(experiment)) == experiment
    assert ExperimentConfig().train.adam_beta2 == 0.98


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["training.max_steps=3"], "unknown section 'training'.*valid sections: model, data, train, decode"),
        (["train.max_step=3"], r"unknown key\(s\) max_step in \[train\]; valid keys: max_tokens"),
        (["model.preset=huge"], "unknown preset 'huge'"),
        (["train.max_steps=many"], "max_steps in .train. must be an integer"),
        (["train.stop_metric=bleu"], "needs train.bleu_every > 0"),
        (["train.max_steps=0"], "set at least one of"),
        (["data.valid_src=v.txt"], "give both data.valid_src and data.valid_tgt"),
        (["max_steps=3"], "expects section.key=value"),
    ],
)
def test_bad_settings_are_config_errors_naming_the_fix(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_experiment(None, overrides)


@pytest.mark.parametrize(
    ("overrides", "hint"),
    [
        (["model.d_modle=64"], "; did you mean d_model?"),
        (["model.D_MODEL=64"], "; did you mean d_model?"),
        (["modle.d_model=64"], "; did you mean model?"),
        (["decode.topk=3"], "; did you mean top_k?"),
        (["train.warmup=10"], "; did you mean warmup_steps or warmup_ramp?"),
        (["model.layers=2"], "; did you mean n_encoder_layers or n_decoder_layers?"),
        (
            ["train.max_step=3", "train.smoothing=0.2"],
            "; did you mean max_steps (for max_step), label_smoothing (for smoothing)?",
        ),
        (["train.beam_size=2"], "; beam_size belongs in [decode]"),
        (["model.seed=2"], "; seed belongs in [train] or [decode]"),
        (["data.preset=tiny"], "; preset belongs in [model]"),
    ],
)
def test_a_misspelt_or_misplaced_key_is_named_after_the_valid_ones(overrides: list[str], hint: str) -> None:
    """A typo gets the key it probably meant, and a key of another section that section, at the end of
    the error (the list of valid keys stays where scripts and users find it)."""
    with pytest.raises(ConfigError) as error:
        load_experiment(None, overrides)
    assert str(error.value).endswith(hint) and "valid " in str(error.value).removesuffix(hint)


def test_an_unknown_key_with_no_close_one_gets_no_guess(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text("[trian]\nmax_steps = 3\n")
    with pytest.raises(ConfigError, match=r"^unknown section\(s\) trian; valid sections: .*; did you mean train\?$"):
        load_experiment(path)
    with pytest.raises(ConfigError, match=r"valid keys: [a-z_, ]+$"):
        load_experiment(None, ["model.nonsense=1"])


def test_unknown_section_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text("[optimizer]\nlr = 1\n")
    with pytest.raises(ConfigError, match=r"unknown section.*optimizer.*valid sections"):
        load_experiment(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_experiment(tmp_path / "missing.toml")


def test_shipped_tiny_config_loads() -> None:
    experiment = load_experiment(RECIPES_DIR / "tiny_copy.toml")
    assert experiment.model.d_model == PRESETS["tiny"]["d_model"]
    assert experiment.train.max_time_s > 0


def test_recipes_load_by_name_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipes ship inside the package, so an installed tformer has them: `--config multi30k_en_de`
    (and the docs' earlier `configs/multi30k_en_de.toml`) work where no such file exists. They were a
    folder of the source checkout, and `--config configs/...` failed for everyone else."""
    monkeypatch.chdir(tmp_path)
    names = recipe_names()
    assert {"tiny_copy", "multi30k_en_de", "multi30k_de_en", "multi30k_en_de_cpu"} <= set(names)
    assert all(name in " ".join((train_command.__doc__ or "").split()) for name in names)  # train --help lists them
    for name in names:
        shipped = load_experiment(RECIPES_DIR / f"{name}.toml")
        for given in (name, f"{name}.toml", f"configs/{name}.toml"):
            assert load_experiment(given) == shipped, given
    for not_a_recipe in ("elsewhere/tiny_copy.toml", "tiny_copy.json", "missing"):
        with pytest.raises(ConfigError, match=r"config file not found: .*tformer's own recipes by name: .*tiny_copy"):
            load_experiment(not_a_recipe)


def test_a_file_wins_over_the_recipe_of_its_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny_copy.toml").write_text("[model]\npreset = 'small'\n")
    assert load_experiment("configs/tiny_copy.toml").model.d_model == PRESETS["small"]["d_model"]
    assert load_experiment("tiny_copy").model.d_model == PRESETS["tiny"]["d_model"]


@pytest.mark.parametrize(
    "override",
    [
        "decode.length_penalty=nan",
        "decode.max_len_a=nan",
        "decode.temperature=nan",
        "train.peak_lr=nan",
        "train.lr_scale=-inf",
        "train.max_time_s=-inf",
        "train.max_time_s=nan",
        "train.clip_norm=nan",
        "model.dropout=nan",
        "model.layer_norm_eps=inf",
    ],
)
def test_non_finite_numbers_are_refused_naming_the_key(override: str) -> None:
    """NaN passes comparisons such as `x <= 0` (they are all false), so it must be refused by name."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must be a finite number, got"):
        load_experiment(None, [override])


def test_non_finite_numbers_are_refused_when_a_config_is_changed_in_code() -> None:
    """The checks run in __post_init__, so dataclasses.replace (how decoding flags are applied) is covered."""
    with pytest.raises(ConfigError, match=r"decode\.length_penalty must be a finite number, got inf"):
        dataclasses.replace(DecodeConfig(), length_penalty=math.inf)
    with pytest.raises(ConfigError, match=r"train\.max_time_s must be a finite number, got nan"):
        TrainConfig(max_time_s=math.nan)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.peak_lr=0", "train.peak_lr must be positive, got 0.0"),
        ("train.lr_scale=-1", "train.lr_scale must be positive, got -1.0"),
        ("train.seed=-1", r"train.seed must be in \[0, 2\*\*32\), got -1"),
        ("train.seed=4294967296", r"train.seed must be in \[0, 2\*\*32\)"),
        ("train.adam_beta2=1.0", r"train.adam_beta2 must be in \[0, 1\), got 1.0"),
        ("train.adam_beta1=-0.1", r"train.adam_beta1 must be in \[0, 1\)"),
        ("train.adam_eps=0", "train.adam_eps must be positive"),
        ("train.weight_decay=-0.01", "train.weight_decay must be 0 .off. or positive"),
        ("model.layer_norm_eps=0", "layer_norm_eps must be positive"),
        ("decode.seed=9223372036854775808", r"seed must be in \[0, 2\*\*63\)"),
        ("decode.seed=-2", r"seed must be in \[0, 2\*\*63\), got -2"),
    ],
)
def test_range_errors_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_experiment(None, [override])


def test_the_list_of_valid_model_keys_includes_preset() -> None:
    """The error for an unknown key is how users discover the keys: it must list every accepted one."""
    with pytest.raises(ConfigError, match=r"unknown key\(s\) nonsense in \[model\]; valid keys: preset, src_vocab"):
        load_experiment(None, ["model.nonsense=1"])


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ModelConfig(norm_position="Pre"), r"model.norm_position must be one of 'post', 'pre'; got 'Pre'"),
        (lambda: ModelConfig(positional_encoding="learnt"), "model.positional_encoding must be one of"),
        (lambda: ModelConfig(activation="tanh"), "model.activation must be one of"),
        (lambda: DecodeConfig(length_normalization="avg"), "decode.length_normalization must be one of"),
        (lambda: TrainConfig(schedule="cosine"), "train.schedule must be one of"),
        (lambda: DataConfig(tokenizer_model="wordpiece"), "data.tokenizer_model must be one of"),
    ],
)
def test_configs_built_in_python_refuse_values_outside_their_choices(build, message: str) -> None:
    """A typo must not silently build the default architecture (norm_position="Pre" gave post-norm)."""
    with pytest.raises(ConfigError, match=message):
        build()


def test_a_vocabulary_sentencepiece_cannot_train_is_refused_with_the_config() -> None:
    """data.vocab_size = 10**11 passed the config and stopped the run after the training text was read,
    with sentencepiece's own message (INVALID_ARGUMENT: cannot parse "100000000000" as int)."""
    with pytest.raises(ConfigError, match=r"^data.vocab_size must be below 2\*\*31 .*got 2147483648;"):
        load_experiment(None, ["data.vocab_size=2147483648"])
    assert DataConfig(vocab_size=2**31 - 1).vocab_size == 2**31 - 1  # sentencepiece takes it, as a bound


def test_an_unlimited_time_stored_as_infinity_still_loads() -> None:
    """Earlier versions accepted --max-time inf and wrote Infinity into experiment.json; such runs must keep
    loading (inf means no limit, as 0 does)."""
    import json

    stored = json.loads(json.dumps(experiment_to_dict(load_experiment(None, ["train.max_time_s=inf"]))))
    assert stored["train"]["max_time_s"] == float("inf")
    assert experiment_from_dict(stored).train.max_time_s == float("inf")


def test_a_section_check_read_from_a_file_or_set_names_its_section() -> None:
    """train.seed and decode.seed both exist: "seed must be in [0, 2**63)" left the user to guess which;
    read through --set (or a file), a check that starts with a key names the key's section."""
    with pytest.raises(ConfigError, match=re.escape("decode.seed must be in [0, 2**63), got -1")):
        load_experiment(None, ["decode.seed=-1"])
    with pytest.raises(ConfigError, match=re.escape("model.dropout must be in [0, 1), got 2.0")):
        load_experiment(None, ["model.dropout=2.0"])
    with pytest.raises(ConfigError, match=r"^train\.seed must be in \[0, 2\*\*32\), got -1$"):  # not train.train.
        load_experiment(None, ["train.seed=-1"])
    with pytest.raises(ConfigError, match=r"^seed must be in"):  # the Python API names the key as written
        DecodeConfig(seed=-1)


def test_a_file_name_toml_reads_as_a_number_is_refused_with_how_to_quote_it() -> None:
    """`--set data.train_src=2016` (a file called 2016) reaches the config as the integer 2016; the error
    says how to write it as a string, in a file and through the shell."""
    with pytest.raises(ConfigError) as refused:
        load_experiment(None, ["data.train_src=2016"])
    assert str(refused.value) == (
        'train_src in [data] must be a string; got 2016; write it in quotes: train_src = "2016" in a file, '
        "--set 'data.train_src=\"2016\"' on the command line"
    )
    assert load_experiment(None, ['data.train_src="2016"']).data.train_src == "2016"
    # a name TOML reads as a date or a time gets the same advice, written as it was typed
    for typed in ("2016-01-01", "1979-05-27T07:32:00", "07:32:00"):
        with pytest.raises(ConfigError, match=re.escape(f"--set 'data.train_src=\"{typed}\"' on the command line")):
            load_experiment(None, [f"data.train_src={typed}"])


@pytest.mark.parametrize("key", ["data_dir", "train_src", "train_tgt", "tokenizer"])
def test_an_empty_data_path_is_refused_naming_the_key(key: str) -> None:
    """`--set data.train_src=` (or --train-src "") gave the empty path, read as the working directory:
    "expected a file but got a directory: /home/...", naming no key; data_dir="" read the working directory
    without saying so. A run stores its paths absolute, so no stored run holds an empty one."""
    with pytest.raises(ConfigError, match=rf"^data\.{key} is empty: give a path, or leave it out$"):
        load_experiment(None, [f"data.{key}="])


def test_an_empty_data_path_given_by_its_flag_is_named_by_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tformer.cli.main import main

    assert main(["train", "--train-src", "", "--train-tgt", "b.txt", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == "error: --train-src is empty: give a path, or leave it out\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("section", ["model = 3", "model = [1, 2]", 'model = "tiny"'])
def test_a_section_given_as_no_table_is_refused_when_a_setting_is_added_to_it(
    section: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A file's `model = 3` with `--set model.d_model=64` (or --preset, a shorthand for model.preset) was a
    TypeError traceback ('int' object does not support item assignment); alone it was refused in one line."""
    from tformer.cli.main import main

    config = tmp_path / "no_table.toml"
    config.write_text(f"{section}\n", encoding="utf-8")
    value = repr(tomllib.loads(section)["model"])
    with pytest.raises(ConfigError, match=rf"^\[model\] must be a table of key = value pairs, got {re.escape(value)}$"):
        load_experiment(config, ["model.d_model=64"])
    assert main(["train", "--config", str(config), "--preset", "tiny", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.startswith("error: [model] must be a table of key = value pairs, got ")
    assert not (tmp_path / "run").exists()


def test_device_choice_with_cuda_present(monkeypatch) -> None:
    """auto picks CUDA when present; cuda:N must be below the device count; each process of a multi-GPU
    run takes the GPU of its local rank (not its global rank). CUDA is faked: only the choice is tested."""
    from types import SimpleNamespace

    from tformer.config import ConfigError
    from tformer.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"^train.device=cuda:2, but this machine has 2 CUDA device\(s\)$"):
        resolve_device("cuda:2")
    second_node = SimpleNamespace(enabled=True, rank=3, local_rank=1)
    assert resolve_device("auto", second_node) == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", second_node) == torch.device("cpu")


def test_a_boolean_is_neither_an_integer_nor_a_number() -> None:
    """Python's True is an int; in a config it is a mistake (max_steps = true), refused with the key named."""
    from tformer.config.loading import config_from_dict

    with pytest.raises(ConfigError, match=r"^max_steps in \[train\] must be an integer; got True$"):
        config_from_dict(TrainConfig, {"max_steps": True}, section="train")
    with pytest.raises(ConfigError, match=r"^peak_lr in \[train\] must be a number; got False$"):
        config_from_dict(TrainConfig, {"peak_lr": False}, section="train")


def test_one_override_string_is_refused_not_read_character_by_character() -> None:
    """load_experiment(None, "train.max_steps=8") read the string's characters as overrides: "--set expects
    key=value, got 't'"."""
    with pytest.raises(TypeError, match=r"^overrides must be a list of 'section.key=value' strings, not one: \['train"):
        load_experiment(None, "train.max_steps=8")
    assert load_experiment(None, ("train.max_steps=8",)).train.max_steps == 8


def test_a_data_path_that_begins_with_a_tilde_is_in_the_home_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config file's "~/data/train.de" (no shell expands it) was read as a directory named ~ here."""
    from tformer.training.training_text import absolute_data_paths

    home = tmp_path.resolve() / "home"  # resolved: the run's paths are, and tmp_path may be under a link
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    data = load_experiment(None, ["data.train_src='~/train.de'", "data.data_dir='~/corpus'"]).data
    data = absolute_data_paths(dataclasses.replace(data, train_tgt="~/train.en", tokenizer="~/spm"))
    assert (data.train_src, data.train_tgt, data.tokenizer) == (
        str(home / "train.de"),
        str(home / "train.en"),
        str(home / "spm"),
    )
    assert data.data_dir == str(home / "corpus")
