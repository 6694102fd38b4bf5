"""Ensembles: one member decodes like the model alone; two members average their log-probabilities."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_decoding_equivalence import BOS, EOS, padded_batch, peaked_model

from tformer.config import DecodeConfig
from tformer.decoding import DecodingError, EnsembleModel, generate
from tformer.decoding.incremental import IncrementalDecoder


@pytest.mark.parametrize("beam", [1, 3])
def test_ensemble_of_one_equals_the_model(beam):
    model = peaked_model()
    src, mask = padded_batch([7, 4, 9, 5], seed=2)
    config = DecodeConfig(beam_size=beam, nbest=beam)
    alone = generate(model, src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=config)
    ensemble = generate(EnsembleModel([model]), src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=config)
    assert [[h.tokens for h in n] for n in ensemble] == [[h.tokens for h in n] for n in alone]
    assert [h.score for n in ensemble for h in n] == pytest.approx([h.score for n in alone for h in n], abs=1e-4)


def _two_members_and_a_batch() -> tuple[Any, Any, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two different models (the second's weights scaled by 0.9), a padded source batch and target prefixes."""
    first, second = peaked_model(), peaked_model(eos_bias=0.0)
    with torch.no_grad():
        for parameter in second.parameters():
            parameter.mul_(0.9)
    src, mask = padded_batch([6, 3, 8], seed=4)
    tgt = torch.randint(3, 40, (3, 5), generator=torch.Generator().manual_seed(1))
    return first, second, src, mask, tgt


def test_two_members_average_log_probabilities_at_every_step():
    first, second, src, mask, tgt = _two_members_and_a_batch()
    tgt[:, 0] = BOS
    ensemble = EnsembleModel([first, second])
    with torch.no_grad():
        mean = (
            F.log_softmax(first(src, tgt, src_pad_mask=mask), -1)
            + F.log_softmax(second(src, tgt, src_pad_mask=mask), -1)
        ) / 2
        decoder = IncrementalDecoder(
            ensemble, src, mask, rows_per_sentence=1, capacity=5, want_attention=False, shared_memory=True
        )
        for t in range(5):
            log_probs, _ = decoder.step(tgt[:, t])
            torch.testing.assert_close(log_probs, F.log_softmax(mean[:, t], -1), atol=1e-5, rtol=0)
        # decode itself returns the mean of the members' log-probabilities (not of their logits)
        whole = ensemble.decode(tgt, memory=ensemble.encode(src, src_pad_mask=mask), src_pad_mask=mask)
        torch.testing.assert_close(whole, mean, atol=1e-5, rtol=0)
    result = generate(
        ensemble,
        src,
        src_pad_mask=mask,
        bos_id=BOS,
        eos_id=EOS,
        config=DecodeConfig(beam_size=2),
        return_attention=True,
    )
    assert all(n[0].attention.shape[1] == length for n, length in zip(result, [6, 3, 8], strict=True))


def test_ensemble_members_must_share_the_vocabulary():
    from tformer.config import preset
    from tformer.model import Transformer

    other = Transformer(preset("tiny", src_vocab_size=30, tgt_vocab_size=30)).eval()
    with pytest.raises(ValueError, match="vocabulary"):
        EnsembleModel([peaked_model(), other])


@pytest.mark.parametrize("field", ["src_vocab_size", "pad_id"])
def test_members_that_disagree_on_the_source_vocabulary_or_pad_id_are_refused_when_built(field):
    """The ensemble checks source ids (and makes a missing mask) with its first member's config: a second
    member with a smaller source vocabulary failed deep inside its embedding (a bare IndexError on the CPU,
    a device-side assert on a GPU), and one with another pad id was decoded with the first one's."""
    from tformer.config import preset
    from tformer.model import Transformer

    first = peaked_model()
    setting = {"src_vocab_size": 30} if field == "src_vocab_size" else {"pad_id": 3}
    config = preset("tiny", src_vocab_size=40, tgt_vocab_size=40, max_positions=64, share_embeddings=False)
    other = Transformer(dataclasses.replace(config, **setting)).eval()
    for members in ([first, other], [other, first]):
        with pytest.raises(DecodingError, match="source vocabulary" if field == "src_vocab_size" else "pad id"):
            EnsembleModel(members)


def test_an_ensemble_refuses_to_decode_once_a_member_is_put_in_training_mode():
    first, second = peaked_model(), peaked_model(eos_bias=0.0)
    ensemble = EnsembleModel([first, second])
    second.train()  # after the ensemble was built
    src, mask = padded_batch([4])
    with pytest.raises(ValueError, match="eval"):
        generate(ensemble, src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=DecodeConfig(beam_size=1))
    ensemble.eval()
    assert not first.training and not second.training
    generate(ensemble, src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=DecodeConfig(beam_size=1))


def test_ensemble_attention_is_the_members_last_layer_averaged_over_heads_then_members():
    first, second, src, mask, tgt = _two_members_and_a_batch()
    ensemble = EnsembleModel([first, second])
    with torch.no_grad():
        _, self_weights, cross_weights = ensemble.decode(
            tgt, memory=ensemble.encode(src, src_pad_mask=mask), src_pad_mask=mask, return_attention=True
        )
        members = [
            model.decode(tgt, memory=model.encode(src, src_pad_mask=mask), src_pad_mask=mask, return_attention=True)
            for model in (first, second)
        ]
    expected_self = sum(member[1][-1].mean(dim=1, keepdim=True) for member in members) / 2
    expected_cross = sum(member[2][-1].mean(dim=1, keepdim=True) for member in members) / 2
    assert len(self_weights) == len(cross_weights) == 1
    torch.testing.assert_close(self_weights[0], expected_self, atol=1e-6, rtol=0)
    torch.testing.assert_close(cross_weights[0], expected_cross, atol=1e-6, rtol=0)


@pytest.mark.parametrize("beam", [1, 2])
def test_the_member_with_the_fewest_positions_bounds_the_ensembles_output_length(beam):
    """A member with 12 positions cannot read a 13th token: outputs of an ensemble holding it stop at 12."""
    from tformer.config import preset
    from tformer.model import Transformer

    short_config = preset("tiny", src_vocab_size=40, tgt_vocab_size=40, max_positions=12, share_embeddings=False)
    short = Transformer(dataclasses.replace(short_config, sinusoidal_layout="concatenated"), seed=2).eval()
    for members in ([peaked_model(), short], [short, peaked_model()]):
        ensemble = EnsembleModel(members)
        assert ensemble.config.max_positions == 12
        src, mask = padded_batch([5, 3], seed=1)
        config = DecodeConfig(beam_size=beam, max_len_a=0.0, max_len_b=50, min_len=50)  # eos banned: runs to the limit
        result = generate(ensemble, src, src_pad_mask=mask, bos_id=BOS, eos_id=EOS, config=config)
        assert [len(nbest[0].tokens) for nbest in result] == [12, 12]
