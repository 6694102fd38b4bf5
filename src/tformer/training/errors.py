"""How a training run that cannot go on tells its user: the error types, and what their messages say
the run keeps.

Each message names what the user can do next: the checkpoint a resume continues from (or that there is
none, so nothing to resume), and for a diverged run the last good checkpoint and what to change. The
pointers name only complete checkpoints (checkpoint.py), so "latest" is what a run keeps however it
stopped.
"""

from __future__ import annotations

from pathlib import Path

from tformer.training import checkpoint as ckpt
from tformer.training.run_directory import start_afresh


class TrainingDivergedError(ValueError):
    """The loss became NaN or infinite at `step`; the message names the step and the last good checkpoint."""

    def __init__(self, message: str, *, step: int) -> None:
        super().__init__(message)
        self.step = step


DIVERGED_ADVICE = "lower the learning rate or set train.clip_norm"


def diverged_line(step: int, kept: str) -> str:
    """The line of a run whose loss at `step` was not finite; `kept` says what the run keeps."""
    return f"training diverged: the loss became non-finite at step {step}; {kept}"


class CheckpointSaveError(OSError):
    """Writing a checkpoint, or a row of metrics.jsonl, failed (a full disk, say); the message names the
    checkpoint the run keeps."""

    def __init__(self, failure: str, kept: str) -> None:
        super().__init__(f"{failure}; {kept}")
        self.failure = failure  # what failed, without what the run kept


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training; the message (rank 0's; empty on other ranks) says what the run kept."""


def what_was_kept(run_dir: Path, *, processes: int = 1) -> str:
    """What an interrupted run leaves: its last complete checkpoint, which a resume continues from. A run
    of several `processes` that kept none is started afresh in an emptied RUN_DIR: --overwrite, which a
    run of one process takes, is refused under torchrun."""
    try:
        name = ckpt.read_pointer_name(run_dir, "latest")
    except (OSError, ckpt.CheckpointError):
        name = None
    if name is None:
        afresh = start_afresh(run_dir, processes=processes)
        return f"no checkpoint of {run_dir} was saved yet, so nothing to resume: start afresh {afresh}"
    return (
        f"the run keeps its last checkpoint, {run_dir / ckpt.CHECKPOINTS_DIR / name}; "
        f"continue it with: tformer train --out {run_dir} --resume"
    )


def why_diverged(run_dir: Path, step: int, *, rank: int = 0, processes: int = 1) -> str:
    """The message of the TrainingDivergedError of a run whose loss at `step` was not finite. Every
    process of a multi-process run finds it at the same step (the loss is summed over all of them), so
    only rank 0 says what the run keeps and what to change; the others say where it happened, in the
    words of the other processes' stops (cli/train.py), as they print only `interrupted` on Ctrl-C.

    The loss of step n is computed from the weights after step n - 1, which a checkpoint of step n - 1
    holds: that checkpoint is no good one (resumed, its first step diverges again, at any learning rate).
    The good ones are those of step n - 2 and before, whose next step's loss was finite."""
    if rank > 0:
        return f"process {rank} stops: training diverged at step {step} (process 0's message says what to do)"
    checkpoints = run_dir / ckpt.CHECKPOINTS_DIR
    name = ckpt.read_pointer_name(run_dir, "latest")
    if name is None:
        return diverged_line(step, f"no checkpoint was saved; {DIVERGED_ADVICE}")
    if ckpt.step_number(name) != step - 1:
        return diverged_line(step, f"the last good checkpoint is {checkpoints / name}; {DIVERGED_ADVICE}")
    spoilt = f"the last checkpoint, {checkpoints / name}, holds the weights that gave it (resumed, it diverges again)"
    good = [path.name for path in ckpt.step_checkpoints(run_dir) if 0 < ckpt.step_number(path.name) < step - 1]
    if not good:
        afresh = start_afresh(run_dir, processes=processes)
        return diverged_line(step, f"{spoilt} and no earlier one is kept: start afresh {afresh}; {DIVERGED_ADVICE}")
    return diverged_line(
        step,
        f"{spoilt}; the last good checkpoint is {checkpoints / good[-1]}: continue from it with a lower learning "
        f"rate or train.clip_norm: echo {good[-1]} > {run_dir / 'latest'} && tformer train --out {run_dir} --resume",
    )
