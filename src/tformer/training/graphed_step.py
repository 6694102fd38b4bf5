"""A whole training step (forward, loss, backward, clipping, AdamW) recorded once as a CUDA graph.

An eager `base` training step issues about 1,800 operations from Python; at batch 128 x 64 x 64 on an
H200 the host takes longer to launch them than the GPU takes to run them. A CUDA graph records the
kernels of one step and replays them all with one launch, so the GPU sets the pace. For that, every
step must read and write the same addresses:

- the batch is copied into fixed input buffers, so all batches of a `GraphedTrainStep` share one shape
  (B x S source, B x T target);
- the learning rate and the loss divisor (the batch's target tokens) are device tensors filled before
  each replay; AdamW runs fused with `capturable=True` (its step counters live on the device);
- gradients are never freed: the first recorded backward allocates them in the graph's memory, and
  every replay overwrites them;
- autocast's weight cache is off (a graph cannot keep a cache that outlives one step).

The first `WARMUP_STEPS` calls run eagerly on a side stream (the libraries set up workspaces and AdamW
its state); they are real training steps on the batches they are given. The next call records the
graph and then replays it, so every call is exactly one update. Dropout draws from the CUDA generator,
which graphs support: each replay gets fresh masks. On the CPU every call runs the same function
eagerly (what tests compare with `train_step`).

Shape legend: B batch, S source length, T target length.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from tformer.data.batching import Batch
from tformer.training.step import StepResult, TrainingObjective

WARMUP_STEPS = 3


def capturable_adamw(optimizer: torch.optim.AdamW, device: torch.device) -> torch.optim.AdamW:
    """Make a fresh AdamW capturable: step counters on the device and the learning rate a device tensor
    (as `torch.optim.AdamW(..., capturable=True, lr=tensor)` would be)."""
    if optimizer.state:
        raise ValueError("make the optimizer capturable before its first step")
    for group in optimizer.param_groups:
        if device.type == "cuda":
            group["capturable"] = True
        group["lr"] = torch.tensor(float(group["lr"]), dtype=group["params"][0].dtype, device=device)
    return optimizer


class GraphedTrainStep:
    """`train_step` for single batches of one fixed shape, replayed as a CUDA graph on a GPU."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.AdamW,
        *,
        batch_shape: tuple[int, int, int],
        smoothing: float,
        pad_id: int,
        clip_norm: float,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
    ) -> None:
        B, S, T = batch_shape
        self.model = model
        self.objective = TrainingObjective(model)
        self.optimizer = capturable_adamw(optimizer, device)
        self.smoothing, self.pad_id, self.clip_norm = smoothing, pad_id, clip_norm
        self.device, self.autocast_dtype = device, autocast_dtype
        self.src_BS = torch.zeros((B, S), dtype=torch.long, device=device)
        self.tgt_in_BT = torch.zeros((B, T), dtype=torch.long, device=device)
        self.tgt_out_BT = torch.zeros((B, T), dtype=torch.long, device=device)
        self.divisor = torch.ones((), device=device)
        self.loss_sum = torch.zeros((), device=device)
        self.nll_sum = torch.zeros((), device=device)
        self.grad_norm = torch.zeros((), dtype=next(model.parameters()).dtype, device=device)
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.side_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __call__(self, batch: Batch, *, lr: float) -> StepResult:
        """One update on `batch` (of the fixed shape) at learning rate `lr`. The result's loss tensors are
        this object's buffers: read (or copy) them before the next call overwrites them."""
        if (batch.src_ids.shape, batch.tgt_in.shape) != (self.src_BS.shape, self.tgt_in_BT.shape):
            raise ValueError(
                f"this graphed step takes batches of source {tuple(self.src_BS.shape)} and target "
                f"{tuple(self.tgt_in_BT.shape)}; got {tuple(batch.src_ids.shape)} and {tuple(batch.tgt_in.shape)}"
            )
        for target, source in (
            (self.src_BS, batch.src_ids),
            (self.tgt_in_BT, batch.tgt_in),
            (self.tgt_out_BT, batch.tgt_out),
        ):
            target.copy_(source, non_blocking=True)
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
                with torch.cuda.graph(self.graph):  # records; the replay below runs it
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
