"""What `generate` (and each search) refuses, in one line naming the argument, before anything reaches
torch: wrong use from a notebook used to end in a traceback from inside torch's embedding or masking code
(or, for an id out of the vocabulary on a GPU, in a device-side assert that leaves the device unusable)."""

from __future__ import annotations

import pytest
import torch

from tformer.config import DecodeConfig
from tformer.decoding import beam_search, generate, greedy_search, sample

BOS, EOS = 1, 2
SEARCHES = [greedy_search, beam_search, sample]
SRC = torch.tensor([[5, 6, 7, EOS], [8, 9, EOS, 0]])


def decode(model, search=generate, src=SRC, **changes):
    arguments = {"src_pad_mask": None, "bos_id": BOS, "eos_id": EOS, "config": DecodeConfig(beam_size=2)} | changes
    return search(model, src, **arguments)


@pytest.mark.parametrize("search", SEARCHES)
def test_source_ids_of_the_wrong_kind_are_refused_by_name(tiny_model, search):
    with pytest.raises(TypeError, match=r"^src_ids must be a torch.Tensor of token ids, got list"):
        decode(tiny_model, search, src=SRC.tolist())
    with pytest.raises(TypeError, match=r"^src_ids must hold integer token ids \(torch.long\), got torch.float32"):
        decode(tiny_model, search, src=SRC.float())
    with pytest.raises(ValueError, match=r"^src_ids must be a non-empty \(batch, length\) tensor; got shape \(4,\) "):
        decode(tiny_model, search, src=SRC[0])
    with pytest.raises(ValueError, match=r"got shape \(2, 0\)"):  # no source token, not even eos
        decode(tiny_model, search, src=SRC[:, :0])


@pytest.mark.parametrize("search", SEARCHES)
def test_ids_outside_the_vocabulary_are_refused_before_the_embedding(tiny_model, search):
    """The embedding's own error was `IndexError: index out of range in self`."""
    with pytest.raises(ValueError, match=r"^src_ids must be token ids in \[0, 40\) .*got ids from 2 to 40$"):
        decode(tiny_model, search, src=torch.tensor([[5, 40, EOS]]))
    with pytest.raises(ValueError, match=r"got ids from -1 to 5$"):
        decode(tiny_model, search, src=torch.tensor([[5, -1, EOS]]))
    with pytest.raises(ValueError, match=r"^bos_id must be a token id in \[0, 40\), got 40$"):
        decode(tiny_model, search, bos_id=40)
    with pytest.raises(ValueError, match=r"^eos_id must be a token id in \[0, 40\), got 1000$"):
        decode(tiny_model, search, eos_id=1000)  # decoded before, without ever ending a sentence


def test_a_mask_of_the_wrong_kind_and_a_missing_config_are_refused_by_name(tiny_model):
    with pytest.raises(
        TypeError, match=r"^src_pad_mask must be a bool tensor \(True for real tokens\), got torch.int64"
    ):
        decode(tiny_model, src_pad_mask=(SRC != 0).long())
    with pytest.raises(ValueError, match=r"^src_pad_mask shape \(2, 3\) differs from src_ids \(2, 4\)"):
        decode(tiny_model, src_pad_mask=SRC[:, :3] != 0)
    with pytest.raises(TypeError, match=r"^config must be a DecodeConfig, got NoneType"):
        decode(tiny_model, config=None)
    with pytest.raises(TypeError, match=r"^config must be a DecodeConfig, got dict"):
        decode(tiny_model, beam_search, config={"beam_size": 2})


def test_inputs_on_another_device_than_the_model_are_refused(tiny_model):
    src = SRC.to("meta")  # a device other than the CPU that any machine has
    with pytest.raises(
        ValueError, match=r"^src_ids are on meta but the model is on cpu: move them with src_ids.to\('cpu'\)"
    ):
        decode(tiny_model, src=src)


def test_valid_inputs_decode_as_before_and_are_left_as_they_were(tiny_model):
    src, mask = SRC.clone(), SRC != 0
    expected = decode(tiny_model, src_pad_mask=mask)
    assert decode(tiny_model, src=src.int(), src_pad_mask=mask.clone()) == expected  # int32 ids are ids too
    assert decode(tiny_model, bos_id=torch.tensor(BOS), eos_id=torch.tensor(EOS)) == expected  # anything __index__
    assert torch.equal(src, SRC) and torch.equal(mask, SRC != 0)
