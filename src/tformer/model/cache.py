"""Key/value cache for incremental (one token at a time) decoding.

Decoder self-attention keys and values are written into buffers preallocated for the longest output,
so a step costs one small write instead of recomputing or concatenating the whole prefix.
Cross-attention keys and values depend only on the source, so they are computed once and kept.
Beam search reorders hypotheses with `reorder`, an index_select along the batch dimension.

Shape legend: B batch (sentences x beams), H heads, L cache capacity, S source length, K head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class LayerCache:
    """Self-attention keys and values of one decoder layer, filled up to `length`."""

    k_BHLK: Tensor
    v_BHLK: Tensor
    length: int = 0

    def append(self, k_BHTK: Tensor, v_BHTK: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new positions and return keys and values of every position so far."""
        end = self.length + k_BHTK.shape[2]
        if end > self.k_BHLK.shape[2]:
            raise ValueError(f"decoder cache holds {self.k_BHLK.shape[2]} positions; asked for {end}")
        self.k_BHLK[:, :, self.length : end] = k_BHTK
        self.v_BHLK[:, :, self.length : end] = v_BHTK
        self.length = end
        return self.k_BHLK[:, :, :end], self.v_BHLK[:, :, :end]


@dataclass
class DecoderCache:
    """Everything a decoder needs to continue from the tokens it has already seen."""

    layers: list[LayerCache]
    memory_kv: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    @classmethod
    def allocate(
        cls,
        *,
        n_layers: int,
        batch_size: int,
        n_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> DecoderCache:
        shape = (batch_size, n_heads, capacity, head_dim)
        layers = [
            LayerCache(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
            for _ in range(n_layers)
        ]
        return cls(layers=layers)

    @property
    def length(self) -> int:
        """How many target positions have been decoded (the position of the next token)."""
        return self.layers[0].length

    def reorder(self, indices_B: Tensor) -> None:
        """Keep, for row i of the batch, what row indices_B[i] had (beam search's reordering)."""
        for layer in self.layers:
            layer.k_BHLK = layer.k_BHLK.index_select(0, indices_B)
            layer.v_BHLK = layer.v_BHLK.index_select(0, indices_B)
        self.memory_kv = [(k.index_select(0, indices_B), v.index_select(0, indices_B)) for k, v in self.memory_kv]
