"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al., 2017).

    memory = encode(source)                       # N encoder blocks over the embedded source
    logits = decode(target prefix, memory)        # N decoder blocks, then the output projection

(N as in the paper: the number of blocks, 6 in its base model.)

`encode` and `decode` are separate so that decoding can run the encoder once and the decoder once per
new token (with a `DecoderCache`). Masks follow `tformer.model.masks`: True means "may attend"; for
`src_pad_mask` and `tgt_pad_mask` that is True for real tokens and False for padding.

Shape legend: B batch, S source length, T target length, D model dim, H heads, K head dim, V vocabulary,
L cache capacity. In decoding the target rows may be n times the memory's (the n beams of a sentence share
its memory row and `src_pad_mask` row).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tformer.config import ModelConfig
from tformer.model.cache import (
    BeamDecoderCache,
    CacheLayout,
    DecoderCache,
    StaticBeamDecoderCache,
    StaticDecoderCache,
)
from tformer.model.embeddings import LearnedPositions, SinusoidalPositions, TokenEmbedding
from tformer.model.inputs import check_decoder_rows, check_ids, check_mask, check_memory, check_pair
from tformer.model.layers import DecoderLayer, EncoderLayer
from tformer.model.masks import causal_mask, combine, key_mask, padding_mask
from tformer.model.packed import Linear, linear
from tformer.model.size import check_fits_in_memory

AnyCache = DecoderCache | StaticDecoderCache | StaticBeamDecoderCache | BeamDecoderCache


@dataclass
class AttentionMaps:
    """Attention weights of every layer, returned (never stored on modules) for plotting."""

    encoder_self: list[Tensor] = field(default_factory=list)  # per layer: B H S S
    decoder_self: list[Tensor] = field(default_factory=list)  # per layer: B H T T(+cached)
    cross: list[Tensor] = field(default_factory=list)  # per layer: B H T S


def build_positions(config: ModelConfig) -> nn.Module:
    if config.positional_encoding == "learned":
        return LearnedPositions(config.max_positions, config.d_model)
    return SinusoidalPositions(config.max_positions, config.d_model, config.sinusoidal_layout)


def projection_blocks(linear: nn.Linear) -> list[Tensor]:
    """The D x D blocks of a fused projection (Q|K|V or K|V, marked by its `blocks`), or the whole weight
    of any other: told by the mark, not the shape (a feed-forward layer with d_ff = 2 or 3 x d_model has
    the shape of a fused one)."""
    return list(linear.weight.chunk(getattr(linear, "blocks", 1), dim=0))


class Encoder(nn.Module):
    """Positions and dropout on the embedded source, then N encoder blocks."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.positions = build_positions(config)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.n_encoder_layers))
        self.final_norm = (
            nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if config.norm_position == "pre" else None
        )

    def forward(self, embedded_BSD: Tensor, *, src_pad_mask_BS: Tensor, need_weights: bool) -> tuple[Tensor, list]:
        x_BSD = self.dropout(embedded_BSD + self.positions(embedded_BSD.shape[1]))
        mask = key_mask(src_pad_mask_BS)  # always applied: checking for "no padding" would sync the device
        weights = []
        for layer in self.layers:
            x_BSD, layer_weights = layer(x_BSD, mask=mask, need_weights=need_weights)
            weights.append(layer_weights)
        if self.final_norm is not None:
            x_BSD = self.final_norm(x_BSD)
        return x_BSD, weights


class Decoder(nn.Module):
    """Positions and dropout on the embedded target prefix, then N decoder blocks."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.positions = build_positions(config)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_decoder_layers))
        self.final_norm = (
            nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if config.norm_position == "pre" else None
        )

    def forward(
        self,
        embedded_BTD: Tensor,
        *,
        memory_kv: list[tuple[Tensor, Tensor]],
        src_pad_mask_BS: Tensor | None,
        tgt_pad_mask: Tensor | None,
        cache: AnyCache | None,
        need_weights: bool,
    ) -> tuple[Tensor, list, list]:
        T = embedded_BTD.shape[1]
        static = isinstance(cache, (StaticDecoderCache, StaticBeamDecoderCache))
        # The first two branches serve fast decoding only (the fixed-shape step that CUDA graphs and
        # torch.compile replay; beam search's never-reordered cache). Training, teacher forcing and plain
        # cached decoding take the last one.
        if static:  # one new token whose position is a device tensor; keys span the whole capacity
            assert T == 1 and tgt_pad_mask is None, "a static cache decodes one token at a time, unpadded"
            x_BTD = self.dropout(embedded_BTD + self.positions.at(cache.position_1))
            is_causal, self_mask = False, cache.start_step()
        elif isinstance(cache, BeamDecoderCache):  # one new token per beam; keys of every slot, masked
            assert T == 1 and tgt_pad_mask is None, "a beam cache decodes one token at a time, unpadded"
            x_BTD = self.dropout(embedded_BTD + self.positions(T, cache.length))
            is_causal, self_mask = False, cache.start_step(embedded_BTD.shape[0])
        else:
            offset = 0 if cache is None else cache.length
            x_BTD = self.dropout(embedded_BTD + self.positions(T, offset))
            # Without a cache or padding, queries and keys are the same T positions and torch's causal flag is
            # exact. With a cache the T queries are the last of offset + T keys, and padding must be masked as
            # well, so the mask is built explicitly (one new query with no padding needs none: it sees all keys).
            is_causal = cache is None and tgt_pad_mask is None
            self_mask = None
            if not is_causal and (T > 1 or tgt_pad_mask is not None):
                pad = None if tgt_pad_mask is None else key_mask(tgt_pad_mask)
                self_mask = combine(causal_mask(T, offset + T, device=embedded_BTD.device), pad)
        memory_mask = None if src_pad_mask_BS is None else key_mask(src_pad_mask_BS)
        self_weights, cross_weights = [], []
        for index, layer in enumerate(self.layers):
            x_BTD, layer_self, layer_cross = layer(
                x_BTD,
                self_mask=self_mask,
                self_is_causal=is_causal,
                memory_kv=memory_kv[index],
                memory_mask=memory_mask,
                layer_cache=None if cache is None else cache.layers[index],
                need_weights=need_weights,
            )
            self_weights.append(layer_self)
            cross_weights.append(layer_cross)
        if static:
            cache.advance()
        if self.final_norm is not None:
            x_BTD = self.final_norm(x_BTD)
        return x_BTD, self_weights, cross_weights


