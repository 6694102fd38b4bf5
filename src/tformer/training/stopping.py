"""When a run stops: the first of train.max_steps, max_epochs, max_time_s and early stopping it meets.

With several processes every one must stop at the same step (one that stops alone leaves the others
waiting in a collective), so each criterion reads what all of them agree on: the step and the data
position are the same everywhere, the training time is rank 0's (one broadcast), and early stopping is
fed rank 0's validation (validator.py).
"""

from __future__ import annotations

import torch

from tformer.config import TrainConfig
from tformer.data.batching import BatchStream
from tformer.runtime import Distributed
from tformer.training.validation import EarlyStopping


class StoppingCriteria:
    def __init__(
        self,
        config: TrainConfig,
        early_stopping: EarlyStopping,
        *,
        stream: BatchStream,
        distributed: Distributed,
        device: torch.device,
    ) -> None:
        """`early_stopping` is the Trainer's, which its checkpoints keep; `stream` gives epoch lengths."""
        self.config, self.early_stopping, self.stream = config, early_stopping, stream
        self.distributed, self.device = distributed, device
        self._epoch_lengths: dict[int, int] = {}

    def reason(self, *, step: int, position: dict[str, int], elapsed_s: float) -> str | None:
        """Why the run stops after `step` (`position` the stream state after its last batch, `elapsed_s`
        the training time so far), or None to go on."""
        config = self.config
        if config.max_steps and step >= config.max_steps:
            return f"reached max_steps={config.max_steps}"
        if config.max_epochs and self._epochs_done(position) >= config.max_epochs:
            return f"reached max_epochs={config.max_epochs}"
        if config.max_time_s and self._elapsed_agreed(elapsed_s) >= config.max_time_s:
            return f"reached max_time_s={config.max_time_s:g}"
        if self.early_stopping.should_stop:
            return (
                f"early stopping: {config.stop_metric} did not improve for {config.patience} evaluations "
                f"(best {self.early_stopping.best:.4g} at step {self.early_stopping.best_step})"
            )
        return None

    def _elapsed_agreed(self, elapsed_s: float) -> float:
        """Training time as rank 0 measured it, so that every process stops at the same step."""
        return self.distributed.broadcast_float(elapsed_s, self.device)

    def _epochs_done(self, position: dict[str, int]) -> int:
        epoch, index = position["epoch"], position["index"]
        if epoch not in self._epoch_lengths:
            self._epoch_lengths = {epoch: len(self.stream.plan(epoch))}
        return epoch + (1 if index >= self._epoch_lengths[epoch] else 0)
