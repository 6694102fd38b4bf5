"""Word embeddings and positional encodings.

The paper multiplies token embeddings by sqrt(d_model) and adds a fixed sinusoidal encoding:

    PE(pos, 2i)   = sin(pos / 10000^(2i / d_model))
    PE(pos, 2i+1) = cos(pos / 10000^(2i / d_model))

"interleaved" is that layout; "concatenated" puts the d_model/2 sines first and the cosines after them
(Hugging Face's Marian). Learned positions are an option, as in the paper's Table 3 row (E).

Shape legend: B batch, T length, D model dim, V vocabulary, P positions, I frequencies (i = 0 .. ceil(D/2) - 1).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_table(n_positions: int, d_model: int, layout: str = "interleaved") -> Tensor:
    """The fixed encoding for positions 0..n_positions-1, shape (P, D), computed in float64."""
    positions_P1 = torch.arange(n_positions, dtype=torch.float64)[:, None]
    # 1 / 10000^(2i / d_model) for i = 0 .. ceil(d_model/2)-1
    inverse_frequency_I = torch.pow(10000.0, -torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    angles_PI = positions_P1 * inverse_frequency_I[None, :]
    sines, cosines = torch.sin(angles_PI), torch.cos(angles_PI)
    table_PD = torch.empty(n_positions, d_model, dtype=torch.float64)
    if layout == "interleaved":
        table_PD[:, 0::2] = sines
        table_PD[:, 1::2] = cosines[:, : d_model // 2]
    elif layout == "concatenated":
        n_sines = sines.shape[1]
        table_PD[:, :n_sines] = sines
        table_PD[:, n_sines:] = cosines[:, : d_model - n_sines]
    else:
        raise ValueError(f"unknown sinusoidal layout {layout!r}; use interleaved or concatenated")
    return table_PD


class SinusoidalPositions(nn.Module):
    """Fixed positional encoding; a non-persistent buffer, so checkpoints do not store it."""

    def __init__(self, max_positions: int, d_model: int, layout: str) -> None:
        super().__init__()
        self.layout = layout
        # computed on the CPU, then put where the model is built, except on the meta device (a model built
        # there holds no numbers until a checkpoint's are loaded into it, but this table is no checkpoint's)
        with torch.device("cpu"):
            table_PD = sinusoidal_table(max_positions, d_model, layout).float()
        # where the model is built (torch.get_default_device() ignores a `with torch.device(...)` before torch 2.8)
        device = torch.empty(0).device
        self.register_buffer("table_PD", table_PD if device.type == "meta" else table_PD.to(device), persistent=False)

    def _apply(self, fn, recurse=True):
        """After a cast to float64 (`.double()`), the table is the formula's float64 values again, not the
        float32 table cast up (3e-8 off: enough to spoil a float64 comparison with a reference)."""
        super()._apply(fn, recurse)
        if self.table_PD.dtype == torch.float64:
            self.table_PD = sinusoidal_table(*self.table_PD.shape, self.layout).to(self.table_PD.device)
        return self

    def forward(self, length: int, offset: int = 0) -> Tensor:
        return self.table_PD[offset : offset + length]  # T D

    def at(self, positions_T: Tensor) -> Tensor:
        """The encodings of positions held in a tensor (T D), e.g. on the device for a captured step."""
        return self.table_PD.index_select(0, positions_T)


class LearnedPositions(nn.Module):
    def __init__(self, max_positions: int, d_model: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(max_positions, d_model))

    def forward(self, length: int, offset: int = 0) -> Tensor:
        return self.weight[offset : offset + length]  # T D

    def at(self, positions_T: Tensor) -> Tensor:
        return self.weight.index_select(0, positions_T)  # T D


class TokenEmbedding(nn.Module):
    """Token vectors multiplied by sqrt(d_model) (paper section 3.4). The padding row starts at zero and
    the lookup sends it no gradient; tied to the output projection it is trained there (docs/architecture.md)."""

    def __init__(self, vocab_size: int, d_model: int, *, pad_id: int, scale: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model))
        self.pad_id = pad_id
        self.scale = math.sqrt(d_model) if scale else 1.0

    def forward(self, ids_BT: Tensor) -> Tensor:
        return nn.functional.embedding(ids_BT, self.weight, padding_idx=self.pad_id) * self.scale  # B T D
