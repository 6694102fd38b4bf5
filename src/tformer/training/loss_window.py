"""The logging window: the training losses of the steps since the last log row, and their tokens/s.

The hot path never waits for the device: each step's loss sums stay on the device in a list, and
`read_pending` fetches them all in one transfer (summed over every process), only where the Trainer
must know them: at logging steps, before validation and before every checkpoint. It is also where a
non-finite loss is caught, so a checkpoint is never written from a diverged model and the error names
the first bad step.

The window's sums are part of the trainer state: a checkpoint taken between two log rows keeps them,
so the first row after a resume averages the same steps as the uninterrupted run's. tokens/s counts
only what this process timed: the tokens read since its clock started (when training started, or at
the last row) over the time since, less the time spent validating.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from tformer.runtime import Distributed

# one step's (step, loss sum, NLL sum, target tokens, gradient norm or None), tensors still on the device
PendingStep = tuple[int, Tensor, Tensor, int, Tensor | None]


class LossWindow:
    def __init__(self, state: dict[str, Any] | None = None) -> None:
        """An empty window, or the window a checkpoint stored (`state_dict`)."""
        self.load_state_dict(state)
        self.pending: list[PendingStep] = []
        self.started = 0.0  # when the clock of tokens/s started (time.monotonic)
        # tokens trained since `started` by this process: a resumed window also holds steps trained
        # before the interruption, whose time this process never measured
        self.tokens_timed = 0

    def add(self, step: int, loss_sum: Tensor, nll_sum: Tensor, n_tokens: int, grad_norm: Tensor | None) -> None:
        self.pending.append((step, loss_sum, nll_sum, n_tokens, grad_norm))

    def read_pending(self, distributed: Distributed, device: torch.device) -> int | None:
        """Read the pending step losses from the device in one go (every process's sums) into the window;
        the first step whose loss is not finite, if one is (its losses are then not added), else None."""
        if not self.pending:
            return None
        steps = [entry[0] for entry in self.pending]
        tokens = torch.tensor([float(entry[3]) for entry in self.pending], dtype=torch.float64)
        sums = torch.stack(
            [
                torch.stack([entry[1] for entry in self.pending]).double(),
                torch.stack([entry[2] for entry in self.pending]).double(),
                tokens.to(device),
            ]
        )
        losses, nlls, counts = distributed.all_reduce_sum(sums).tolist()
        norms = [entry[4] for entry in self.pending if entry[4] is not None]
        for step, loss in zip(steps, losses, strict=True):
            if not np.isfinite(loss):
                return step
        self.loss += sum(losses)
        self.nll += sum(nlls)
        self.tokens += int(sum(counts))
        self.tokens_timed += int(sum(counts))
        if norms:
            self.grad_norm = float(norms[-1])
        self.pending.clear()
        return None

    def row(self, step: int, log_every: int, *, now: float) -> dict[str, float]:
        """At a logging step, the window's averages and tokens/s (and the window starts afresh at `now`);
        {} at other steps, or when the window is empty. Call `read_pending` first."""
        if step % log_every != 0 or self.tokens == 0:
            return {}
        row = {
            "train_loss": self.loss / self.tokens,
            "train_nll": self.nll / self.tokens,
            "tokens_per_s": self.tokens_timed / max(now - self.started, 1e-9),
        }
        if self.grad_norm is not None:
            row["grad_norm"] = self.grad_norm
        self.load_state_dict(None)
        self.started, self.tokens_timed = now, 0
        return row

    def pause(self, seconds: float) -> None:
        """Leave `seconds` (spent validating) out of tokens/s, which counts training time only."""
        self.started += seconds

    def unlogged_loss(self, step: int, log_every: int) -> str:
        """The training loss of the steps since the last log row, which a run that stops between rows would
        otherwise never show (a run shorter than train.log_every showed none at all); '' when there are
        none. It is printed only: metrics.jsonl keeps one row every log_every steps, so that a resumed run's
        rows are those of the uninterrupted run."""
        if self.tokens == 0:
            return ""
        first = step - step % log_every + 1
        steps = f"step {first}" if first == step else f"steps {first}-{step}"
        return f" (loss {self.loss / self.tokens:.3f} over {steps}, which no log row covers)"

    def state_dict(self) -> dict[str, Any]:
        """The sums of the steps since the last logged row (not the pending ones: save reads those first)."""
        return {"loss": self.loss, "nll": self.nll, "tokens": self.tokens, "grad_norm": self.grad_norm}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """The sums as a checkpoint stored them; None (or a checkpoint older than the window) empties it."""
        if state is None:
            self.loss, self.nll, self.tokens, self.grad_norm = 0.0, 0.0, 0, None
            return
        grad_norm = state["grad_norm"]
        self.loss, self.nll, self.tokens = float(state["loss"]), float(state["nll"]), int(state["tokens"])
        self.grad_norm = None if grad_norm is None else float(grad_norm)
