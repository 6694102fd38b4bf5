"""A decoding step of fixed shape, replayed as a CUDA graph on a GPU (`DecodeConfig.static_step`).

An eager decoding step launches a few hundred small kernels, one per operation of every layer; at the
batch sizes of translation on a GPU, launching them from Python costs more time than the arithmetic.
A CUDA graph records the kernels of one step once and replays all of them with a single launch. For
that, every tensor the step reads or writes must keep its address and shape from one step to the next:

- the cache is a `StaticDecoderCache` (full capacity, the position of the next token held on the
  device and advanced by the step itself, a mask over the positions not yet written);
- the step reads its tokens from one fixed buffer and writes its log-probabilities into another;
- sentences never leave the batch (a finished row keeps computing; the search ignores its output),
  and beam search gives every beam its own row from the first step on;
- beam search's reordering of the cache is part of the step: `reorder` only records which rows to
  take (composing with any reorder still pending), and the next step applies it before decoding.

On the CPU the same fixed-shape step runs eagerly. It is slower there than the default step (it attends
over the whole capacity every time) and exists so that tests can show it computes exactly what the
default step computes. Attention maps (`return_attention`, the coverage penalty) and ensembles use the
default step.

Shape legend: B sentences, R rows (sentences x rows per sentence), S source length, V vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tformer.config import DecodeConfig
from tformer.decoding.incremental import IncrementalDecoder, memory_for_rows, repeat_rows


def uses_static_step(model: Any, config: DecodeConfig, *, want_attention: bool) -> bool:
    """Whether a search runs the fixed-shape step: asked for, no attention maps, a single Transformer."""
    return config.static_step and not want_attention and hasattr(model, "new_static_cache")


def make_decoder(
    model: Any,
    src_ids_BS: Tensor,
    src_pad_mask_BS: Tensor,
    *,
    rows_per_sentence: int,
    capacity: int,
    want_attention: bool,
    static: bool,
    reorders_rows: bool,
) -> IncrementalDecoder | StaticStepDecoder:
    """The decoder a search drives: the static step when `static`, else the default incremental one.
    `reorders_rows`: the search calls `reorder` (beam search), so a static step must apply it."""
    if static:
        return StaticStepDecoder(
            model,
            src_ids_BS,
            src_pad_mask_BS,
            rows_per_sentence=rows_per_sentence,
            capacity=capacity,
            reorders_rows=reorders_rows,
        )
    return IncrementalDecoder(
        model,
        src_ids_BS,
        src_pad_mask_BS,
        rows_per_sentence=rows_per_sentence,
        capacity=capacity,
        want_attention=want_attention,
    )


class StaticStepDecoder:
    """`IncrementalDecoder`'s interface over a fixed-shape step; rows can be reordered, never dropped."""

    can_drop_rows = False

    def __init__(
        self,
        model: Any,
        src_ids_BS: Tensor,
        src_pad_mask_BS: Tensor,
        *,
        rows_per_sentence: int,
        capacity: int,
        reorders_rows: bool,
    ) -> None:
        self.model = model
        self.reorders_rows = reorders_rows
        rows = src_ids_BS.shape[0] * rows_per_sentence
        self.cache = model.new_static_cache(batch_size=rows, capacity=capacity)
        self.cache.memory_kv = memory_for_rows(model, src_ids_BS, src_pad_mask_BS, rows_per_sentence)
        self.mask_RS = repeat_rows(src_pad_mask_BS, rows_per_sentence)  # always a mask: no data-dependent shapes
        self.tokens_R = torch.zeros(rows, dtype=torch.long, device=src_ids_BS.device)
        self.identity_R = torch.arange(rows, device=src_ids_BS.device)
        self.rows_R = self.identity_R.clone()  # the reorder the next step applies first
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_log_probs_RV: Tensor | None = None

    def step(self, tokens_R: Tensor) -> tuple[Tensor, None]:
        """fp32 log-probabilities of the next token (R, V); no attention maps. On CUDA the result is the
        graph's output buffer, valid until the next step."""
        self.tokens_R.copy_(tokens_R)
        if self.tokens_R.device.type != "cuda":
            log_probs_RV = self._forward()
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
            log_probs_RV = self.graph_log_probs_RV
        if self.reorders_rows:
            self.rows_R.copy_(self.identity_R)  # applied; the next step keeps the rows unless told otherwise
        return log_probs_RV, None

    def reorder(self, rows_R: Tensor) -> None:
        """Row r continues the history of row rows_R[r] (a row of the same sentence), from the next step."""
        if not self.reorders_rows:
            raise RuntimeError("this static step was built without reordering (reorders_rows=False)")
        self.rows_R.copy_(self.rows_R.index_select(0, rows_R))  # after a pending reorder p: row r takes p[rows_R[r]]

    def select(self, rows: Tensor) -> None:
        raise RuntimeError("a static decoding step keeps every row; finished rows stay in the batch")

    def _forward(self) -> Tensor:
        if self.reorders_rows:
            self.cache.reorder(self.rows_R, include_memory=False)
        logits_R1V = self.model.decode(self.tokens_R[:, None], memory=None, src_pad_mask=self.mask_RS, cache=self.cache)
        return torch.log_softmax(logits_R1V[:, -1].float(), dim=-1)

    def _capture(self) -> None:
        """Warm up on a side stream (library handles, workspaces), then record one step as a graph.

        The warm-up steps write keys and values at the current position and advance it; the position is
        put back afterwards, and the first replay overwrites what they wrote. They run without the pending
        reorder (identity rows), so that the first replay applies it exactly once."""
        position_1, rows_R = self.cache.position_1.clone(), self.rows_R.clone()
        self.rows_R.copy_(self.identity_R)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward()
                self.cache.position_1.copy_(position_1)
        torch.cuda.current_stream().wait_stream(side)
        self.rows_R.copy_(rows_R)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records the kernels without running them
            self.graph_log_probs_RV = self._forward()
