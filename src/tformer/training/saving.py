"""Saving a training step's checkpoint into its run: the checkpoint, then the pointers, then pruning.

The checkpoint is written whole first (checkpoint.py writes it atomically), then `latest` (and `best`)
are moved to it, and only then are old checkpoints pruned. A failure on the way (a full disk, say)
leaves the pointers naming the last complete checkpoint; the CheckpointSaveError says which.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tformer.config import ExperimentConfig
from tformer.data.tokenizer import Tokenizer
from tformer.model import Transformer
from tformer.training import checkpoint as ckpt
from tformer.training.errors import CheckpointSaveError, what_was_kept


def save_step_checkpoint(
    run_dir: Path,
    *,
    step: int,
    best: bool,
    keep_last: int,
    experiment: ExperimentConfig,
    tokenizer: Tokenizer,
    model: Transformer,
    trainer_state: dict[str, Any],
) -> Path:
    """Write the checkpoint of `step`, point `latest` (and `best` when `best`) at it, prune all but the
    last `keep_last` step checkpoints (0 keeps all; never one a pointer names); returns its directory."""
    name = ckpt.step_name(step)
    try:
        path = ckpt.save_checkpoint(
            run_dir,
            name,
            experiment=experiment,
            tokenizer=tokenizer,
            model=model,
            step=step,
            trainer_state=trainer_state,
        )
        ckpt.write_pointer(run_dir, "latest", name)
        if best:
            ckpt.write_pointer(run_dir, "best", name)
    except OSError as error:  # the pointers still name the last complete checkpoint
        raise CheckpointSaveError(
            f"could not save checkpoint {name} ({error.strerror or error})", what_was_kept(run_dir)
        ) from error
    ckpt.prune_checkpoints(run_dir, keep_last=keep_last)
    return path
