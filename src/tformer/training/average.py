"""Checkpoint averaging (paper section 6.1: the base models average their last 5 checkpoints, written
at 10-minute intervals, the big models their last 20).

The average of the last K step checkpoints of a run is written as a new, self-describing checkpoint
directory (experiment, tokenizer, weights; no trainer state). Existing checkpoints are never touched
and an existing output directory is never overwritten. Sums are taken in float64.
"""

from __future__ import annotations

import operator
from pathlib import Path

import torch

from tformer.atomic_file import parents_made
from tformer.caller_warnings import warn_caller
from tformer.config import ExperimentConfig
from tformer.data.tokenizer import Tokenizer
from tformer.interop.marian_tokenizer import VocabTokenizer
from tformer.model import Transformer
from tformer.training import checkpoint as ckpt
from tformer.training import checkpoint_load, checkpoint_save


def average_checkpoints(run_dir: str | Path, *, last: int, out: str | Path | None = None) -> Path:
    """Average the weights of RUN_DIR's last `last` checkpoints into `out` (default: a new
    RUN_DIR/checkpoints/averaged-last{K}-step-{N} directory). Returns the new directory."""
    run_dir = Path(run_dir)
    last = _count(last)
    if last < 1:
        raise ckpt.CheckpointError(f"--last must be at least 1, got {last}")
    if given_checkpoint := checkpoint_load.checkpoint_given_for_run(run_dir):
        raise ckpt.CheckpointError(given_checkpoint)
    if not run_dir.is_dir() or not ckpt.is_run_dir(run_dir):
        raise ckpt.CheckpointError(f"{run_dir} is not a run directory (no {ckpt.CHECKPOINTS_DIR}/)")

    def choose() -> tuple[list[Path], list[Path]]:
        chosen = _chosen_checkpoints(run_dir, last=last)
        if (output := _output(run_dir, chosen, out)).exists():
            raise ckpt.CheckpointError(f"{output} already exists; averaging never overwrites, {_elsewhere(out)}")
        return chosen, [run_dir, *chosen]

    # a training run prunes the oldest chosen checkpoint at its next save; `train --overwrite` renames a new
    # run, whose checkpoints have the same names, into RUN_DIR: averaging them all with the old run's is refused
    chosen, experiment, step, tokenizer, model = checkpoint_load.read_unchanged(run_dir, choose, _average)
    output = _output(run_dir, chosen, out)
    try:
        with parents_made(output):  # a failed write leaves no new folder
            return checkpoint_save.write_checkpoint(
                output,
                experiment=experiment,
                tokenizer=tokenizer,
                model=model,
                step=step,
                trainer_state=None,
                extra={"averaged_from": [directory.name for directory in chosen]},
                replace=False,
            )
    except FileExistsError as error:  # another average into the same --out, run at the same time, finished first
        if error.filename != str(output):
            raise
        raise ckpt.CheckpointError(
            f"{output} was written by another process meanwhile; averaging never overwrites, {_elsewhere(out)}"
        ) from None


def _elsewhere(out: str | Path | None) -> str:
    """What to do when the average's directory exists: another --out, or, where it was the default name (the
    same checkpoints averaged before), use that one or give an --out."""
    if out is not None:
        return "choose another --out"
    return "use the average already there (the same checkpoints were averaged before), or give --out"


def _count(last: int) -> int:
    """`last` as an int: True made "averaged-lastTrue-...", 2.5 failed late; numpy's integers are counts too."""
    if isinstance(last, bool) or not hasattr(type(last), "__index__"):
        raise TypeError(f"last must be an int (how many checkpoints), got {last!r}")
    return operator.index(last)


def _output(run_dir: Path, chosen: list[Path], out: str | Path | None) -> Path:
    """Where the average of `chosen` goes: `out`, or by default beside the checkpoints, named after the newest."""
    return (
        Path(out)
        if out is not None
        else run_dir / ckpt.CHECKPOINTS_DIR / f"averaged-last{len(chosen)}-{chosen[-1].name}"
    )


def _chosen_checkpoints(run_dir: Path, *, last: int) -> list[Path]:
    """The last `last` step checkpoints of the run, oldest first."""
    available = _run_checkpoints(run_dir)
    if not available:  # a run stopped before its first save
        raise ckpt.CheckpointError(f"{run_dir} holds no step checkpoint yet, so nothing to average")
    if len(available) < last:
        raise ckpt.CheckpointError(
            f"{run_dir} has {len(available)} step checkpoints; ask for --last {len(available)} or fewer"
        )
    return available[-last:]


