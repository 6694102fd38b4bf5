"""A whole training step (forward, loss, backward, clipping, AdamW) recorded once as a CUDA graph.

An eager `base` training step issues about 1,800 operations from Python; at batch 128 x 64 x 64 on an
H200 the host takes longer to launch them than the GPU takes to run them. A CUDA graph records the
kernels of one step and replays them all with one launch, so the GPU sets the pace. For that, every
step must read and write the same addresses:

- the batch is copied into fixed input buffers of one shape (B sentences, S source and T target
  positions); a smaller batch is padded into them on the device: pad tokens after each sentence, and
  rows of nothing (source eos, target bos, no target token to predict) after the last sentence. Padding
  changes no loss or gradient: padded keys are masked, padded targets are not counted, and the loss is
  divided by the batch's own target tokens (dropout draws other masks for other shapes, of course);
- the learning rate and the loss divisor are device tensors filled before each replay; AdamW runs fused
  with `capturable=True` (its step counters live on the device);
- gradients are never freed: the recorded backward allocates them in the graph's memory, and every
  replay overwrites them;
- autocast's weight cache is off (a graph cannot keep a cache that outlives one step).

The first `WARMUP_STEPS` calls run eagerly on a side stream (the libraries set up workspaces and AdamW
its state); they are real training steps on the batches they are given. The next call records the
graph and then replays it, so every call is exactly one update. On the CPU every call runs the same
function eagerly (what tests compare with `train_step`).

`GraphedSteps` serves batches of any shape (the Trainer's `train.cuda_graphs`): it rounds each batch's
shape up (lengths to a multiple of LENGTH_MULTIPLE, sentences to a multiple of ROW_MULTIPLE) and keeps
one GraphedTrainStep per rounded shape, all recorded into one shared memory pool (they never run at the
same time, and nothing a graph leaves in the pool is read by another).

Shape legend: B batch, S source length, T target length.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from tformer.data.batching import Batch
from tformer.runtime import recording
from tformer.training.step import StepResult, TrainingObjective

WARMUP_STEPS = 3
LENGTH_MULTIPLE = 8  # source and target lengths are rounded up to this for GraphedSteps
ROW_MULTIPLE = 32  # and the number of sentences to this


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> torch.optim.Optimizer:
    """Let AdamW run inside a CUDA graph: the learning rate a device tensor (filled before each step) and,
    on a GPU, `capturable=True` with its step counters on the device. Works before the first step and
    after a checkpoint's state was loaded; a second call changes nothing.

    A graphed run's checkpoint holds the learning rate as a tensor, which loading puts on the CPU: it is
    moved to the device, since the fused kernel reads a host learning rate once, when the step is recorded,
    and every replay would then keep that one value."""
    for group in optimizer.param_groups:
        if not isinstance(group["lr"], Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=group["params"][0].dtype, device=device)
        elif group["lr"].device != device:
            group["lr"] = group["lr"].to(device)
        if device.type == "cuda":
            group["capturable"] = True
    if device.type == "cuda":
        for state in optimizer.state.values():
            if "step" in state and state["step"].device != device:
                state["step"] = state["step"].to(device=device, dtype=torch.float32)
    return optimizer


class GraphedTrainStep:
    """`train_step` for single batches that fit one fixed shape, replayed as a CUDA graph on a GPU."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        batch_shape: tuple[int, int, int],
        smoothing: float,
        special_ids: tuple[int, int, int],
        clip_norm: float,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        pool: tuple | None = None,
        objective: nn.Module | None = None,
    ) -> None:
        """`special_ids` = (pad, bos, eos); `pool` a memory pool (torch.cuda.graph_pool_handle()) to record
        into, shared with other GraphedTrainSteps that never run at the same time; `objective` computes
        the summed loss and NLL of a batch: `TrainingObjective(model)` by default, or that module compiled
        whole (`runtime.compile_objective(..., inside_cuda_graph=True)`), whose kernels the graph records."""
        B, S, T = batch_shape
        self.model = model
        self.objective = TrainingObjective(model) if objective is None else objective
        self.optimizer = make_capturable(optimizer, device)
        self.smoothing, self.clip_norm = smoothing, clip_norm
        self.pad_id, self.bos_id, self.eos_id = special_ids
        self.device, self.autocast_dtype, self.pool = device, autocast_dtype, pool
        self.src_BS = torch.full((B, S), self.pad_id, dtype=torch.long, device=device)
        self.tgt_in_BT = torch.full((B, T), self.pad_id, dtype=torch.long, device=device)
        self.tgt_out_BT = torch.full((B, T), self.pad_id, dtype=torch.long, device=device)
        self.divisor = torch.ones((), device=device)
        sum_dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)  # as train_step's sums
        self.loss_sum = torch.zeros((), dtype=sum_dtype, device=device)
        self.nll_sum = torch.zeros((), dtype=sum_dtype, device=device)
        self.grad_norm = torch.zeros((), dtype=next(model.parameters()).dtype, device=device)
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.side_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def fits(self, batch: Batch) -> bool:
        (B, S), T = batch.src_ids.shape, batch.tgt_in.shape[1]
        return self.src_BS.shape[0] >= B and self.src_BS.shape[1] >= S and self.tgt_in_BT.shape[1] >= T

    def __call__(self, batch: Batch, *, lr: float) -> StepResult:
        """One update on `batch` (padded to the fixed shape) at learning rate `lr`. The result's loss
        tensors are this object's buffers: read (or copy) them before the next call overwrites them."""
        if not self.fits(batch):
            raise ValueError(
                f"this graphed step takes batches of at most source {tuple(self.src_BS.shape)} and target "
                f"{tuple(self.tgt_in_BT.shape)}; got {tuple(batch.src_ids.shape)} and {tuple(batch.tgt_in.shape)}"
            )
        self._load(batch)
        self.divisor.fill_(float(batch.n_tgt_tokens))
        for group in self.optimizer.param_groups:
            group["lr"].fill_(lr)
        if self.side_stream is None:
            self._update()
        elif self.calls < WARMUP_STEPS:
            self.side_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.side_stream):
                self._update()
            torch.cuda.current_stream(self.device).wait_stream(self.side_stream)
        else:
            if self.graph is None:
                self.optimizer.zero_grad(set_to_none=True)  # the graph allocates the gradients it keeps
                self.graph = torch.cuda.CUDAGraph()
                with recording(self.graph, self.device, pool=self.pool):  # records; the replay below runs it
                    self._forward_backward_update()
            self.graph.replay()
        self.calls += 1
        return StepResult(
            loss_sum=self.loss_sum,
            nll_sum=self.nll_sum,
            n_tgt_tokens=batch.n_tgt_tokens,
            n_src_tokens=batch.n_src_tokens,
            grad_norm=self.grad_norm if self.clip_norm > 0 else None,
        )

    def _load(self, batch: Batch) -> None:
        """The batch into the input buffers, on the device (no host synchronisation): each sentence
        followed by pad tokens, then rows of nothing (source eos, target bos, nothing to predict: no attention
        row is then fully masked, which some kernels answer with NaN)."""
        (B, S), T = batch.src_ids.shape, batch.tgt_in.shape[1]
        on_device = batch.to(self.device, non_blocking=True)
        for buffer, values, width in (
            (self.src_BS, on_device.src_ids, S),
            (self.tgt_in_BT, on_device.tgt_in, T),
            (self.tgt_out_BT, on_device.tgt_out, T),
        ):
            if values.shape != buffer.shape:
                buffer.fill_(self.pad_id)
            buffer[:B, :width].copy_(values)
        if self.src_BS.shape[0] > B:
            self.src_BS[B:, 0] = self.eos_id
            self.tgt_in_BT[B:, 0] = self.bos_id

    def _update(self) -> None:
        """An eager step: gradients freed first, as `train_step` does."""
        self.optimizer.zero_grad(set_to_none=True)
        self._forward_backward_update()

    def _forward_backward_update(self) -> None:
        autocast = (
            contextlib.nullcontext()
            if self.autocast_dtype is None
            else torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False)
        )
        with autocast:
            loss_sum, nll_sum = self.objective(
                self.src_BS, self.tgt_in_BT, self.tgt_out_BT, smoothing=self.smoothing, pad_id=self.pad_id
            )
        (loss_sum / self.divisor).backward()
        if self.clip_norm > 0:
            self.grad_norm.copy_(nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm, foreach=True))
        self.optimizer.step()
        self.loss_sum.copy_(loss_sum.detach())
        self.nll_sum.copy_(nll_sum.detach())


