"""The Transformer itself. Imports only torch, tformer.config and the standard library: never training, data
or decoding."""

from tformer.model.attention import CrossAttention, SelfAttention, attention_fused, attention_loop, attention_matrix
from tformer.model.cache import DecoderCache, LayerCache, StaticDecoderCache
from tformer.model.size import count_parameters, model_flops_per_pair
from tformer.model.transformer import AttentionMaps, Transformer

__all__ = [
    "AttentionMaps",
    "CrossAttention",
    "DecoderCache",
    "LayerCache",
    "SelfAttention",
    "StaticDecoderCache",
    "Transformer",
    "attention_fused",
    "attention_loop",
    "attention_matrix",
    "count_parameters",
    "model_flops_per_pair",
]
