"""The checks of what a caller hands the model: token ids and padding masks of the right kind and shape.

A wrong argument fails here in one line that names it, instead of deep inside torch's embedding lookup
or attention (or, for a 1-D id tensor, being indexed wrongly). They read nothing back from the device;
the ids' range is checked by decoding (`tformer.decoding.incremental.check_inputs`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def check_ids(ids: Tensor, name: str) -> None:
    """Refuse, naming the argument, what the embedding lookup would refuse from deep inside torch (or, for
    a 1-D tensor, index wrongly): token ids are a (batch, length) integer tensor. Reads nothing back from
    the device; the ids' range is checked by decoding (`tformer.decoding.incremental.check_inputs`)."""
    check_id_tensor(ids, name)
    if ids.dim() != 2:
        raise ValueError(
            f"{name} must be a (batch, length) tensor, got shape {tuple(ids.shape)}"
            + (f" (one sentence: {name}[None])" if ids.dim() == 1 else "")
        )


def check_id_tensor(ids: Any, name: str) -> None:
    """Token ids are an integer tensor (whatever its shape; `check_ids` and decoding check that)."""
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dtype not in (torch.long, torch.int32):
        raise TypeError(f"{name} must hold integer token ids (torch.long), got {ids.dtype}")


def check_bool_mask(mask: Any, name: str) -> None:
    """A padding mask is a bool tensor, True for real tokens (its shape is checked by the caller)."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        what = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(f"{name} must be a bool tensor (True for real tokens), got {what}")


def check_mask(mask: Tensor | None, name: str, *, like: Tensor | None = None, like_name: str = "") -> None:
    """A padding mask is a bool tensor (True for real tokens), of the shape of `like` when given."""
    if mask is None:
        return
    check_bool_mask(mask, name)
    if like is not None and mask.shape != like.shape:
        raise ValueError(f"{name} shape {tuple(mask.shape)} differs from {like_name} {tuple(like.shape)}")


def check_pair(src_ids: Tensor, tgt_ids: Tensor) -> None:
    """Teacher forcing reads one target row per source row: a batch of another size was broadcast over the
    memory (as decoding's beams are) and gave logits for pairs that do not exist."""
    check_ids(src_ids, "src_ids")
    check_ids(tgt_ids, "tgt_ids")
    if src_ids.shape[0] != tgt_ids.shape[0]:
        raise ValueError(
            f"src_ids has {src_ids.shape[0]} rows but tgt_ids {tgt_ids.shape[0]}: give one target row per source row"
        )


def check_decoder_rows(tgt_ids: Tensor, *, cache_rows: int | None, memory_rows: int | None) -> None:
    """Checked before the first layer writes into a cache: a misfit found in a later layer left the cache one
    position on, its keys written by broadcasting another batch's rows, and every later step read them."""
    rows = tgt_ids.shape[0]
    if cache_rows is not None and rows != cache_rows:
        raise ValueError(f"tgt_ids has {rows} rows but the cache {cache_rows}: give one row per cache row")
    if memory_rows is not None and rows % memory_rows:
        raise ValueError(f"tgt_ids has {rows} rows, not a multiple of the memory's {memory_rows}")


def check_memory(memory: Any, d_model: int) -> None:
    """The memory `decode` attends to is the encoder's output: (batch, source length, d_model) floats. One of
    another width failed in torch's matrix product of the cross-attention's keys."""
    if not isinstance(memory, Tensor) or not memory.is_floating_point():
        what = memory.dtype if isinstance(memory, Tensor) else type(memory).__name__
        raise TypeError(f"memory must be a float tensor, the encoder's output (model.encode), got {what}")
    if memory.dim() != 3 or memory.shape[-1] != d_model:
        raise ValueError(
            f"memory must be (batch, source length, d_model={d_model}), the encoder's output, got shape "
            f"{tuple(memory.shape)}"
        )
