"""A decoding step of fixed shape, replayed as a CUDA graph on a GPU (`DecodeConfig.static_step`).

An eager decoding step launches a few hundred small kernels, one per operation of every layer; at the
batch sizes of translation on a GPU, launching them from Python costs more time than the arithmetic.
A CUDA graph records the kernels of one step once and replays all of them with a single launch. For
that, every tensor the step reads or writes must keep its address and shape from one step to the next:

- the cache is a `StaticDecoderCache` (full capacity, the position of the next token held on the
  device and advanced by the step itself, a mask over the positions not yet written), or for beam search
  a `StaticBeamDecoderCache` (the same, with each beam's keys in its own slot and an ancestry table);
- the step reads its tokens from one fixed buffer and writes its log-probabilities into another;
- sentences never leave the batch (a finished row keeps computing; the search ignores its output),
  and beam search gives every beam its own row from the first step on;
- beam search's reordering of the cache is part of the step: `reorder` only records which rows to
  take (composing with any reorder still pending), and the next step applies it to the ancestry table
  before decoding (keys and values never move).

Capturing a graph costs a few eager steps, so the buffers and the graph of a shape (rows, source length,
cache capacity) are kept with the model (`CapturedStep`, the last few shapes) and reused by the next
batch of that shape: a batch copies its memory keys/values and source mask into the buffers, puts the
position back to 0 and replays the same graph. (Shapes are not rounded up to share graphs: padding the
source would be extra masked keys in every cross-attention, more work for every step of every batch.) The
step gives the default step's tokens, and its scores to float rounding (it attends over the whole capacity
where the default step attends over the positions so far: tests/test_static_step.py).

Beam search goes further when its constraints do not depend on the history (no n-gram ban, no forced
prefix): its whole step (this decoding step, the constraints, the choice of beams, the finished lists,
the next tokens) is one function of fixed buffers, recorded as one graph (decoding/beam.py,
`_search_in_whole_steps`), so a step costs one launch instead of one per tensor operation.

On the CPU the same fixed-shape step runs without a graph, so nothing holds its shape still: each step reads
only the cache positions written so far (model/cache.py, `StepWindow`), as the default step does, where a GPU
step reads the whole capacity. Compiled (`compile_step`), it multiplies with the oneDNN-packed weights as the
default step does (model/packed.py: `tformer::packed_linear`) and issues far fewer operators: on the CPU the
fastest way to decode (docs/performance.md, session 22). Attention maps (`return_attention`, the coverage
penalty) and ensembles use the default step.

Shape legend: B sentences, R rows (sentences x rows per sentence), M memory entries (one per sentence),
S source length, V vocabulary.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from tformer.config import DecodeConfig
from tformer.decoding.graphed import GraphedFunction
from tformer.decoding.incremental import IncrementalDecoder, encoded_memory

SHAPES_KEPT = 4  # captured steps kept per model (least recently used dropped first)


def compiled_step(function: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """`function` compiled by torch.compile (`compile_step`). On a GPU with the sizes of its shape (each shape
    is recorded as a CUDA graph of its own in any case). On the CPU with torch's automatic dynamic shapes: the
    first step compiles with its sizes, the second once more with the number of positions it reads as a
    symbol (StepWindow), the second batch shape with its sizes as symbols, and that serves every later shape
    with those sizes above 1 (torch never makes a size of 1 a symbol: batches of one sentence, or of one-token
    sources, compile apart, once each); with fixed sizes every new shape compiled again (~8 s for `small`)
    until torch's recompile limit (8), after which batches ran uncompiled."""
    return torch.compile(function, dynamic=False if device.type == "cuda" else None)


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
    beams: int = 1,
    compile_step: bool = False,
) -> IncrementalDecoder | StaticStepDecoder:
    """The decoder a search drives: the static step when `static`, else the default incremental one.
    `reorders_rows`: the search calls `reorder` (beam search), so a static step must apply it, and the
    rows of a sentence stay together, so they share one memory entry (the static step always shares:
    its rows never leave) and the default step keeps `beams` slots per sentence in a beam cache;
    `compile_step`: the static step is compiled (torch.compile) before it runs or is recorded."""
    if static:
        return StaticStepDecoder(
            model,
            src_ids_BS,
            src_pad_mask_BS,
            rows_per_sentence=rows_per_sentence,
            capacity=capacity,
            reorders_rows=reorders_rows,
            compile_step=compile_step,
        )
    return IncrementalDecoder(
        model,
        src_ids_BS,
        src_pad_mask_BS,
        rows_per_sentence=rows_per_sentence,
        capacity=capacity,
        want_attention=want_attention,
        shared_memory=reorders_rows,
        beam_slots=beams if reorders_rows else 0,
    )


