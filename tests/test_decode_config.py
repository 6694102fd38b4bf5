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
