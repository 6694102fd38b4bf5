"""One encoder block and one decoder block equal torch's own nn.TransformerEncoderLayer and
nn.TransformerDecoderLayer given the same weights (float64): residual + layer norm around self-attention,
masked self-attention, cross-attention and the feed-forward network, post- and pre-norm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tformer.config import preset
from tformer.model.layers import DecoderLayer, EncoderLayer, FeedForward
from tformer.model.masks import key_mask

D, H, F = 12, 3, 20


def config(norm_position: str):
    return preset(
        "tiny", src_vocab_size=10, tgt_vocab_size=10, d_model=D, n_heads=H, d_ff=F, norm_position=norm_position
    )


def perturb(module: nn.Module, seed: int) -> None:
    """Random values everywhere (biases and layer norms too), so that no parameter goes unchecked."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.5)


def copy_attention(target: nn.MultiheadAttention, in_weight, in_bias, out: nn.Linear) -> None:
    """torch's in_proj stacks W^Q, W^K, W^V as tformer's qkv_proj does (cross-attention: q_proj over kv_proj)."""
    target.in_proj_weight.copy_(in_weight)
    target.in_proj_bias.copy_(in_bias)
    target.out_proj.weight.copy_(out.weight)
    target.out_proj.bias.copy_(out.bias)


def copy_feed_forward_and_norms(target: nn.Module, ours: nn.Module, residuals: list[str]) -> None:
    target.linear1.load_state_dict(ours.feed_forward.fc1.state_dict())
    target.linear2.load_state_dict(ours.feed_forward.fc2.state_dict())
    for index, name in enumerate(residuals, start=1):
        getattr(target, f"norm{index}").load_state_dict(getattr(ours, name).norm.state_dict())


def padding(lengths: list[int], total: int) -> torch.Tensor:
    return torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_encoder_layer_equals_torch_transformer_encoder_layer(norm_position: str) -> None:
    ours = EncoderLayer(config(norm_position)).double().eval()
    perturb(ours, seed=0)
    reference = nn.TransformerEncoderLayer(
        D, H, F, dropout=0.0, batch_first=True, norm_first=norm_position == "pre", dtype=torch.float64
    ).eval()
    with torch.no_grad():
        attention = ours.self_attention
        copy_attention(reference.self_attn, attention.qkv_proj.weight, attention.qkv_proj.bias, attention.out_proj)
        copy_feed_forward_and_norms(reference, ours, ["self_attention_residual", "feed_forward_residual"])
    x = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    keep = padding([7, 4], 7)
    # gradients on, so that torch takes its plain (not its fused inference) path
    expected = reference(x, src_key_padding_mask=~keep)
    actual, _ = ours(x, mask=key_mask(keep))
    torch.testing.assert_close(actual, expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_decoder_layer_equals_torch_transformer_decoder_layer(norm_position: str) -> None:
    ours = DecoderLayer(config(norm_position)).double().eval()
    perturb(ours, seed=2)
    reference = nn.TransformerDecoderLayer(
        D, H, F, dropout=0.0, batch_first=True, norm_first=norm_position == "pre", dtype=torch.float64
    ).eval()
    with torch.no_grad():
        self_attention, cross_attention = ours.self_attention, ours.cross_attention
        copy_attention(
            reference.self_attn, self_attention.qkv_proj.weight, self_attention.qkv_proj.bias, self_attention.out_proj
        )
        copy_attention(
            reference.multihead_attn,
            torch.cat([cross_attention.q_proj.weight, cross_attention.kv_proj.weight]),
            torch.cat([cross_attention.q_proj.bias, cross_attention.kv_proj.bias]),
            cross_attention.out_proj,
        )
        copy_feed_forward_and_norms(
            reference, ours, ["self_attention_residual", "cross_attention_residual", "feed_forward_residual"]
        )
    generator = torch.Generator().manual_seed(3)
    y = torch.randn(2, 5, D, generator=generator, dtype=torch.float64)
    memory = torch.randn(2, 8, D, generator=generator, dtype=torch.float64)
    memory_keep = padding([8, 3], 8)
    expected = reference(
        y,
        memory,
        tgt_mask=nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64),
        memory_key_padding_mask=~memory_keep,
    )
    for self_mask, is_causal in ((None, True), (torch.ones(5, 5, dtype=torch.bool).tril()[None, None], False)):
        actual, _, _ = ours(
            y,
            self_mask=self_mask,
            self_is_causal=is_causal,
            memory_kv=cross_attention.project_memory(memory),
            memory_mask=key_mask(memory_keep),
        )
        torch.testing.assert_close(actual, expected, atol=1e-10, rtol=0)


def test_activation_dropout_acts_on_the_hidden_layer_before_the_second_projection() -> None:
    """activation_dropout drops entries of act(W1 x + b1) (fairseq's place for it), so with every entry
    dropped the feed-forward output is W2 0 + b2 = b2 at every position; in eval mode it is a no-op."""
    feed_forward = FeedForward(config("post")).double()
    perturb(feed_forward, seed=4)
    feed_forward.activation_dropout.p = 1.0
    x = torch.randn(2, 3, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = feed_forward.train()(x)
    torch.testing.assert_close(out, feed_forward.fc2.bias.expand(2, 3, D), atol=0, rtol=0)
    expected = feed_forward.fc2(torch.relu(feed_forward.fc1(x)))
    torch.testing.assert_close(feed_forward.eval()(x), expected, atol=1e-12, rtol=0)