class CapturedStep:
    """The fixed buffers of one step shape and, on CUDA, the graph that replays a step over them.

    It holds no reference to the model (it is kept in a weak dictionary keyed by the model); the graph
    reads the model's parameters at their addresses, so in-place weight updates are seen, new tensors
    are not (the key holds the parameters' address and dtype)."""

    def __init__(
        self, model: Any, *, rows: int, capacity: int, memory_kv: Any, mask_MS: Tensor, reorders_rows: bool
    ) -> None:
        """`reorders_rows`: beam search's cache, rows sentences x beams (one memory entry per sentence)."""
        device = model.tgt_embedding.weight.device
        self.capacity = capacity  # the positions a search may fill
        # On the CPU one spare position: the window a step reads (the positions written so far, StepWindow)
        # then never spans the whole buffer, and torch.compile sees the same kind of slice at every step (a
        # window as long as its buffer would be a contiguous tensor, a compilation of its own).
        buffer_positions = capacity + (device.type != "cuda")
        if reorders_rows:
            sentences = mask_MS.shape[0]
            self.cache = model.new_static_beam_cache(
                sentences=sentences, beams=rows // sentences, capacity=buffer_positions
            )
        else:
            self.cache = model.new_static_cache(batch_size=rows, capacity=buffer_positions)
        self.cache.memory_kv = [tuple(torch.zeros_like(item) for item in layer) for layer in memory_kv]
        self.mask_MS = torch.zeros_like(mask_MS)  # one memory entry per sentence, shared by its rows
        self.tokens_R = torch.zeros(rows, dtype=torch.long, device=device)
        self.identity_R = torch.arange(rows, device=device)
        self.rows_R = self.identity_R.clone()  # the reorder the next step applies first
        self.graph: GraphedFunction | None = None  # the decoding step alone (CUDA)
        self.searches: dict[tuple, Any] = {}  # whole search steps over these buffers (decoding/beam.py)

    def mutable(self) -> list[Tensor]:
        """What a step writes: the pending reorder and the cache (its position, keys and values, ancestry)."""
        return [self.rows_R, *self.cache.buffers()]

    def load(self, memory_kv: Any, mask_MS: Tensor) -> None:
        """Start a new batch: its memory and mask into the buffers, the position back to 0, no pending
        reorder. The cache keeps the last batch's keys and values: the mask hides them until overwritten."""
        for (k_buffer, v_buffer), (k, v) in zip(self.cache.memory_kv, memory_kv, strict=True):
            k_buffer.copy_(k)
            v_buffer.copy_(v)
        self.mask_MS.copy_(mask_MS)
        self.cache.position_1.zero_()
        self.rows_R.copy_(self.identity_R)


_CAPTURED: weakref.WeakKeyDictionary[Any, OrderedDict[tuple, CapturedStep]] = weakref.WeakKeyDictionary()


