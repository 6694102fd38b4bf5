"""One encoder block and one decoder block (paper section 3.1, Figure 1).

Each sub-layer is wrapped as  x + Dropout(Sublayer(x))  followed by LayerNorm ("post", the paper), or
x + Dropout(Sublayer(LayerNorm(x)))  ("pre", which trains more stably without warm-up).

Shape legend: B batch, S source length, T target length, D model dim, F feed-forward dim.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from tformer.config import ModelConfig
from tformer.model.attention import CrossAttention, SelfAttention
from tformer.model.packed import Linear

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swish": F.silu}


class FeedForward(nn.Module):
    """FFN(x) = W2 act(W1 x + b1) + b2, applied to each position separately (section 3.3, eq. 2, where act
    is ReLU, max(0, .); GELU and SiLU are options)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc1 = Linear(config.d_model, config.d_ff)
        self.fc2 = Linear(config.d_ff, config.d_model)
        self.activation = ACTIVATIONS[config.activation]
        self.activation_dropout = nn.Dropout(config.activation_dropout)

    def forward(self, x_BTD: Tensor) -> Tensor:
        # ReLU: fc1 applies it (with packed weights, CPU inference, inside its one product)
        relu = self.activation is F.relu
        activated_BTF = self.fc1.forward_relu(x_BTD) if relu else self.activation(self.fc1(x_BTD))
        return self.fc2(self.activation_dropout(activated_BTF))


class Residual(nn.Module):
    """Residual connection, dropout and layer norm around one sub-layer, post- or pre-norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.pre_norm = config.norm_position == "pre"

    def before(self, x_BTD: Tensor) -> Tensor:
        """What the sub-layer reads."""
        return self.norm(x_BTD) if self.pre_norm else x_BTD

    def after(self, x_BTD: Tensor, sublayer_out_BTD: Tensor) -> Tensor:
        """Add the sub-layer's output back onto its input."""
        summed_BTD = x_BTD + self.dropout(sublayer_out_BTD)
        return summed_BTD if self.pre_norm else self.norm(summed_BTD)


class EncoderLayer(nn.Module):
    """Self-attention over the source, then the feed-forward network."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attention = SelfAttention(config.d_model, config.n_heads, dropout=config.attention_dropout)
        self.self_attention_residual = Residual(config)
        self.feed_forward = FeedForward(config)
        self.feed_forward_residual = Residual(config)

    def forward(
        self, x_BSD: Tensor, *, mask: Tensor | None, need_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        attended_BSD, weights = self.self_attention(
            self.self_attention_residual.before(x_BSD), mask=mask, need_weights=need_weights
        )
        x_BSD = self.self_attention_residual.after(x_BSD, attended_BSD)
        x_BSD = self.feed_forward_residual.after(x_BSD, self.feed_forward(self.feed_forward_residual.before(x_BSD)))
        return x_BSD, weights


class DecoderLayer(nn.Module):
    """Masked self-attention over the target prefix, cross-attention to the source, feed-forward."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attention = SelfAttention(config.d_model, config.n_heads, dropout=config.attention_dropout)
        self.self_attention_residual = Residual(config)
        self.cross_attention = CrossAttention(config.d_model, config.n_heads, dropout=config.attention_dropout)
        self.cross_attention_residual = Residual(config)
        self.feed_forward = FeedForward(config)
        self.feed_forward_residual = Residual(config)

    def forward(
        self,
        x_BTD: Tensor,
        *,
        self_mask: Tensor | None,
        self_is_causal: bool,
        memory_kv: tuple[Tensor, Tensor],
        memory_mask: Tensor | None,
        layer_cache=None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        attended_BTD, self_weights = self.self_attention(
            self.self_attention_residual.before(x_BTD),
            mask=self_mask,
            is_causal=self_is_causal,
            cache=layer_cache,
            need_weights=need_weights,
        )
        x_BTD = self.self_attention_residual.after(x_BTD, attended_BTD)
        crossed_BTD, cross_weights = self.cross_attention(
            self.cross_attention_residual.before(x_BTD),
            memory_kv=memory_kv,
            mask=memory_mask,
            need_weights=need_weights,
        )
        x_BTD = self.cross_attention_residual.after(x_BTD, crossed_BTD)
        x_BTD = self.feed_forward_residual.after(x_BTD, self.feed_forward(self.feed_forward_residual.before(x_BTD)))
        return x_BTD, self_weights, cross_weights
