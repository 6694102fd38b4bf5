"""Saving a training step's checkpoint into its run: the checkpoint, then the pointers, then pruning.

The checkpoint is written whole first (checkpoint_save.py writes it atomically), then `best` (when it is
the best) and `latest` are moved to it, in that order, and only then are old checkpoints pruned. A failure on
the way (a full disk, say) leaves `latest` naming the last complete checkpoint; the CheckpointSaveError says
which.
A process killed between writing a checkpoint and moving `latest` leaves that checkpoint newer than
`latest` (and perhaps `best` naming it); a resumed run removes it (remove_later_checkpoints), moving `best`
back, before it saves any of its own. Were `latest` moved first, a kill before `best` left the resumed run
believing its best checkpoint was that one while `best` named an older one, for good.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tformer.config import ExperimentConfig
from tformer.data.tokenizer import Tokenizer
from tformer.model import Transformer
from tformer.training import checkpoint as ckpt
from tformer.training import checkpoint_save
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
    processes: int = 1,
) -> Path:
    """Write the checkpoint of `step`, point `latest` (and `best` when `best`) at it, prune all but the
    last `keep_last` step checkpoints (0 keeps all; never one a pointer names); returns its directory.
    `processes`, the run's, is for the advice of a failed save (errors.what_was_kept)."""
    name = ckpt.step_name(step)
    try:
        path = checkpoint_save.save_checkpoint(
            run_dir,
            name,
            experiment=experiment,
            tokenizer=tokenizer,
            model=model,
            step=step,
            trainer_state=trainer_state,
        )
        if best:  # before latest: a kill between the two leaves a checkpoint newer than latest, which a resume
            checkpoint_save.write_pointer(run_dir, "best", name)  # removes, moving best back (remove_later_checkpoints)
        checkpoint_save.write_pointer(run_dir, "latest", name)
    except OSError as error:  # the pointers still name the last complete checkpoint
        raise CheckpointSaveError(
            f"could not save checkpoint {name} ({error.strerror or error})", what_was_kept(run_dir, processes=processes)
        ) from error
    checkpoint_save.prune_checkpoints(run_dir, keep_last=keep_last)
    return path


def remove_later_checkpoints(run_dir: Path, *, step: int, best_step: int) -> str | None:
    """Remove the step checkpoints newer than `step`, the one a resumed run continues from: they are no
    part of the run it continues (a process killed before it moved `latest` left one; setting `latest`
    back by hand leaves those after it), yet `average --last K` and pruning would count them until the run
    wrote over them. A `best` pointer that names one moves to `best_step`'s checkpoint (the best the resumed
    run knows), or is removed where that is gone. Returns the line that says so, or None."""
    later = [path for path in ckpt.step_checkpoints(run_dir) if ckpt.step_number(path.name) > step]
    if not later:
        return None
    names = [path.name for path in later]
    best = _best_pointer(run_dir)  # damaged: left as it is, for the commands that read it to name
    moved = ""
    if best in names:
        kept = _best_checkpoint(run_dir, step=step, best_step=best_step)
        if kept is not None:
            checkpoint_save.write_pointer(run_dir, "best", kept)
            moved = f"; best now names {kept}"
        else:
            (Path(run_dir) / "best").unlink()
            moved = "; best named one of them and is removed (commands that read the best read latest)"
    for path in later:
        checkpoint_save.remove_out_of_sight(path)
    return (
        f"resume: removed {', '.join(names)}, newer than {ckpt.step_name(step)} that the run continues from "
        f"(left by a run killed before it moved latest, or by latest set back){moved}"
    )


def mend_best_pointer(run_dir: Path, *, step: int, best_step: int) -> str | None:
    """Move `best` to `best_step`'s checkpoint where it names another step checkpoint: an older tformer moved
    `latest` before `best`, and a process killed between the two left `best` on an older checkpoint while
    the state it saved names the new one, the checkpoint resumed from, its best; translate read the older
    weights for good. Only that case is mended (`best_step == step`): a `best` pointed elsewhere by hand,
    a best not yet measured, or a pointer naming no step checkpoint is left. Returns the line that says so,
    or None."""
    if best_step != step:
        return None
    best = _best_pointer(run_dir)  # missing or damaged: the resume's own check names it
    kept = _best_checkpoint(run_dir, step=step, best_step=best_step)
    if best is None or not ckpt.is_step_name(best) or kept is None or best == kept:
        return None
    checkpoint_save.write_pointer(run_dir, "best", kept)
    return f"resume: best named {best}, but the run's best is {kept} (its trainer state): best now names {kept}"


def _best_pointer(run_dir: Path) -> str | None:
    """The checkpoint name `best` holds; None where it is missing or damaged."""
    try:
        return ckpt.read_pointer_name(run_dir, "best")
    except ckpt.CheckpointError:
        return None


def _best_checkpoint(run_dir: Path, *, step: int, best_step: int) -> str | None:
    """The name of `best_step`'s checkpoint, the best a run resumed at `step` knows; None where it has none
    (no best measured yet) or the checkpoint is gone."""
    kept = ckpt.step_name(best_step)
    if 0 < best_step <= step and (Path(run_dir) / ckpt.CHECKPOINTS_DIR / kept).is_dir():
        return kept
    return None