def rounded_shape(batch: Batch) -> tuple[int, int, int]:
    """The batch's (B, S, T), rounded up to ROW_MULTIPLE sentences and LENGTH_MULTIPLE positions."""
    (B, S), T = batch.src_ids.shape, batch.tgt_in.shape[1]

    def up(value: int, multiple: int) -> int:
        return -(-value // multiple) * multiple

    return up(B, ROW_MULTIPLE), up(S, LENGTH_MULTIPLE), up(T, LENGTH_MULTIPLE)


class GraphedSteps:
    """Graphed training steps for batches of any shape: one GraphedTrainStep per rounded shape."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        smoothing: float,
        special_ids: tuple[int, int, int],
        clip_norm: float,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        objective: nn.Module | None = None,
    ) -> None:
        """`objective` as GraphedTrainStep's, one for every shape (a compiled one compiles again, that
        dimension dynamic, the first time B, S or T changes: a few times, not once per shape)."""
        self.model, self.optimizer = model, optimizer  # each GraphedTrainStep makes it capturable
        self.options = dict(
            smoothing=smoothing, special_ids=special_ids, clip_norm=clip_norm, device=device,
            autocast_dtype=autocast_dtype, objective=objective,
        )  # fmt: skip
        self.pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        self.steps: dict[tuple[int, int, int], GraphedTrainStep] = {}

    def __call__(self, batch: Batch, *, lr: float) -> StepResult:
        shape = rounded_shape(batch)
        if shape not in self.steps:
            self.steps[shape] = GraphedTrainStep(
                self.model, self.optimizer, batch_shape=shape, pool=self.pool, **self.options
            )
        return self.steps[shape](batch, lr=lr)