def _average(chosen: list[Path]) -> tuple[list[Path], ExperimentConfig, int, Tokenizer | VocabTokenizer, Transformer]:
    """The average of the `chosen` checkpoints' weights, in a model, with the newest one's experiment, step
    and tokenizer."""
    experiment, step = checkpoint_load.read_experiment(chosen[-1])
    model = Transformer(experiment.model)
    totals: dict[str, torch.Tensor] = {}
    tokenizer = checkpoint_load.load_tokenizer(chosen[-1])  # a damaged one is named as such, not as another tokenizer
    tokenizer_files = _tokenizer_files(chosen[-1])
    previous: tuple[Path, int] | None = None
    for directory in chosen:
        other, other_step = checkpoint_load.read_experiment(directory)
        if previous is not None:
            _warn_about_a_gap(*previous, directory, other_step, save_every=other.train.save_every)
        previous = (directory, other_step)
        if other.model != experiment.model:
            raise ckpt.CheckpointError(f"{directory} has a different model configuration than {chosen[-1]}")
        if _tokenizer_files(directory) != tokenizer_files:  # ids that name other pieces: an average of unrelated rows
            checkpoint_load.load_tokenizer(directory)  # as above
            raise ckpt.CheckpointError(f"{directory} has a different tokenizer than {chosen[-1]}")
        checkpoint_load.load_weights(model, directory)
        advice = "average checkpoints saved before it (a smaller --last, or latest set back)"
        checkpoint_load.refuse_non_finite(model, directory, advice=advice)
        for name, tensor in model.state_dict().items():
            totals[name] = totals.get(name, 0) + tensor.double()
    reference = model.state_dict()
    model.load_state_dict({name: (total / len(chosen)).to(reference[name].dtype) for name, total in totals.items()})
    return chosen, experiment, step, tokenizer, model


def _run_checkpoints(run_dir: Path) -> list[Path]:
    """The step checkpoints of the run that `latest` continues, oldest first. Those newer than `latest`
    (`latest` set back by hand to leave a diverged stretch behind, or a save whose pointer never moved)
    are not part of it: a resume removes them, and the average leaves them out, with a warning."""
    available = ckpt.step_checkpoints(run_dir)
    latest = ckpt.read_pointer_name(run_dir, "latest")
    if latest is None or not ckpt.is_step_name(latest):
        return available
    later = [directory.name for directory in available if directory.name > latest]
    if later:
        # not only `latest` set back: a run training now writes each checkpoint whole before it moves `latest`
        why = (
            "a run training now saves it before it moves latest; else its run stopped before that, "
            "or latest was set back by hand"
        )
        warn_caller(f"left out {', '.join(later)}: newer than {latest}, which {run_dir / 'latest'} names ({why})")
    return [directory for directory in available if directory.name <= latest]


def _warn_about_a_gap(earlier: Path, earlier_step: int, later: Path, later_step: int, *, save_every: int) -> None:
    """Warn where the run saved a checkpoint between two chosen ones that is gone: pruning (train.keep_last)
    keeps the checkpoint `best` names however old, so with fewer newest checkpoints than --last K the
    average took in an old best, hundreds of steps before the others, as if it were one of the last K."""
    missing = (earlier_step // save_every + 1) * save_every  # every multiple of save_every is saved
    if missing < later_step:
        warn_caller(
            f"{earlier.name} and {later.name} are not consecutive checkpoints: those saved between them (from "
            f"{ckpt.step_name(missing)}, train.save_every={save_every}) are gone, pruned by train.keep_last, "
            f"which keeps the best checkpoint however old; the average spans steps {earlier_step} to {later_step}"
        )


def _tokenizer_files(checkpoint: Path) -> dict[str, bytes]:
    """The files of a checkpoint's tokenizer directory, by name: equal for checkpoints of one run."""
    directory = checkpoint / ckpt.TOKENIZER_DIR
    if not directory.is_dir():
        raise ckpt.CheckpointError(f"missing checkpoint directory: {directory}")
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir()) if path.is_file()}
