"""How much memory a search needs, counted from the shapes before it starts, so that a beam (or a number of
samples) too large for the machine is refused in one line, and a batch too large is decoded a few
sentences at a time, instead of the search allocating until the kernel's out-of-memory killer ends the
process (`tformer translate RUN --beam 100000` was killed with no message after taking the whole machine).

The estimate is an upper bound on the search's own tensors, per sentence (n rows: the beam, the samples,
or 1 for greedy), in 4-byte numbers (8 for token ids), at the longest output its source allows (T steps,
so T cache positions) and counting each large table twice, for the copy a reorder, a gather or a
softmax makes of it:

- the decoder's self-attention cache: keys and values, layers x n x T x d_model, twice;
- the memory's (cross-attention) keys and values: layers x S x d_model, once per sentence in beam
  search, once per row in sampling;
- one step's activations: n x (2 x vocabulary + 2 x d_ff + 8 x d_model), the logits among them;
- one layer's attention scores, heads x n x keys, and its mask, n x keys (as a boolean and as a float
  table): a beam cache's queries read the keys of all n beams of their sentence over the T positions
  (n x T keys, so this grows as n squared), other searches' T keys; heads x n x S for the
  cross-attention;
- the search's bookkeeping: histories, finished lists and candidates (n x T token ids, several times; the
  2n x 2n candidates), and the attention maps of `return_attention` or the coverage penalty (n x T x S).

An ensemble counts each model's share. The model's weights and the encoder's work are not counted: the
budget (`decoding_budget`) leaves half of the memory to them and to everything else.
Python arithmetic only, once per batch: nothing is read back from the device.

Shape legend: B sentences, S source length (padded), T steps, V vocabulary.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tformer.config import DecodeConfig
from tformer.decoding.search_types import DecodingError
from tformer.model.size import memory_here

NUMBER_BYTES = 4  # float32 (a model in half precision needs less: the estimate stays an upper bound)
ID_BYTES = 8  # torch.long
MASK_BYTES = 5  # a boolean mask over the keys, and the float mask attention makes of it


def rows_per_sentence(config: DecodeConfig) -> int:
    """The decoder rows one sentence occupies: its samples, its beams, or 1 (greedy)."""
    return config.nbest if config.sampling else config.beam_size


def decoding_bytes(model: Any, config: DecodeConfig, *, source_length: int, return_attention: bool = False) -> int:
    """An upper bound on the bytes that decoding ONE sentence of `source_length` tokens (padding included)
    takes, with `config` (see the module docstring for what is counted)."""
    S, n = source_length, rows_per_sentence(config)
    limit = model.config.max_positions
    T = max(1, min(math.floor(min(config.max_len_a * S, limit)) + config.max_len_b, limit))  # a x S may be inf
    beam = n > 1 and not config.sampling
    maps = return_attention or (beam and config.coverage_penalty > 0)
    beam_cache = beam and not maps and hasattr(model, "new_beam_cache")
    memory_copies = n if config.sampling else 1
    total = 0
    for part in getattr(model, "models", [model]):  # an EnsembleModel's members, or the model itself
        c = part.config  # a stand-in model that does not give its sizes: only its logits are counted
        L, D, H, F = (getattr(c, name, 0) for name in ("n_decoder_layers", "d_model", "n_heads", "d_ff"))
        cache = 2 * L * n * T * D * 2
        memory = 2 * L * S * D * memory_copies
        step = n * (2 * c.tgt_vocab_size + 2 * F + 8 * D)
        self_keys = n * T if beam_cache else T
        scores = H * n * (self_keys + S)
        total += NUMBER_BYTES * (cache + memory + step + scores) + MASK_BYTES * n * self_keys
    history = (8 if beam else 4) * n * (T + 1)
    candidates = 8 * (2 * n) * (2 * n) if beam else 0
    total += ID_BYTES * (history + 2 * n * T + candidates)
    total += NUMBER_BYTES * 8 * n * T * S if maps else 0
    return total


def decoding_budget(device: torch.device | str) -> tuple[int, int] | None:
    """(the bytes a batch's decoding may take, the memory they are half of), or None where the memory
    size is unknown. The memory is the device's on a GPU, else the least of this machine's physical
    memory, the process's address-space limit (`ulimit -v`) and its cgroup's limit (a container's)."""
    device = torch.device(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    elif device.type == "cpu":
        here = memory_here()
        if here is None:
            return None
        total = here
    else:
        return None
    return total // 2, total


class SearchTooLargeError(DecodingError):
    """A search too large for the memory even for one sentence. The message names the setting as Python
    does (`DecodeConfig.beam_size`); `named` says it with the name the caller gave it (a CLI flag, a
    request field), so the estimate is made here alone."""

    def __init__(self, config: DecodeConfig, *, source_length: int, needed: int, allowed: int, total: int) -> None:
        self.setting = "nbest" if config.sampling else "beam_size"  # the DecodeConfig field to lower
        self.value = config.nbest if config.sampling else config.beam_size
        self.source_length, self.needed, self.allowed, self.total = source_length, needed, allowed, total
        super().__init__(self.named(f"DecodeConfig.{self.setting}"))

    def named(self, name: str) -> str:
        """The one-line refusal, with `name` for the setting the caller set."""
        what = f"nbest {self.value} ({name}) samples" if self.setting == "nbest" else f"beam {self.value} ({name})"
        return (
            f"decoding one sentence of {self.source_length} tokens with {what} needs about "
            f"{self.needed / 2**30:,.1f} GiB, more than the {self.allowed / 2**30:,.1f} GiB decoding may use (half of "
            f"the {self.total / 2**30:,.1f} GiB of memory here): use a smaller {name}"
        )


def sentences_per_batch(
    model: Any, config: DecodeConfig, *, source_length: int, device: torch.device | str, return_attention: bool = False
) -> int | None:
    """How many sentences of `source_length` tokens one batch may decode within the budget (None: no
    limit known). Refuses, in one line, a search for which even one sentence is too large."""
    budget = decoding_budget(device)
    if budget is None:
        return None
    allowed, total = budget
    one = decoding_bytes(model, config, source_length=source_length, return_attention=return_attention)
    if one > allowed:
        raise SearchTooLargeError(config, source_length=source_length, needed=one, allowed=allowed, total=total)
    return allowed // one
