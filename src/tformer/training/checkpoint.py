"""Self-describing checkpoints: the layout of a run directory, the names of its files, and its pointers.

A run directory:

    RUN_DIR/
      latest, best                  pointer files: the name of a checkpoint directory, one line
      metrics.jsonl                 one JSON object per logged step (see metrics_log.py)
      .lock                         locked while a process trains into the run (see run_lock.py)
      checkpoints/step-00001000/
        experiment.json             format_version, tformer version, step, the ExperimentConfig,
                                    the fingerprint of the tokenizer files (checked when they are read)
        tokenizer/                  Tokenizer.to_files
        model.safetensors           weights, every shared (tied) tensor stored once
        trainer_state.pt            optimizer, step, RNG states, data position, early stopping

A checkpoint is first written into a hidden sibling (`checkpoints/.tmp-...`), every file is fsynced,
and only then renamed into place; pointers are replaced with `os.replace`. A crash at any moment
leaves either the old or the new checkpoint, never a half-written one under a real name. Nothing a
user may receive from someone else is unpickled: weights are safetensors and the trainer state is read
with `torch.load(weights_only=True)`.

This file names the parts of that layout and reads it (which checkpoints a run holds, what a pointer
names); writing checkpoints and pointers is in checkpoint_save.py, loading a run for inference or
resumption in checkpoint_load.py, and the check of stored weights against a model in
checkpoint_weights.py.
"""

from __future__ import annotations

import os
from pathlib import Path

from tformer.input_paths import read_at_most

FORMAT_VERSION = 1
EXPERIMENT_FILE = "experiment.json"
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
TOKENIZER_DIR = "tokenizer"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
POINTERS = ("latest", "best")
TOKENIZER_FINGERPRINT = "tokenizer_fingerprint"  # the key in experiment.json


class CheckpointError(ValueError):
    """A run or checkpoint cannot be read or written as asked; the message names the file."""


def step_checkpoints(run_dir: Path) -> list[Path]:
    """RUN_DIR/checkpoints/step-* directories, oldest first."""
    parent = Path(run_dir) / CHECKPOINTS_DIR
    if not parent.is_dir():
        return []
    return sorted(path for path in parent.iterdir() if path.is_dir() and is_step_name(path.name))


STEP_PREFIX = "step-"


def step_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def step_number(name: str) -> int:
    """The step of a `step-NNNNNNNN` checkpoint name; -1 for another name."""
    number = name.removeprefix(STEP_PREFIX)
    return int(number) if number.isdigit() else -1


def is_step_name(name: str) -> bool:
    """Whether `name` is a checkpoint of training steps (not an average, nor a temporary directory)."""
    return name.startswith(STEP_PREFIX)


def is_run_dir(path: Path) -> bool:
    return (Path(path) / "latest").is_file() or (Path(path) / CHECKPOINTS_DIR).is_dir()


POINTER_MAX_BYTES = 256  # a directory name and a newline; longer is not a pointer


def read_pointer_name(run_dir: Path, which: str) -> str | None:
    path = Path(run_dir) / which
    if not path.is_file():
        return None
    raw = read_at_most(path, POINTER_MAX_BYTES)  # a name, not a file to read whole: a received one may be huge
    try:
        name = raw.decode("utf-8").strip() if raw is not None else ""
    except UnicodeDecodeError:
        name = ""
    if not name or "/" in name or "\0" in name or name.startswith("."):
        raise CheckpointError(f"{path}: corrupt pointer file (expected a checkpoint directory name)")
    return name


def directory_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the directory `path` names now; None where it names none. A reader compares it
    before and after reading a checkpoint's files one by one: a training run prunes checkpoints, and
    `train --overwrite` renames a new run into RUN_DIR, whose checkpoints have the same names as the old
    run's, while another command reads them."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino
