"""The training loop: one update per step, then what is due at the end of the step, each done by its module.

Order at the end of step n: log (every log_every) -> validation loss (every valid_every) and BLEU/chrF
(every bleu_every; validator.py) -> stopping criteria (stopping.py) -> checkpoint (every save_every, when
the stopping metric improved, and when the run stops; saving.py). Every checkpoint is written after
everything that may touch the random generators at that step (rng_state.py), so a run resumed from it
continues exactly as the original did. The hot path never waits for the device: step losses stay on it
until `_flush` reads them (loss_window.py), at logging steps, before validation and before every
checkpoint, so a checkpoint is never written from a diverged model (errors.py).

Data parallelism (processes started by torchrun, see docs/training.md): each process reads its own
share of the batches (BatchStream rank/world_size) and runs the TrainingObjective wrapped in
DistributedDataParallel; every process validates the same full validation set on identical weights
and takes rank 0's measurements (one small broadcast), so all reach the same decisions even where
kernels differ in the last bits; only rank 0 logs and writes checkpoints. The data
position is stored as a global batch index within the epoch (see `stream_state`), so a run may be
resumed with a different number of processes.

What a checkpoint holds of the Trainer (`state_dict`) and how a resume restores it are in trainer_state.py,
whose TrainerState the Trainer inherits.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from tformer.config import CompileMode, ConfigError, ExperimentConfig, TrainConfig
from tformer.data.batching import Batch, BatchStream
from tformer.data.tokenizer import Tokenizer
from tformer.model import Transformer
from tformer.runtime import Distributed, compile_layers, compile_objective, configure_backends, resolve_device
from tformer.termination import interrupts_held
from tformer.training import checkpoint as ckpt
from tformer.training.errors import CheckpointSaveError as CheckpointSaveError  # the CLI imports it from here
from tformer.training.errors import TrainingDivergedError, TrainingInterrupted, what_was_kept, why_diverged
from tformer.training.graphed_step import GraphedSteps
from tformer.training.loss_window import LossWindow
from tformer.training.metrics_log import MetricsLog
from tformer.training.optimizer import build_optimizer
from tformer.training.prefetch import BatchSource
from tformer.training.progress import Progress
from tformer.training.run_lock import RunLock
from tformer.training.saving import save_step_checkpoint
from tformer.training.schedule import learning_rate, stopped_in_warmup_advice
from tformer.training.step import TrainingObjective, train_step
from tformer.training.stopping import StoppingCriteria
from tformer.training.trainer_state import TrainerState
from tformer.training.validation import EarlyStopping, metric_settings
from tformer.training.validator import Validator, validation_line

# DDP sends the model's buffers from rank 0 before every forward unless told not to; the only buffers, the
# sinusoidal tables, are computed alike in every process and never change. torch 2.13 renamed the keyword
# (broadcast_buffers, which then warns, became forward_sync_buffers).
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)


@dataclass
class TrainingData:
    """Encoded training pairs as a resumable stream, plus the validation set in two forms."""

    stream: BatchStream
    valid_batches: list[Batch] = field(default_factory=list)  # for validation loss
    valid_sources: list[str] = field(default_factory=list)  # raw text, for BLEU/chrF
    valid_references: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TrainResult:
    step: int
    stop_reason: str
    best_metric: float | None
    best_step: int
    last_checkpoint: Path


class Trainer(TrainerState):
    def __init__(
        self,
        *,
        experiment: ExperimentConfig,
        model: Transformer,
        tokenizer: Tokenizer,
        data: TrainingData,
        run_dir: Path,
        quiet: bool = False,
        distributed: Distributed | None = None,
        compile_mode: CompileMode = "none",
        loss_chunk: int = 0,
        lock: RunLock | None = None,
    ) -> None:
        """`compile_mode` "layers" compiles each layer in place (runtime.compile_layers), "model" the whole
        training objective with CUDA graphs on a GPU (runtime.compile_objective; under train.cuda_graphs
        without graphs of its own: the graphed steps record it); `loss_chunk` > 0 computes
        the loss that many target positions at a time (loss.chunked_label_smoothed_loss). `lock` (taken by
        start_run and resume_run) keeps other processes out of `run_dir` and is released when `train` ends."""
        self.lock = lock
        self.experiment, self.train_config = experiment, experiment.train
        self.tokenizer, self.data, self.run_dir = tokenizer, data, Path(run_dir)
        # where the run will be when training ends, for the closing message: `run_dir` itself, except for
        # a run trained in a staging directory and then renamed into place (train --overwrite)
        self.final_run_dir = self.run_dir
        # the warning said when training stops at (step, settings), or None: inside the warm-up by default;
        # the demo, whose time cap is its own --train-seconds, says it in its own words
        self.stop_advice: Callable[[int, TrainConfig], str | None] = stopped_in_warmup_advice
        self.distributed = distributed or Distributed()
        self.quiet = quiet or not self.distributed.is_main
        self.device = resolve_device(self.train_config.device, self.distributed)
        configure_backends(self.device)
        cuda = self.device.type == "cuda"
        precision = self.train_config.precision
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" or (precision == "auto" and cuda) else None
        self.model = model.to(self.device).train()
        if compile_mode == "layers":
            compile_layers(self.model)
        self.loss_chunk = loss_chunk
        # DDP and torch.compile wrap the objective, never the model: its state-dict keys stay the same.
        objective: torch.nn.Module = TrainingObjective(self.model)
        if self.distributed.enabled:
            device_ids = [self.device.index] if cuda else None
            objective = DistributedDataParallel(objective, device_ids=device_ids, **_NO_BUFFER_SYNC)
        if self.train_config.cuda_graphs and (self.distributed.enabled or loss_chunk):
            raise ConfigError("train.cuda_graphs runs in one process and without --loss-chunk")
        if compile_mode == "model":  # with cuda_graphs, the graphed steps record the compiled objective
            objective = compile_objective(objective, self.device, inside_cuda_graph=self.train_config.cuda_graphs)
        self.objective = objective
        self.optimizer = build_optimizer(self.model, self.train_config, device=self.device)
        self.graphed_steps: GraphedSteps | None = None  # made when training starts (after a restore)
        stop_metric = self.train_config.stop_metric
        self.early_stopping = EarlyStopping(
            stop_metric, self.train_config.patience, metric_settings(stop_metric, experiment)
        )
        self.validator = Validator(
            experiment=experiment,
            model=self.model,
            tokenizer=tokenizer,
            batches=data.valid_batches,
            sources=data.valid_sources,
            references=data.valid_references,
            early_stopping=self.early_stopping,
            distributed=self.distributed,
            device=self.device,
            autocast_dtype=self.autocast_dtype,
        )
        self.stopping = StoppingCriteria(
            self.train_config, self.early_stopping, stream=data.stream, distributed=self.distributed, device=self.device
        )
        self.metrics = MetricsLog(self.run_dir / ckpt.METRICS_FILE)
        self.step = 0
        self.elapsed_s = 0.0  # training wall time, summed over resumptions
        self._position = data.stream.state_dict()  # the stream state after the last batch trained on
        self.window = LossWindow()  # the losses of the steps since the last log row
        self._last_saved_step = -1
        self._trained = False  # `train` runs once

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        """Train until a stopping criterion (or an interrupt); once per Trainer. A second call would train
        without the run's lock (released when the first ends), on from an interrupted step, and on a GPU
        from batches the first call's background thread had already taken: `resume_run` continues a run."""
        if self._trained:
            raise RuntimeError(
                f"this Trainer has trained already (to step {self.step}); a Trainer trains once: continue "
                f"the run from its last checkpoint with resume_run({str(self.final_run_dir)!r}).train()"
            )
        self._check_run_unchanged()
        self._trained = True
        config = self.train_config
        progress = Progress(
            total_steps=config.max_steps or None,
            initial_step=self.step,
            quiet=self.quiet,
            main_process=self.distributed.is_main,
        )
        cuda = self.device.type == "cuda"
        batches = BatchSource(self.data.stream, background=cuda, pin_memory=cuda)
        progress.message(self.effective_batch())
        started = time.monotonic() - self.elapsed_s
        self.window.started = time.monotonic()
        stop_reason = self._stop_reason() if self.step > 0 else None
        try:
            while stop_reason is None:
                micro_batches = [next(batches) for _ in range(config.accumulate)]
                self._position = batches.position
                self.step += 1
                lr = learning_rate(self.step, config, d_model=self.experiment.model.d_model)
                if config.cuda_graphs:
                    self.window.add(self.step, *self._graphed_step(micro_batches[0], lr))
                else:
                    self.window.add(self.step, *self._eager_step(micro_batches, lr))
                self.elapsed_s = time.monotonic() - started
                progress.step()
                improved = self._end_of_step(lr, progress)
                self.elapsed_s = time.monotonic() - started  # validation counts against max_time_s
                stop_reason = self._stop_reason()
                due = self.step % config.save_every == 0 or improved or stop_reason is not None
                if due and self._last_saved_step != self.step:
                    self.save(best=improved)
        except KeyboardInterrupt as interrupt:
            raise TrainingInterrupted(
                what_was_kept(self.run_dir, processes=self.distributed.world_size) if self.distributed.is_main else ""
            ) from interrupt
        finally:
            batches.close()
            progress.close()
            if self.lock is not None:
                self.lock.release()
        self.distributed.barrier()  # rank 0 has written the last checkpoint before any process returns
        last = self.final_run_dir / ckpt.CHECKPOINTS_DIR / ckpt.step_name(self._last_saved_step)
        unlogged = self.window.unlogged_loss(self.step, config.log_every)  # save has read every pending loss
        progress.message(f"stopped at step {self.step}: {stop_reason}{unlogged}; last checkpoint {last}")
        advice = self.stop_advice(self.step, config)
        if advice is not None:
            progress.message(advice)
        best = self.early_stopping
        return TrainResult(self.step, stop_reason, best.best, best.best_step, last)

    def _check_run_unchanged(self) -> None:
        """Refuse to train a run that another Trainer of this process (which the run's lock lets in) has
        trained since this one was made: it went on from its own older step, wrote a second set of metrics
        rows for the steps trained already and replaced that Trainer's checkpoints."""
        if self.distributed.enabled:  # one process per rank, each with its own Trainer: the lock guards them
            return
        try:  # refused, the run is left to the Trainer that continues it: its lock goes too
            latest = ckpt.read_pointer_name(self.run_dir, "latest")  # a corrupt pointer is refused as well
            if latest != (ckpt.step_name(self.step) if self.step else None):
                raise RuntimeError(
                    f"{self.run_dir} has been trained to {latest} since this Trainer was made (at step "
                    f"{self.step}); continue the run from there with resume_run({str(self.final_run_dir)!r}).train()"
                )
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise

    def _eager_step(self, micro_batches: list[Batch], lr: float) -> tuple[Tensor, Tensor, int, Tensor | None]:
        """One update by `train_step`: (loss sum, NLL sum, target tokens, gradient norm), on the device."""
        config = self.train_config
        result = train_step(
            self.model,
            self.optimizer,
            micro_batches,
            lr=lr,
            smoothing=config.label_smoothing,
            pad_id=self.tokenizer.pad_id,
            clip_norm=config.clip_norm,
            device=self.device,
            autocast_dtype=self.autocast_dtype,
            loss_chunk=self.loss_chunk,
            objective=self.objective,
            distributed=self.distributed,
        )
        return result.loss_sum, result.nll_sum, result.n_tgt_tokens, result.grad_norm

    def _graphed_step(self, batch: Batch, lr: float) -> tuple[Tensor, Tensor, int, Tensor | None]:
        """One update by the CUDA graph of the batch's (rounded) shape (training/graphed_step.py); its
        loss buffers are copied, since the next replay overwrites them."""
        if self.graphed_steps is None:
            config, tokenizer = self.train_config, self.tokenizer
            self.graphed_steps = GraphedSteps(
                self.model,
                self.optimizer,
                smoothing=config.label_smoothing,
                special_ids=(tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id),
                clip_norm=config.clip_norm,
                device=self.device,
                autocast_dtype=self.autocast_dtype,
                objective=self.objective,
            )
        result = self.graphed_steps(batch, lr=lr)
        grad_norm = None if result.grad_norm is None else result.grad_norm.clone()
        return result.loss_sum.clone(), result.nll_sum.clone(), result.n_tgt_tokens, grad_norm

    def _end_of_step(self, lr: float, progress: Progress) -> bool:
        """Log and validate as scheduled; True when the stopping metric reached a new best."""
        config = self.train_config
        row: dict[str, Any] = {}
        if self.step % config.log_every == 0:
            row.update(self._flush())
            row["lr"] = lr
            progress.show({"step": self.step, **row})
        validation_started = time.monotonic()
        validated, improved = self.validator.run(self.step, progress, before=self._flush)
        self.window.pause(time.monotonic() - validation_started)
        if validated:
            progress.message(validation_line(self.step, validated, improved))
            row.update(validated)
        if row:
            epoch = self._position["epoch"]
            if self.distributed.is_main:
                self._log_row({"step": self.step, "epoch": epoch, "wall_s": self.elapsed_s, **row})
        return improved

    def _log_row(self, row: dict[str, Any]) -> None:
        """Append a row to metrics.jsonl; a write that fails (a full disk) stops the run as a failed save
        does, naming the checkpoint it keeps."""
        try:
            self.metrics.append(row)
        except OSError as error:
            failure = f"could not write {self.metrics.path} ({error.strerror or error})"
            kept = what_was_kept(self.run_dir, processes=self.distributed.world_size)
            raise CheckpointSaveError(failure, kept) from error

    def _flush(self) -> dict[str, float]:
        """Read the pending step losses (see LossWindow); fail on the first non-finite one. Returns the
        logging window's averages (and resets it) when called at a logging step."""
        diverged_at = self.window.read_pending(self.distributed, self.device)
        if diverged_at is not None:
            distributed = self.distributed
            why = why_diverged(self.run_dir, diverged_at, rank=distributed.rank, processes=distributed.world_size)
            raise TrainingDivergedError(why, step=diverged_at)
        return self.window.row(self.step, self.train_config.log_every, now=time.monotonic())

    def _stop_reason(self) -> str | None:
        return self.stopping.reason(step=self.step, position=self._position, elapsed_s=self.elapsed_s)

    # ------------------------------------------------------------------ checkpoints
    def save(self, *, best: bool) -> Path:
        """Write the checkpoint of the current step, move the pointers, prune old checkpoints.

        Every process calls it (the flush is collective); only rank 0 writes. Ctrl-C and SIGTERM wait until
        the checkpoint is written and `latest` names it (a second or so): under torchrun, another process's
        failure reaches rank 0 as torchrun's SIGTERM most often while it writes, since the others do not wait
        for that, and the run then kept the checkpoint a whole train.save_every before instead."""
        self._flush()
        self._last_saved_step = self.step
        if not self.distributed.is_main:
            return self.run_dir / ckpt.CHECKPOINTS_DIR / ckpt.step_name(self.step)
        with interrupts_held():
            return save_step_checkpoint(
                self.run_dir,
                step=self.step,
                best=best,
                keep_last=self.train_config.keep_last,
                experiment=self.experiment,
                tokenizer=self.tokenizer,
                model=self.model,
                trainer_state=self.state_dict(),
                processes=self.distributed.world_size,
            )