class Transformer(nn.Module):
    """Encoder, decoder and output projection, with the embedding sharing the config asks for."""

    def __init__(self, config: ModelConfig, *, seed: int = 0) -> None:
        if not isinstance(config, ModelConfig):
            raise TypeError(
                f"config must be a ModelConfig (e.g. tformer.config.preset('tiny', ...)), got {type(config).__name__}"
            )
        check_fits_in_memory(config)  # before any layer: an impossible model would take all memory first
        super().__init__()
        self.config = config
        self.src_embedding = TokenEmbedding(
            config.src_vocab_size, config.d_model, pad_id=config.pad_id, scale=config.scale_embeddings
        )
        # With a joint vocabulary the target side reads the source embedding: one tensor, one state-dict key.
        self.separate_tgt_embedding = (
            None
            if config.share_embeddings
            else TokenEmbedding(
                config.tgt_vocab_size, config.d_model, pad_id=config.pad_id, scale=config.scale_embeddings
            )
        )
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.output_projection = (
            None if config.tie_output else Linear(config.d_model, config.tgt_vocab_size, bias=False)
        )
        self.packed: Tensor | None = None  # the tied output weight, packed inside `packed_weights(model)`
        self.final_logits_bias = nn.Parameter(torch.zeros(config.tgt_vocab_size)) if config.final_logits_bias else None
        # fp32 whatever torch's default dtype (a notebook's set_default_dtype(torch.float64)): a seed's weights, a
        # run's checkpoints and the precision it trains in do not depend on it; another dtype: `.to(dtype)` after
        if torch.get_default_dtype() != torch.float32:
            self.float()
        if self.src_embedding.weight.device.type != "meta":  # built on the meta device: no numbers to set yet
            self.reset_parameters(seed)

    @property
    def tgt_embedding(self) -> TokenEmbedding:
        return self.src_embedding if self.separate_tgt_embedding is None else self.separate_tgt_embedding

    # ---------------------------------------------------------------- initialisation
    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Xavier-uniform for every projection matrix (each of the fused Q, K, V blocks on its own),
        zero biases, normal with std d_model^-1/2 for token embeddings (unit variance after the sqrt(d_model)
        scale) with a zero padding row and for learned positions (not scaled), and LayerNorm at identity.
        The same seed gives the same weights, independent of torch's global random state."""
        generator = torch.Generator().manual_seed(seed)
        std = self.config.d_model**-0.5
        for module in self.modules():
            if isinstance(module, nn.Linear):
                for block in projection_blocks(module):
                    nn.init.xavier_uniform_(block, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, TokenEmbedding | LearnedPositions):
                nn.init.normal_(module.weight, mean=0.0, std=std, generator=generator)
                if isinstance(module, TokenEmbedding):
                    module.weight[module.pad_id].zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
        if self.final_logits_bias is not None:
            self.final_logits_bias.zero_()

    # ---------------------------------------------------------------- the public API
    def encode(
        self, src_ids: Tensor, *, src_pad_mask: Tensor | None = None, return_attention: bool = False
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """memory_BSD for src_ids_BS; with `return_attention`, also the per-layer B H S S weights."""
        check_ids(src_ids, "src_ids")
        check_mask(src_pad_mask, "src_pad_mask", like=src_ids, like_name="src_ids")
        self._check_length(src_ids.shape[1], "source")
        if src_pad_mask is None:
            src_pad_mask = padding_mask(src_ids, self.config.pad_id)
        memory_BSD, weights = self.encoder(
            self.src_embedding(src_ids), src_pad_mask_BS=src_pad_mask, need_weights=return_attention
        )
        return (memory_BSD, weights) if return_attention else memory_BSD

    def decode(
        self,
        tgt_ids: Tensor,
        *,
        memory: Tensor | None,
        src_pad_mask: Tensor | None,
        tgt_pad_mask: Tensor | None = None,
        cache: AnyCache | None = None,
        return_attention: bool = False,
    ) -> Tensor | tuple[Tensor, list[Tensor], list[Tensor]]:
        """logits_BTV for the target prefix tgt_ids_BT, attending to `memory` (B S D).

        With a `cache` (see `new_cache`), tgt_ids holds only the new tokens; keys and values of earlier
        positions and of the memory come from the cache, and `memory` may be None. `tgt_pad_mask`
        then covers every key position so far, shape (B, cache.length + T). A `StaticDecoderCache`
        (see `new_static_cache`) takes one token per row and no `tgt_pad_mask`; its capacity bounds
        the length. A `BeamDecoderCache` (see `new_beam_cache`) takes one token per beam, its rows being
        sentences x beams, and masks each beam's self-attention to its own ancestors; a
        `StaticBeamDecoderCache` (see `new_static_beam_cache`) does the same at fixed shapes.
        """
        check_ids(tgt_ids, "tgt_ids")
        check_mask(tgt_pad_mask, "tgt_pad_mask")
        check_mask(src_pad_mask, "src_pad_mask")
        if not isinstance(cache, (StaticDecoderCache, StaticBeamDecoderCache)):
            offset = 0 if cache is None else cache.length
            self._check_length(offset + tgt_ids.shape[1], "target")
        if cache is not None and cache.memory_kv:
            memory_kv = cache.memory_kv
        else:
            if memory is None:
                raise ValueError("decode needs `memory` unless the cache already holds the memory's keys/values")
            check_memory(memory, self.config.d_model)
            memory_kv = self.project_memory(memory)
            if cache is not None:
                cache.memory_kv = memory_kv
        check_decoder_rows(
            tgt_ids,
            cache_rows=cache.layers[0].k_BHLK.shape[0] if isinstance(cache, DecoderCache) else None,
            memory_rows=memory_kv[0][0].shape[0] if memory_kv else None,
        )
        hidden_BTD, self_weights, cross_weights = self.decoder(
            self.tgt_embedding(tgt_ids),
            memory_kv=memory_kv,
            src_pad_mask_BS=src_pad_mask,
            tgt_pad_mask=tgt_pad_mask,
            cache=cache,
            need_weights=return_attention,
        )
        logits_BTV = self.project_output(hidden_BTD)
        return (logits_BTV, self_weights, cross_weights) if return_attention else logits_BTV

    def forward(
        self,
        src_ids: Tensor,
        tgt_ids: Tensor,
        *,
        src_pad_mask: Tensor | None = None,
        tgt_pad_mask: Tensor | None = None,
        return_attention: bool = False,
    ) -> Tensor | tuple[Tensor, AttentionMaps]:
        """Teacher-forced logits_BTV: position t, having read tgt_ids up to t, predicts the next token,
        tgt_out[t] (docs/CONVENTIONS.md). Right padding needs no `tgt_pad_mask`: under the causal mask a
        real position never reads the pads after it, and the loss ignores the padded positions."""
        check_pair(src_ids, tgt_ids)
        if src_pad_mask is None:
            src_pad_mask = padding_mask(src_ids, self.config.pad_id)
        encoded = self.encode(src_ids, src_pad_mask=src_pad_mask, return_attention=return_attention)
        memory_BSD, encoder_weights = encoded if return_attention else (encoded, [])
        decoded = self.decode(
            tgt_ids,
            memory=memory_BSD,
            src_pad_mask=src_pad_mask,
            tgt_pad_mask=tgt_pad_mask,
            return_attention=return_attention,
        )
        if not return_attention:
            return decoded
        logits_BTV, self_weights, cross_weights = decoded
        return logits_BTV, AttentionMaps(encoder_self=encoder_weights, decoder_self=self_weights, cross=cross_weights)

    def decoder_states(
        self,
        src_ids: Tensor,
        tgt_ids: Tensor,
        *,
        src_pad_mask: Tensor | None = None,
        tgt_pad_mask: Tensor | None = None,
    ) -> Tensor:
        """Teacher-forced final decoder states hidden_BTD: `forward` without the output projection, so
        that a training loss can project to the vocabulary a chunk of positions at a time."""
        check_pair(src_ids, tgt_ids)
        check_mask(tgt_pad_mask, "tgt_pad_mask")
        if src_pad_mask is None:
            src_pad_mask = padding_mask(src_ids, self.config.pad_id)
        memory_BSD = self.encode(src_ids, src_pad_mask=src_pad_mask)
        self._check_length(tgt_ids.shape[1], "target")
        hidden_BTD, _, _ = self.decoder(
            self.tgt_embedding(tgt_ids),
            memory_kv=self.project_memory(memory_BSD),
            src_pad_mask_BS=src_pad_mask,
            tgt_pad_mask=tgt_pad_mask,
            cache=None,
            need_weights=False,
        )
        return hidden_BTD

    # ---------------------------------------------------------------- pieces used by decoding
    def project_memory(self, memory_BSD: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Cross-attention keys and values of every decoder layer, computed once per source."""
        return [layer.cross_attention.project_memory(memory_BSD) for layer in self.decoder.layers]

    def packable_weight(self) -> Tensor | None:
        """The tied output projection's weight, for `packed_weights` (an untied one is a `Linear` of its own)."""
        return self.tgt_embedding.weight if self.output_projection is None else None

    def project_output(self, hidden_BTD: Tensor) -> Tensor:
        if self.output_projection is None:  # tied: the target embedding, transposed
            logits_BTV = linear(hidden_BTD, self.tgt_embedding.weight, None, self.packed)
        else:
            logits_BTV = self.output_projection(hidden_BTD)
        if self.final_logits_bias is not None:
            logits_BTV = logits_BTV + self.final_logits_bias
        return logits_BTV

    def new_cache(self, *, batch_size: int, capacity: int, memory: Tensor | None = None) -> DecoderCache:
        """An empty decoder cache for `capacity` target positions (and the memory's keys/values if given)."""
        layout = self._cache_layout(capacity)
        if memory is not None:
            layout = dataclasses.replace(layout, dtype=memory.dtype)
        cache = DecoderCache.allocate(layout, batch_size=batch_size)
        if memory is not None:
            cache.memory_kv = self.project_memory(memory)
        return cache

    def new_beam_cache(self, *, sentences: int, beams: int, capacity: int) -> BeamDecoderCache:
        """A decoder cache for beam search whose beams are reordered without moving keys and values."""
        return BeamDecoderCache.allocate(self._cache_layout(capacity), sentences=sentences, beams=beams)

    def new_static_cache(self, *, batch_size: int, capacity: int) -> StaticDecoderCache:
        """A fixed-shape decoder cache for a decoding step captured once and replayed (CUDA graphs)."""
        return StaticDecoderCache.allocate(self._cache_layout(capacity), batch_size=batch_size)

    def new_static_beam_cache(self, *, sentences: int, beams: int, capacity: int) -> StaticBeamDecoderCache:
        """`new_static_cache` for beam search: rows sentences x beams, reordered by an ancestry table."""
        return StaticBeamDecoderCache.allocate(self._cache_layout(capacity), sentences=sentences, beams=beams)

    def _cache_layout(self, capacity: int) -> CacheLayout:
        reference = self.tgt_embedding.weight
        return CacheLayout(
            n_layers=self.config.n_decoder_layers,
            n_heads=self.config.n_heads,
            head_dim=self.config.head_dim,
            capacity=min(capacity, self.config.max_positions),
            dtype=reference.dtype,
            device=reference.device,
        )

    def _check_length(self, length: int, side: str) -> None:
        if length > self.config.max_positions:
            raise ValueError(
                f"{side} length {length} exceeds max_positions={self.config.max_positions}; "
                "shorten the input or raise model.max_positions"
            )
