"""Run a model one target token at a time: encode once, project the memory once, keep the KV cache.

`IncrementalDecoder` owns the cache and the source mask. Every search (greedy, beam, sampling) drives it
the same way: `step(tokens_R)` for the next log-probabilities, `reorder(rows_R)` when beams swap
histories, `widen(n)` when each row becomes n beams, `select(rows)` when finished sentences leave. Beam
search asks for the model's beam cache (`beam_slots=N`: a `BeamDecoderCache` with N slots per sentence,
whose reorder moves an ancestry table instead of every layer's keys and values), unless attention maps
are wanted or the model has none.

The memory's keys/values (and the source mask) have one row per memory entry, and n adjacent decoder
rows read each entry. Beam search shares one entry among a sentence's beams (`shared_memory=True`:
the memory is stored and read once per sentence, not once per beam); searches whose rows finish one at
a time (several sampled paths per sentence) give every row its own copy.

The model needs only this surface (a `Transformer`, or an `EnsembleModel`): `encode(src, *,
src_pad_mask)`, `project_memory(memory)`, `new_cache(*, batch_size, capacity)` returning a cache with
`memory_kv`, `reorder(indices)`, `select(indices)` and `select_memory(indices)` (optionally
`new_beam_cache(*, sentences, beams, capacity)` returning one like it), `decode(tokens, *, memory,
src_pad_mask, cache, return_attention)` whose query rows are a multiple of the memory's, and
`config.max_positions` / `config.pad_id` / `config.tgt_vocab_size` (and `config.src_vocab_size`, if it has
one, against which the source ids are checked).

Shape legend: B sentences, R rows (sentences x rows per sentence), M memory entries, S source length,
V vocabulary.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
from torch import Tensor

from tformer.config import DecodeConfig
from tformer.decoding.search_types import DecodingError
from tformer.model.inputs import check_bool_mask, check_id_tensor


def repeat_rows(tree: Any, repeats: int) -> Any:
    """Repeat every tensor of a nested list/tuple along dim 0 (row b -> rows b*repeats .. +repeats-1)."""
    if isinstance(tree, Tensor):
        return tree if repeats == 1 else tree.repeat_interleave(repeats, dim=0)
    return type(tree)(repeat_rows(item, repeats) for item in tree)


def encoded_memory(model: Any, src_ids_BS: Tensor, src_pad_mask_BS: Tensor, copies: int = 1) -> Any:
    """Encode the sources once and compute the memory's keys/values for every decoder layer once per
    sentence; with `copies` > 1 every sentence's entry is repeated (one per row that needs its own)."""
    memory = model.encode(src_ids_BS, src_pad_mask=src_pad_mask_BS)
    return repeat_rows(model.project_memory(memory), copies)


class IncrementalDecoder:
    """The model, its cache and the source mask of the rows being decoded."""

    can_drop_rows = True  # finished sentences may leave the batch (see StaticStepDecoder for one that cannot)

    def __init__(
        self,
        model: Any,
        src_ids_BS: Tensor,
        src_pad_mask_BS: Tensor,
        *,
        rows_per_sentence: int,
        capacity: int,
        want_attention: bool,
        shared_memory: bool,
        beam_slots: int = 0,
    ) -> None:
        self.model = model
        self.want_attention = want_attention
        self.rows = src_ids_BS.shape[0] * rows_per_sentence
        self.device = src_ids_BS.device
        copies = 1 if shared_memory else rows_per_sentence
        self.rows_per_memory = rows_per_sentence // copies  # adjacent rows reading one memory entry
        self.beam_cache = beam_slots > 0 and shared_memory and not want_attention and hasattr(model, "new_beam_cache")
        if self.beam_cache:
            self.cache = model.new_beam_cache(sentences=src_ids_BS.shape[0], beams=beam_slots, capacity=capacity)
        else:
            self.cache = model.new_cache(batch_size=self.rows, capacity=capacity)
        self.cache.memory_kv = encoded_memory(model, src_ids_BS, src_pad_mask_BS, copies)
        # one host sync before the loop: without padding, attention needs no mask at all
        self.mask_MS = None if bool(src_pad_mask_BS.all()) else repeat_rows(src_pad_mask_BS, copies)

    def step(self, tokens_R: Tensor) -> tuple[Tensor, Tensor | None]:
        """fp32 log-probabilities of the next token (R, V) and, if wanted, the cross-attention (R, S)."""
        out = self.model.decode(
            tokens_R[:, None],
            memory=None,
            src_pad_mask=self.mask_MS,
            cache=self.cache,
            return_attention=self.want_attention,
        )
        logits_R1V = out[0] if self.want_attention else out
        logits_RV = logits_R1V[:, -1].float()  # fp32 logits: the model's own tensor, used by no one else
        # in place: the step's largest table (rows x vocabulary) is written once, not copied into a new one
        log_probs_RV = torch.log_softmax(logits_RV, dim=-1, out=logits_RV)
        attention_RS = out[2][-1][:, :, -1].float().mean(dim=1) if self.want_attention else None
        return log_probs_RV, attention_RS

    def reorder(self, rows_R: Tensor) -> None:
        """Row r continues the history of row rows_R[r], always a row of the same sentence."""
        self.cache.reorder(rows_R)

    def widen(self, n: int) -> None:
        """Every row becomes n adjacent rows with its history, all reading its memory entry (a beam cache
        has written the first position into all its slots already)."""
        if not self.beam_cache:
            self.cache.select(torch.arange(self.rows, device=self.device).repeat_interleave(n))
        self.rows *= n
        self.rows_per_memory *= n

    def select(self, rows: Tensor) -> None:
        """Keep only these rows (finished sentences leave the batch): whole groups of the rows that read
        one memory entry, in order, whose entries are kept too."""
        self.cache.select(rows)
        self.rows = len(rows)
        entries = rows if self.rows_per_memory == 1 else rows[:: self.rows_per_memory] // self.rows_per_memory
        self.cache.select_memory(entries)
        if self.mask_MS is not None:
            self.mask_MS = self.mask_MS.index_select(0, entries)


