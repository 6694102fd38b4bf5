"""DecodeConfig.banned_ids: strict loading, and a banned token is never produced even when it would win."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tformer.config import ConfigError, DecodeConfig, ExperimentConfig, experiment_from_dict
from tformer.decoding import DecodingError, generate
from tformer.model import Transformer


def test_banned_ids_load_from_toml_lists_and_reject_bad_values() -> None:
    experiment = experiment_from_dict({"decode": {"banned_ids": [5, 7]}})
    assert isinstance(experiment, ExperimentConfig) and experiment.decode.banned_ids == (5, 7)
    with pytest.raises(ConfigError, match="banned_ids must be a list of token ids"):
        DecodeConfig(banned_ids=(-1,))
    with pytest.raises(ConfigError, match="banned_ids must be a list of token ids"):
        experiment_from_dict({"decode": {"banned_ids": "5"}})
    # TOML's true is no token id (Python counts it as the integer 1: it banned bos, silently)
    with pytest.raises(ConfigError, match=r"banned_ids must be a list of token ids \(integers >= 0\), got \[True\]"):
        experiment_from_dict({"decode": {"banned_ids": [True]}})


def test_the_advice_to_set_a_key_names_it_with_its_section() -> None:
    """--set decode.compile_step=true (train, serve) was advised to `set static_step = true`, a key without the
    section that --set needs; Python's DecodeConfig keeps the bare key."""
    with pytest.raises(ConfigError, match=r"^compile_step compiles the static step: set static_step = true as well$"):
        DecodeConfig(compile_step=True)
    advice = r"^decode\.compile_step compiles the static step: set decode\.static_step=true as well$"
    with pytest.raises(ConfigError, match=advice):
        experiment_from_dict({"decode": {"compile_step": True}})


@pytest.mark.parametrize("field", ["beam_size", "max_len_b", "min_len", "top_k"])
def test_an_integer_beyond_64_bits_is_a_config_error(field: str) -> None:
    """translate --beam 10**22 or --set decode.max_len_b=10**22 were OverflowError tracebacks from torch."""
    with pytest.raises(ConfigError, match=rf"decode.{field} must be a 64-bit integer \(below 2\*\*63 in size\)"):
        DecodeConfig(**{field: 10**22})
    with pytest.raises(ConfigError, match=r"train.max_steps must be a 64-bit integer"):
        experiment_from_dict({"train": {"max_steps": 10**22}})


@pytest.mark.parametrize("beam_size", [1, 3])
def test_a_banned_token_is_never_produced(tiny_model: Transformer, beam_size: int) -> None:
    favourite, model = 9, tiny_model
    src = torch.randint(4, 40, (3, 6))
    config = DecodeConfig(beam_size=beam_size, max_len_a=0.0, max_len_b=8, min_len=8)
    with torch.no_grad():
        bias = torch.zeros(model.config.tgt_vocab_size)
        bias[favourite] = 50.0  # the favourite token wins every step unless banned
        original = model.project_output

        def biased(hidden):
            return original(hidden) + bias

        model.project_output = biased
        free = generate(model, src, src_pad_mask=None, bos_id=1, eos_id=2, config=config)
        banned_config = dataclasses.replace(config, banned_ids=(favourite,))
        banned = generate(model, src, src_pad_mask=None, bos_id=1, eos_id=2, config=banned_config)
        del model.project_output
    assert all(set(hyps[0].tokens) == {favourite} for hyps in free)
    assert all(favourite not in hyps[0].tokens and len(hyps[0].tokens) == 8 for hyps in banned)


@pytest.mark.parametrize("config", [DecodeConfig(beam_size=1), DecodeConfig(beam_size=3), DecodeConfig(sampling=True)])
def test_a_banned_id_outside_the_vocabulary_is_a_decoding_error(tiny_model: Transformer, config: DecodeConfig) -> None:
    """DecodeConfig knows no vocabulary: translate --set decode.banned_ids=[999] (or a run's own setting)
    for a model of 40 target ids was an IndexError traceback from the first decoding step."""
    src = torch.randint(4, 40, (2, 5))
    outside = dataclasses.replace(config, banned_ids=(3, 40))
    with pytest.raises(DecodingError, match=r"decode.banned_ids holds 40, outside this model's target vocabulary"):
        generate(tiny_model, src, src_pad_mask=None, bos_id=1, eos_id=2, config=outside)


def test_a_value_of_the_wrong_type_built_in_python_is_a_config_error_naming_the_key() -> None:
    """A file's values were checked for their types, a config built in Python was not:
    DecodeConfig(beam_size="4") failed with "'<' not supported between instances of 'str' and 'int'",
    DecodeConfig(beam_size=4.0) was accepted and failed inside the search, sampling=1 was taken as on."""
    from tformer.config import DataConfig, TrainConfig, preset

    with pytest.raises(ConfigError, match=r"^decode.beam_size must be an integer; got '4' \(str\)$"):
        DecodeConfig(beam_size="4")
    with pytest.raises(ConfigError, match=r"^decode.beam_size must be an integer; got 4.0 \(float\)$"):
        DecodeConfig(beam_size=4.0)
    with pytest.raises(ConfigError, match=r"^decode.sampling must be True or False; got 1 \(int\)$"):
        DecodeConfig(sampling=1)
    with pytest.raises(ConfigError, match=r"^train.max_time_s must be a number; got '60' \(str\)$"):
        TrainConfig(max_time_s="60")
    with pytest.raises(ConfigError, match=r"^data.train_src must be a string or None; got 3 \(int\)$"):
        DataConfig(train_src=3)
    with pytest.raises(ConfigError, match=r"^model.d_model must be an integer; got 512.0 \(float\)$"):
        dataclasses.replace(preset("tiny"), d_model=512.0)
    numpy_like = DecodeConfig(beam_size=torch.tensor(3).item(), nbest=torch.tensor(2))  # anything __index__
    assert numpy_like.nbest == 2 and type(numpy_like.nbest) is int
    assert TrainConfig(max_time_s=60).max_time_s == 60  # an int is a number
