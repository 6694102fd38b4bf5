"""The part of the Trainer that a checkpoint holds and a resume restores.

`Trainer` (loop.py) inherits these methods: `state_dict` is the trainer state a checkpoint keeps
(optimizer, step, data position, early stopping, the logging window, RNG states), `load_state_dict` and
`restore` continue a run from it, and the lines they print say what a resume changed (another number of
processes, another stop metric). The data position is stored as a global batch index within the epoch
(`stream_state`), so a run may be resumed with a different number of processes.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tformer.runtime import Distributed
from tformer.training import checkpoint as ckpt
from tformer.training import checkpoint_load
from tformer.training.loss_window import LossWindow
from tformer.training.metrics_log import MetricsLog
from tformer.training.progress import shown
from tformer.training.rng_state import load_rng_state, rng_state
from tformer.training.saving import mend_best_pointer, remove_later_checkpoints
from tformer.training.validation import EarlyStopping, metric_settings

if TYPE_CHECKING:
    from tformer.config import TrainConfig
    from tformer.model import Transformer
    from tformer.training.loop import TrainingData


class TrainerState:
    """The trainer state's methods, for `Trainer`, which sets these attributes in its __init__."""

    model: Transformer
    optimizer: torch.optim.Optimizer
    data: TrainingData
    run_dir: Path
    train_config: TrainConfig
    distributed: Distributed
    quiet: bool
    early_stopping: EarlyStopping
    metrics: MetricsLog
    window: LossWindow
    step: int
    elapsed_s: float
    _position: dict[str, int]  # the stream state after the last batch trained on
    _last_saved_step: int

    def state_dict(self) -> dict[str, Any]:
        return {
            "format_version": ckpt.FORMAT_VERSION,
            "step": self.step,
            "elapsed_s": self.elapsed_s,
            "optimizer": self.optimizer.state_dict(),
            "stream": self.stream_state(),
            "effective_batch": self.batch_shape(),  # a resume with other numbers says so
            "threads": self._cpu_threads(),  # a CPU resume with another count says so (sums round otherwise)
            "early_stopping": self.early_stopping.state_dict(),
            "log_window": self.window.state_dict(),  # steps since the last logged row, averaged into the next one
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.elapsed_s = int(state["step"]), float(state["elapsed_s"])
        if self.step < 0:
            raise ValueError(f"step {self.step}")
        settings = [
            {key: value for key, value in group.items() if key not in ("params", "lr")}
            for group in self.optimizer.param_groups
        ]
        self.optimizer.load_state_dict(state["optimizer"])
        # the file gives the moments, step counts and learning rate; the settings (betas, eps, weight decay,
        # flags) stay this run's, which a resume may change (torch's loader would put back the saved ones)
        for group, own in zip(self.optimizer.param_groups, settings, strict=True):
            group.update(own)
        self._check_optimizer_state()
        self.load_stream_state(state["stream"])
        changed = effective_batch_change(state.get("effective_batch"), self.batch_shape())  # absent: older checkpoints
        if changed:
            self._say(changed)
        changed = thread_count_change(state.get("threads"), self._cpu_threads())  # absent: older checkpoints
        if changed:
            self._say(changed)
        restarted = self.early_stopping.load_state_dict(state["early_stopping"])
        if restarted is not None:
            self._say(restarted)
        self.window.load_state_dict(state.get("log_window"))  # absent in older checkpoints: an empty window
        load_rng_state(state["rng"])
        if self.distributed.rank > 0:  # the checkpoint holds rank 0's generators; others must differ
            torch.manual_seed(hash((self.train_config.seed, self.distributed.rank, self.step)) % 2**63)
        self._last_saved_step = self.step

    def _check_optimizer_state(self) -> None:
        """Refuse Adam moments that do not fit the parameters they belong to (a damaged or crafted trainer state):
        the fused kernel read past them, and the process died at the first step (a segmentation fault)."""
        for group in self.optimizer.param_groups:
            moments = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq")
            for parameter in group["params"]:
                values = self.optimizer.state.get(parameter)
                if not values:  # never stepped (frozen, say): Adam starts it afresh
                    continue
                shapes = {key: list(getattr(value, "shape", [None])) for key, value in values.items()}
                expected = {"step": [], **{key: list(parameter.shape) for key in moments}}
                if shapes != expected:
                    raise ValueError(f"optimizer state {shapes} for a parameter of shape {list(parameter.shape)}")

    def stream_state(self) -> dict[str, int]:
        """The data position as {"epoch", "index"}: `index` counts the *global* batches of the epoch's
        plan already trained on (over all processes), which means the same for any number of processes."""
        return {"epoch": self._position["epoch"], "index": self._position["index"] * self.distributed.world_size}

    def load_stream_state(self, state: dict[str, int]) -> None:
        """Continue at global batch `index` of the epoch. Rank r of W reads global batches r, r + W, ...;
        when W does not divide `index` (the process count changed), the next multiple of W is used, so
        up to W - 1 batches of that epoch are skipped (none where the epoch has no more) and none is read twice."""
        world_size = self.distributed.world_size
        epoch, index = int(state["epoch"]), int(state["index"])
        local = {"epoch": epoch, "index": math.ceil(index / world_size)}
        skipped = local["index"] * world_size - index
        if skipped:
            skipped = max(0, min(skipped, self.data.stream.global_batches(epoch) - index))
        if skipped:
            self._say(
                f"resume: {world_size} processes continue epoch {epoch} at global batch {local['index'] * world_size} "
                f"(a multiple of {world_size}), skipping {skipped} batch(es) after the {index} trained "
                "(none is read twice)"
            )
        self.data.stream.load_state_dict(local)
        self._position = self.data.stream.state_dict()

    def restore(self, checkpoint_dir: Path) -> None:
        """Continue from a checkpoint of this run: weights, optimizer, data position, RNG, metrics log (the
        rows and the step checkpoints after it are removed: saving.remove_later_checkpoints)."""
        checkpoint_load.load_weights(self.model, checkpoint_dir)
        try:
            self.load_state_dict(
                _stopping_state_named(checkpoint_load.load_trainer_state(checkpoint_dir), checkpoint_dir)
            )
        # any of these from a damaged or crafted file (an optimizer state that is a list, an RNG state too short)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as error:
            if isinstance(error, ckpt.CheckpointError):
                raise
            path = Path(checkpoint_dir) / ckpt.STATE_FILE
            raise ckpt.CheckpointError(f"{path}: trainer state does not fit this run ({error})") from None
        if self.distributed.is_main:
            dropped = self._truncate_metrics()
            if dropped:
                lines = "line" if dropped == 1 else "lines"
                self._say(
                    f"resume: dropped {dropped} {lines} of {self.metrics.path} that could not be read as metrics "
                    "rows (damaged, or cut short when a run was killed)"
                )
            removed = remove_later_checkpoints(self.run_dir, step=self.step, best_step=self.early_stopping.best_step)
            if removed:
                self._say(removed)
            mended = mend_best_pointer(self.run_dir, step=self.step, best_step=self.early_stopping.best_step)
            if mended:
                self._say(mended)

    def _truncate_metrics(self) -> int:
        """`MetricsLog.truncate_after` the resumed step; a rewrite that fails (a full disk, a read-only run) says
        what to do: it changed nothing (the file is replaced whole or not at all), and neither did the resume."""
        try:
            return self.metrics.truncate_after(self.step)
        except OSError as error:
            raise OSError(
                f"could not rewrite {self.metrics.path} to drop its rows past step {self.step} "
                f"({error.strerror or error}); the run is unchanged: free space on its disk (or make "
                f"{self.run_dir} writable), then resume again"
            ) from None

    def _cpu_threads(self) -> int | None:
        """torch's CPU thread count where the model trains on the CPU, None elsewhere: a GPU run's count plays
        no part in its sums, and a CPU resume of it told to set OMP_NUM_THREADS to the GPU machine's count."""
        return torch.get_num_threads() if next(self.model.parameters()).device.type == "cpu" else None

    def _say(self, line: str) -> None:
        """A line on stderr about what resuming did, shown as setup's lines are (`progress.shown`)."""
        if shown(line, quiet=self.quiet, main_process=self.distributed.is_main):
            print(line, file=sys.stderr, flush=True)

    def batch_shape(self) -> list[int]:
        """[processes, train.max_tokens, train.accumulate]: what the effective batch is made of."""
        return [self.distributed.world_size, self.train_config.max_tokens, self.train_config.accumulate]

    def effective_batch(self) -> str:
        """One line: processes x token budget x accumulation = padded token slots per update."""
        world_size, max_tokens, accumulate = self.batch_shape()
        return (
            f"effective batch: {world_size} process(es) x {max_tokens} tokens (train.max_tokens) x "
            f"{accumulate} (train.accumulate) = up to {math.prod(self.batch_shape()):,} padded token slots per update"
        )


def effective_batch_change(before: list[int] | None, now: list[int]) -> str | None:
    """The line a resume shows when the effective batch differs from the checkpoint's (another number of
    processes, most often), with the train.accumulate that keeps it where there is one; None when the
    number of token slots per update is the same."""
    if before is None or math.prod(before) == math.prod(now):
        return None
    (processes, max_tokens, accumulate), total = before, math.prod(before)
    line = (
        f"resume: the effective batch changes from {processes} process(es) x {max_tokens} x {accumulate} = "
        f"{total:,} to {now[0]} x {now[1]} x {now[2]} = {math.prod(now):,} padded token slots per update"
    )
    keeping, remainder = divmod(total, now[0] * now[1])
    if keeping > 0 and remainder == 0:
        line += f"; --set train.accumulate={keeping} keeps {total:,}"
    return line


def _stopping_state_named(state: dict[str, Any], checkpoint_dir: Path) -> dict[str, Any]:
    """The trainer state with early stopping's metric and settings named: checkpoints written before they
    were stored (older tformer) take them from the checkpoint's experiment.json, which a resume with another
    train.stop_metric would otherwise compare with a best value of the old metric (a loss taken as a BLEU)."""
    stopping = state.get("early_stopping")
    if not isinstance(stopping, dict) or ("metric" in stopping and "measured_with" in stopping):
        return state
    experiment, _ = checkpoint_load.read_experiment(checkpoint_dir)
    metric = str(stopping.get("metric", experiment.train.stop_metric))
    named = {"metric": metric, "measured_with": metric_settings(metric, experiment), **stopping}
    return {**state, "early_stopping": named}


def thread_count_change(before: int | None, now: int | None) -> str | None:
    """The line a CPU resume shows when torch computes with another number of threads than the checkpoint's
    run did: matrix products and sums then round differently, so the resumed run is no longer the
    uninterrupted one bit for bit (it trains as well, on other low bits). None when the count is the same, or
    when either run is not on the CPU (None)."""
    if before is None or now is None or before == now:
        return None
    return (
        f"resume: torch uses {now} CPU thread(s) here, the run trained with {before}: the resumed run will not be "
        f"bit-identical to an uninterrupted one; OMP_NUM_THREADS={before} keeps it"
    )