def captured_step(
    model: Any,
    *,
    rows: int,
    capacity: int,
    memory_kv: Any,
    mask_MS: Tensor,
    reorders_rows: bool,
    compile_step: bool = False,
) -> CapturedStep:
    """The model's CapturedStep of this shape, cache kind and `compile_step`, made if new (its CUDA graphs
    record the step compiled or not, so the two settings never share one)."""
    capacity = min(capacity, model.config.max_positions)
    reference = model.tgt_embedding.weight
    key = (rows, *mask_MS.shape, capacity, reference.device, reference.dtype, reference.data_ptr())
    key += (reorders_rows, compile_step)
    steps = _CAPTURED.setdefault(model, OrderedDict())
    if key in steps:
        steps.move_to_end(key)
    else:
        while len(steps) >= SHAPES_KEPT:
            steps.popitem(last=False)
        steps[key] = CapturedStep(
            model, rows=rows, capacity=capacity, memory_kv=memory_kv, mask_MS=mask_MS, reorders_rows=reorders_rows
        )
    return steps[key]


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
        compile_step: bool = False,
    ) -> None:
        self.model = model
        self.reorders_rows = reorders_rows
        self.compile_step = compile_step
        self._step_function: Callable[[], Tensor] | None = None  # made by _runnable_step when first needed
        memory_kv = encoded_memory(model, src_ids_BS, src_pad_mask_BS)
        self.step_buffers = captured_step(
            model,
            rows=src_ids_BS.shape[0] * rows_per_sentence,
            capacity=capacity,
            memory_kv=memory_kv,
            mask_MS=src_pad_mask_BS,
            reorders_rows=reorders_rows,
            compile_step=compile_step,
        )
        self.step_buffers.load(memory_kv, src_pad_mask_BS)
        self.cache = self.step_buffers.cache
        self.steps = 0  # the steps taken: the cache's position, counted on the host

    def check_room(self, steps: int) -> None:
        """Refuse, before it runs, a step past the cache's capacity, as the other caches do. The cache
        cannot: its position is on the device, and reading it would be a host synchronisation in the step
        a CUDA graph records (past the end, index_copy_ is a bare IndexError on the CPU and a device-side
        assert, fatal to the process's CUDA context, on a GPU)."""
        if steps > self.step_buffers.capacity:
            raise ValueError(f"decoder cache holds {self.step_buffers.capacity} positions; asked for {steps}")

    def step(self, tokens_R: Tensor) -> tuple[Tensor, None]:
        """fp32 log-probabilities of the next token (R, V); no attention maps. On CUDA the result is the
        graph's output buffer, valid until the next step."""
        self.check_room(self.steps + 1)
        self.steps += 1
        buffers = self.step_buffers
        buffers.tokens_R.copy_(tokens_R)
        if buffers.tokens_R.device.type != "cuda":
            self.cache.show(self.steps)  # no graph to keep one shape: read only the positions written
            return self._runnable_step()(), None
        if buffers.graph is None:
            device = buffers.tokens_R.device
            buffers.graph = GraphedFunction(self._runnable_step(), mutable=buffers.mutable(), device=device)
        return buffers.graph.replay(), None

    def _runnable_step(self) -> Callable[[], Tensor]:
        """`step_in_place`, compiled with `compile_step` (residual adds, layer norms and the like fused into
        fewer kernels). Made only when it will run: wrapping a function in torch.compile costs ~20 ms, and a
        batch whose shape already has a graph only replays it."""
        if self._step_function is None:
            step = self.step_in_place
            device = self.step_buffers.tokens_R.device
            self._step_function = compiled_step(step, device) if self.compile_step else step
        return self._step_function

    def step_in_place(self) -> Tensor:
        """The step on the tokens already in the input buffer, run eagerly (what a graph records): apply
        the pending reorder (the identity when there is none) to a beam search's cache, decode (which
        advances the position)."""
        buffers = self.step_buffers
        if self.reorders_rows:
            buffers.cache.reorder(buffers.rows_R)
            buffers.rows_R.copy_(buffers.identity_R)  # applied; the next step keeps the rows unless told otherwise
        logits_R1V = self.model.decode(
            buffers.tokens_R[:, None], memory=None, src_pad_mask=buffers.mask_MS, cache=buffers.cache
        )
        return torch.log_softmax(logits_R1V[:, -1].float(), dim=-1)

    def reorder(self, rows_R: Tensor) -> None:
        """Row r continues the history of row rows_R[r] (a row of the same sentence), from the next step."""
        if not self.reorders_rows:
            raise RuntimeError("this static step was built without reordering (reorders_rows=False)")
        rows = self.step_buffers.rows_R
        rows.copy_(rows.index_select(0, rows_R))  # after a pending reorder p: row r takes p[rows_R[r]]

    def select(self, rows: Tensor) -> None:
        raise RuntimeError("a static decoding step keeps every row; finished rows stay in the batch")
