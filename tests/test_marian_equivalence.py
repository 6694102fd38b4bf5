"""tformer computes exactly what Hugging Face's MarianMTModel computes, given the same weights."""

from __future__ import annotations

import pytest
import torch
from helpers import perturbed

from tformer.config import preset
from tformer.interop.marian import SpecialIds, from_marian, to_marian
from tformer.model import Transformer

transformers = pytest.importorskip("transformers")

IDS = SpecialIds(bos_id=1, eos_id=2, pad_id=0)


def padded_batch(vocab: int, lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (len(lengths), max(lengths)), generator=generator)
    keep = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    return ids.masked_fill(~keep, 0), keep


CASES = {
    "paper_shared_relu": dict(),
    "separate_vocab_swish_bias": dict(
        share_embeddings=False, tgt_vocab_size=37, activation="swish", final_logits_bias=True
    ),
    "gelu_unscaled": dict(activation="gelu", scale_embeddings=False),
    "paper_interleaved_positions": dict(sinusoidal_layout="interleaved"),
    "untied_output_shared_vocab": dict(tie_output=False, final_logits_bias=True),
    "untied_output_separate_vocab_interleaved": dict(
        tie_output=False, share_embeddings=False, tgt_vocab_size=37, sinusoidal_layout="interleaved"
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_marian_on_padded_batch(case: str) -> None:
    overrides = dict(src_vocab_size=45, tgt_vocab_size=45, sinusoidal_layout="concatenated", n_heads=4) | CASES[case]
    ours = perturbed(Transformer(preset("tiny", **overrides), seed=3), seed=4).eval()
    theirs = to_marian(ours, IDS)
    src, src_keep = padded_batch(ours.config.src_vocab_size, [9, 5, 2], seed=5)
    tgt, tgt_keep = padded_batch(ours.config.tgt_vocab_size, [4, 7, 6], seed=6)
    with torch.no_grad():
        expected = theirs(
            input_ids=src, attention_mask=src_keep.long(), decoder_input_ids=tgt, decoder_attention_mask=tgt_keep.long()
        ).logits
        actual = ours(src, tgt, src_pad_mask=src_keep, tgt_pad_mask=tgt_keep)
    real = tgt_keep[..., None].expand_as(actual)
    torch.testing.assert_close(actual[real], expected[real], atol=1e-5, rtol=0)
    # without a target padding mask the rows of real tokens are unchanged (padding sits on the right)
    with torch.no_grad():
        causal_only = ours(src, tgt, src_pad_mask=src_keep)
    torch.testing.assert_close(causal_only[real], expected[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("tie_output", [True, False])
def test_marian_round_trip_is_exact(tie_output: bool) -> None:
    config = preset(
        "tiny", src_vocab_size=30, tgt_vocab_size=33, share_embeddings=False, sinusoidal_layout="concatenated",
        tie_output=tie_output,
    )  # fmt: skip
    ours = perturbed(Transformer(config, seed=7), seed=8).eval()
    back, ids = from_marian(to_marian(ours, IDS))
    assert ids == IDS
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_what_marian_cannot_express_is_refused_with_a_reason() -> None:
    model = Transformer(preset("tiny", src_vocab_size=30, tgt_vocab_size=30, norm_position="pre"))
    with pytest.raises(ValueError, match="norm_position must be post"):
        to_marian(model, IDS)
    # Marian's LayerNorm epsilon is fixed at 1e-5: another one changes every logit
    model = Transformer(preset("tiny", src_vocab_size=30, tgt_vocab_size=30, layer_norm_eps=1e-6))
    with pytest.raises(ValueError, match=r"layer_norm_eps must be 1e-05 \(got 1e-06\)"):
        to_marian(model, IDS)
