"""The one mask convention of tformer, and the one place it is converted.

Convention: a boolean mask where True means "this query may attend to this key". Masks broadcast to
attention scores of shape (B, H, T, S): a padding mask is (B, 1, 1, S), a causal mask (1, 1, T, S).

The scores never meet a boolean: each attention function passes the mask through `additive_mask`,
which turns it into 0 / most-negative-finite values, added to the scores before the softmax. A row whose
keys are all masked therefore gets a uniform (finite) distribution instead of the NaN that -inf would give.
That holds in float32 and bfloat16, the dtypes tformer computes in: a score is far too small to push the
most negative value past the end of their range. float16's range ends at -65504, so there a masked score
below about -16 overflows to -inf (NaN for a row with every key masked, in the matrix and loop forms).

Shape legend: B batch, S source (key) length, T target (query) length, H heads.
"""

from __future__ import annotations

import torch
from torch import Tensor


def padding_mask(ids_BS: Tensor, pad_id: int) -> Tensor:
    """True where a token is real, False where it is padding. Shape (B, S)."""
    return ids_BS != pad_id


def key_mask(keep_BS: Tensor) -> Tensor:
    """Lift a per-key keep mask (B, S) to attention shape (B, 1, 1, S)."""
    return keep_BS[:, None, None, :]


def causal_mask(query_length: int, key_length: int | None = None, *, device: torch.device | None = None) -> Tensor:
    """Query t may see keys 0..t (+ offset when keys include earlier cached positions). Shape (1, 1, T, S).

    With a cache, the queries are the last `query_length` positions of `key_length` keys.
    """
    key_length = query_length if key_length is None else key_length
    offset = key_length - query_length
    query_positions_T1 = torch.arange(query_length, device=device)[:, None] + offset
    key_positions_1S = torch.arange(key_length, device=device)[None, :]
    return (key_positions_1S <= query_positions_T1)[None, None]


def combine(*masks: Tensor | None) -> Tensor | None:
    """Logical AND of the masks that are given (None means "no restriction")."""
    result = None
    for mask in masks:
        if mask is not None:
            result = mask if result is None else result & mask
    return result


def additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """True -> 0, False -> the most negative finite value of `dtype`; None stays None."""
    if mask is None:
        return None
    if mask.dtype != torch.bool:  # torch's where failed on it ("expected condition to be a boolean tensor")
        raise TypeError(
            f"an attention mask is a bool tensor, True where a query may attend, got {mask.dtype}; an additive "
            "float mask (0 or -inf, as nn.MultiheadAttention takes) converts with `mask == 0`"
        )
    zeros = torch.zeros((), dtype=dtype, device=mask.device)
    most_negative = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=mask.device)
    return torch.where(mask, zeros, most_negative)