def decoding_capacity(model: Any, max_len: int) -> int:
    """Cache positions needed for `max_len` steps (bos and every token but the last are fed back)."""
    return min(max_len, model.config.max_positions)


def take_rows(state: Any, index: Tensor) -> Any:
    """A copy of a dataclass of per-row (or per-sentence) tensors, keeping rows `index` of each."""
    changes = {
        item.name: getattr(state, item.name).index_select(0, index)
        for item in dataclasses.fields(state)
        if isinstance(getattr(state, item.name), Tensor)
    }
    return dataclasses.replace(state, **changes)


def check_arguments(
    model: Any, src_ids_BS: Any, src_pad_mask_BS: Any, *, bos_id: Any, eos_id: Any, config: Any
) -> None:
    """Refuse, in one line that names the argument, what a search cannot decode: checks of types, shapes
    and devices only, which read nothing back from the device (`check_inputs` also checks the ids)."""
    if not isinstance(config, DecodeConfig):
        raise TypeError(f"config must be a DecodeConfig, got {type(config).__name__}")
    if getattr(model, "training", False):
        raise DecodingError("the model is in training mode (dropout on); call model.eval() before decoding")
    training_part = next((name for name, part in _named_parts(model) if part.training), None)
    if training_part is not None:  # model.decoder.train() left the model's own flag off and dropout on
        raise DecodingError(
            f"model.{training_part} is in training mode (dropout on); call model.eval() before decoding"
        )
    check_id_tensor(src_ids_BS, "src_ids")
    if src_ids_BS.dim() != 2 or 0 in src_ids_BS.shape:
        raise DecodingError(
            f"src_ids must be a non-empty (batch, length) tensor; got shape {tuple(src_ids_BS.shape)}"
            + (" (one sentence: src_ids[None])" if src_ids_BS.dim() == 1 and len(src_ids_BS) else "")
        )
    weights = next(model.parameters(), None) if hasattr(model, "parameters") else None
    if weights is not None and weights.device != src_ids_BS.device:
        raise DecodingError(
            f"src_ids are on {src_ids_BS.device} but the model is on {weights.device}: "
            f"move them with src_ids.to({str(weights.device)!r})"
        )
    if src_pad_mask_BS is not None:
        check_bool_mask(src_pad_mask_BS, "src_pad_mask")
        if src_pad_mask_BS.shape != src_ids_BS.shape:
            raise DecodingError(
                f"src_pad_mask shape {tuple(src_pad_mask_BS.shape)} differs from src_ids {tuple(src_ids_BS.shape)}"
            )
        if src_pad_mask_BS.device != src_ids_BS.device:
            raise DecodingError(f"src_pad_mask is on {src_pad_mask_BS.device} but src_ids on {src_ids_BS.device}")
    vocab_size = model.config.tgt_vocab_size
    for name, value in (("bos_id", bos_id), ("eos_id", eos_id)):
        if not hasattr(value, "__index__") or not 0 <= operator.index(value) < vocab_size:
            raise DecodingError(f"{name} must be a token id in [0, {vocab_size}), got {value!r}")


def _named_parts(model: Any) -> list[tuple[str, torch.nn.Module]]:
    """The model's submodules that compute, by name: not the lists that only hold others (whose flag nothing
    reads), none for a model that is not an nn.Module."""
    if not isinstance(model, torch.nn.Module):
        return []
    containers = (torch.nn.ModuleList, torch.nn.ModuleDict)
    return [(name, part) for name, part in model.named_modules() if not isinstance(part, containers)]


def check_inputs(
    model: Any, src_ids_BS: Tensor, src_pad_mask_BS: Tensor | None, *, bos_id: int, eos_id: int, config: DecodeConfig
) -> Tensor:
    """The source mask to use (from the model's pad id when not given), after `check_arguments` and a check
    that every id is in the source vocabulary: out of it, the embedding lookup fails deep inside torch (on
    a GPU with a device-side assert that leaves the device unusable). One host synchronisation."""
    check_arguments(model, src_ids_BS, src_pad_mask_BS, bos_id=bos_id, eos_id=eos_id, config=config)
    vocab_size = getattr(model.config, "src_vocab_size", None)
    low, high = torch.stack(torch.aminmax(src_ids_BS)).tolist() if vocab_size is not None else (0, 0)
    if vocab_size is not None and (low < 0 or high >= vocab_size):
        raise DecodingError(
            f"src_ids must be token ids in [0, {vocab_size}) (the model's source vocabulary), "
            f"got ids from {low} to {high}"
        )
    if src_pad_mask_BS is None:
        return src_ids_BS != model.config.pad_id
    return src_pad_mask_BS
