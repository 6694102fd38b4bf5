"""One optimizer update over one or more micro-batches, with no host synchronisation.

The gradient of k micro-batches equals that of one batch k times larger: each micro-batch's summed
loss is divided by the target tokens of *all* k (known on the host from collation), so the
accumulated gradient is the gradient of the per-token mean over the whole step. The summed loss,
NLL and token count stay on the device; the caller reads them when it logs.

With data parallelism (`objective` a DistributedDataParallel around a `TrainingObjective`) the divisor is
the target-token count of the *global* step, all-reduced on the device, and each process's loss is
multiplied by the number of processes, because DDP averages gradients: the update is then the one a
single process would make with every process's micro-batches. Gradients are synchronised only on
the last micro-batch (`no_sync` before).

Shape legend: B batch, S source length, T target length, D model dim, V vocabulary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from tformer.data.batching import Batch
from tformer.runtime import Distributed
from tformer.training.loss import chunked_label_smoothed_loss, label_smoothed_loss


@dataclass(frozen=True)
class StepResult:
    loss_sum: Tensor  # on the device, detached
    nll_sum: Tensor
    n_tgt_tokens: int  # host counts from collation
    n_src_tokens: int
    grad_norm: Tensor | None  # before clipping; only when clipping is on


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass (bf16 on CUDA); a no-op context for full precision."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class TrainingObjective(nn.Module):
    """The model and its loss as one module, so that DistributedDataParallel can wrap the whole forward
    (the loss may read the model's output projection outside `Transformer.forward`) while the model
    itself, and its state-dict keys, stay untouched."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, src_ids: Tensor, tgt_in: Tensor, tgt_out: Tensor, *, smoothing: float, pad_id: int, loss_chunk: int = 0
    ) -> tuple[Tensor, Tensor]:
        """(summed smoothed loss, summed NLL) over the target tokens, by teacher forcing: the decoder reads
        `tgt_in` (B T, [bos] + tokens) under the causal mask, and position t is scored against `tgt_out[:, t]`
        (B T, tokens + [eos]), every position in one pass; `src_ids` is B S. `loss_chunk` > 0 projects to
        the vocabulary that many positions at a time (see `chunked_label_smoothed_loss`)."""
        if loss_chunk > 0:
            hidden_BTD = self.model.decoder_states(src_ids, tgt_in)
            sums = chunked_label_smoothed_loss(
                hidden_BTD, self.model.project_output, tgt_out, smoothing=smoothing, pad_id=pad_id, chunk=loss_chunk
            )
        else:
            sums = label_smoothed_loss(self.model(src_ids, tgt_in), tgt_out, smoothing=smoothing, pad_id=pad_id)
        return sums.loss_sum, sums.nll_sum


def needs_pinning(batch: Batch, device: torch.device) -> bool:
    """True for a host batch bound for a GPU in pageable memory: pinned host memory makes the copy truly
    asynchronous, so the host can queue the next kernels. A batch already on a device is used as is."""
    return device.type == "cuda" and batch.src_ids.device.type == "cpu" and not batch.src_ids.is_pinned()


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[Batch],
    *,
    lr: float,
    smoothing: float,
    pad_id: int,
    clip_norm: float,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    loss_chunk: int = 0,
    objective: nn.Module | None = None,
    distributed: Distributed | None = None,
) -> StepResult:
    """Forward and backward every micro-batch, clip, and apply one update at learning rate `lr`.

    `objective` computes the summed loss and NLL of a batch: `TrainingObjective(model)` by default, or
    that module wrapped by DistributedDataParallel (with `distributed`) or compiled (`compile_objective`)."""
    assert micro_batches, "a step needs at least one micro-batch"
    total_tokens = sum(batch.n_tgt_tokens for batch in micro_batches)
    objective = TrainingObjective(model) if objective is None else objective
    uncompiled = getattr(objective, "_orig_mod", objective)  # what torch.compile wrapped, if it did
    data_parallel = isinstance(uncompiled, DistributedDataParallel)
    divisor: Tensor | float = total_tokens
    if data_parallel and distributed is not None and distributed.enabled:
        # filled on the device: torch.tensor(value, device=cuda) copies from the host and waits for the GPU
        global_tokens = distributed.all_reduce_sum(torch.full((), float(total_tokens), device=device))
        divisor = global_tokens / distributed.world_size  # DDP's average then divides by world_size
    # the loss's own dtype (label_smoothed_loss: float32 or wider), so that float64 sums are not rounded
    sum_dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)
    loss_sum = torch.zeros((), dtype=sum_dtype, device=device)
    nll_sum = torch.zeros((), dtype=sum_dtype, device=device)
    optimizer.zero_grad(set_to_none=True)
    for index, batch in enumerate(micro_batches):
        pinned = batch.pin_memory() if needs_pinning(batch, device) else batch
        on_device = pinned.to(device, non_blocking=True)
        last = index == len(micro_batches) - 1
        sync = uncompiled.no_sync() if data_parallel and not last else contextlib.nullcontext()
        with sync:
            # The loss runs under autocast too: it upcasts the logits to float32 itself, so nothing changes.
            with autocast_context(device, autocast_dtype):
                batch_loss, batch_nll = objective(
                    on_device.src_ids, on_device.tgt_in, on_device.tgt_out,
                    smoothing=smoothing, pad_id=pad_id, loss_chunk=loss_chunk,
                )  # fmt: skip
            (batch_loss / divisor).backward()  # the gradient of the loss per target token of the whole update
        loss_sum += batch_loss.detach()
        nll_sum += batch_nll.detach()
    grad_norm = None
    if clip_norm > 0:
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), clip_norm, foreach=True)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return StepResult(
        loss_sum=loss_sum,
        nll_sum=nll_sum,
        n_tgt_tokens=total_tokens,
        n_src_tokens=sum(batch.n_src_tokens for batch in micro_batches),
        grad_norm=grad_norm,
    )
