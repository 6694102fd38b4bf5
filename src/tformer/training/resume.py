"""Resuming a training run: rebuild its Trainer from the run's last checkpoint, with the settings a
`--resume` command may change (train.* and decode.*), and refuse the ones it may not (model and data).

A resumed run restores python's, numpy's and torch's generators from its checkpoint (Trainer.restore),
so it continues exactly as the uninterrupted run would have. A checkpoint that cannot be read stops the
resume in one line that names the newest earlier one that can, and how to resume from it. Starting a
new run is run.py's job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shlex
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tformer.config import (
    CompileMode,
    ConfigError,
    ExperimentConfig,
    ModelConfig,
    apply_overrides,
    expand_preset,
    experiment_from_dict,
    experiment_to_dict,
    override_list,
    preset_of,
)
from tformer.data.tokenizer import Tokenizer, TokenizerError
from tformer.model import Transformer
from tformer.runtime import Distributed, resolve_device
from tformer.training import checkpoint as ckpt
from tformer.training import checkpoint_load
from tformer.training.agreement import check_same_experiment
from tformer.training.loop import Trainer
from tformer.training.run import FROM_TOKENIZER, sayer, warn_about_schedule
from tformer.training.run_directory import RunDirectoryError, replaceable, start_afresh
from tformer.training.run_lock import RunLock
from tformer.training.training_text import Say, absolute_data_paths, prepare_data


def resume_run(
    run_dir: Path,
    *,
    overrides: Sequence[str] = (),
    expected: ExperimentConfig | None = None,
    quiet: bool = False,
    distributed: Distributed | None = None,
    compile_mode: CompileMode = "none",
    loss_chunk: int = 0,
) -> Trainer:
    """A Trainer that continues `run_dir` from its last checkpoint.

    Either `overrides` change train.* and decode.* keys of the stored experiment (e.g. a larger
    train.max_steps), or `expected` is the experiment of the command that started the run, repeated:
    its model and data must match the run's, and its train and decode sections are used. The number
    of processes may differ from the run's (see Trainer.load_stream_state)."""
    distributed = distributed or Distributed()
    with _earlier_checkpoint_advised(run_dir):  # the run lock's errors are no CheckpointError: they pass as they are
        checkpoint = _last_checkpoint(run_dir, processes=distributed.world_size)
        lock = RunLock(run_dir) if distributed.is_main else None
        try:
            return _resumed_trainer(
                run_dir,
                checkpoint,
                overrides=overrides,
                expected=expected,
                lock=lock,
                quiet=quiet,
                distributed=distributed,
                compile_mode=compile_mode,
                loss_chunk=loss_chunk,
            )
        except BaseException:
            if lock is not None:
                lock.release()
            raise


def _resumed_trainer(
    run_dir: Path,
    checkpoint: Path,
    *,
    overrides: Sequence[str],
    expected: ExperimentConfig | None,
    lock: RunLock | None,
    quiet: bool,
    distributed: Distributed,
    compile_mode: CompileMode,
    loss_chunk: int,
) -> Trainer:
    say = sayer(quiet=quiet, main_process=distributed.is_main)
    experiment, step = checkpoint_load.read_experiment(checkpoint)
    if expected is not None:
        _check_same_run(experiment, expected)
        experiment = dataclasses.replace(experiment, train=expected.train, decode=expected.decode)
    experiment = _resume_overrides(experiment, overrides)
    device = resolve_device(experiment.train.device, distributed)
    check_same_experiment(experiment, distributed, device, extra={"the checkpoint resumed from": checkpoint.name})
    warn_about_schedule(experiment.train, say)
    tokenizer = checkpoint_load.load_tokenizer(checkpoint)
    _say_changed_tokenizer(experiment.data.tokenizer, tokenizer, say)
    model = Transformer(experiment.model)
    training_data = prepare_data(experiment, tokenizer, say=say, run_dir=run_dir, distributed=distributed)
    trainer = Trainer(
        experiment=experiment,
        model=model,
        tokenizer=tokenizer,
        data=training_data,
        run_dir=run_dir,
        quiet=quiet,
        distributed=distributed,
        compile_mode=compile_mode,
        loss_chunk=loss_chunk,
        lock=lock,
    )
    trainer.restore(checkpoint)
    say(f"resuming {run_dir} from {checkpoint.name} (step {step})")
    return trainer


def _say_changed_tokenizer(directory: str | None, tokenizer: Tokenizer, say: Say) -> None:
    """A resume keeps the tokenizer the run saved (its model learned those ids) whatever data.tokenizer holds
    now: say so where that is another one, which a user who replaced it would expect to be taken."""
    if directory is None:
        return
    try:
        same = Tokenizer.from_files(directory).fingerprint() == tokenizer.fingerprint()
    except TokenizerError:  # removed or unreadable since: the run never needs it again
        return
    if not same:
        say(
            f"warning: the tokenizer in {directory} changed since this run started; the run goes on with its own "
            "copy (the ids its model learned): train with the new one into another --out"
        )


def resumed_experiment(run_dir: Path, given: dict[str, Any], *, processes: int = 1) -> ExperimentConfig:
    """The experiment that a `--resume` command describes: the run's own, with the command's settings
    (nested tables from its config file, flags and --set) laid over it.

    A command that gives only what changes, or repeats the one that started the run, thus describes
    the run without the defaults of keys it leaves out. A [model] preset stands for its values, so a
    different preset is a changed model. Pass the result to `resume_run(expected=...)`, which refuses
    a model or data that differ from the run's and takes the train and decode sections. `processes`: how
    many the command runs in (torchrun's), for the advice of a run that has nothing to resume."""
    with _earlier_checkpoint_advised(run_dir):
        stored, _ = checkpoint_load.read_experiment(_last_checkpoint(run_dir, processes=processes))
    values = experiment_to_dict(stored)
    for section, table in given.items():
        if section not in values or not isinstance(table, dict):
            values[section] = table  # experiment_from_dict names what is wrong with it
            continue
        values[section] = {**values[section], **(expand_preset(table) if section == "model" else table)}
    experiment = experiment_from_dict(values)
    for key in FROM_TOKENIZER:  # `_check_same_run` fills these in from the run: a value given is compared here
        value, stored_value = getattr(experiment.model, key), getattr(stored.model, key)
        if value != stored_value:
            raise ConfigError(
                f"--resume: model.{key} is {value!r} but the run has {stored_value!r}, its tokenizer's; leave it "
                "out of the command (and out of its --config file)"
            )
    return experiment


def _last_checkpoint(run_dir: Path, *, processes: int) -> Path:
    """The checkpoint a resumed run continues from, or a one-line error saying why there is none (and how to
    start afresh, which depends on how many `processes` run it)."""
    if Path(run_dir).exists() and not Path(run_dir).is_dir():
        raise RunDirectoryError(f"nothing to resume: {run_dir} is a file, not a run directory")
    if not Path(run_dir).is_dir():
        raise RunDirectoryError(f"nothing to resume: {run_dir} does not exist")
    if not ckpt.is_run_dir(run_dir) or ckpt.read_pointer_name(run_dir, "latest") is None:
        if given_checkpoint := checkpoint_load.checkpoint_given_for_run(run_dir):
            raise RunDirectoryError(f"nothing to resume: {given_checkpoint}")
        afresh = f"; start afresh {start_afresh(run_dir, processes=processes)}"
        way_out = afresh if replaceable(run_dir) else ", nor anything of a run: check --out"
        raise RunDirectoryError(f"nothing to resume in {run_dir}: it holds no finished checkpoint{way_out}")
    checkpoint, _ = checkpoint_load.resolve_checkpoint(run_dir, which="last")
    _refuse_untrained(run_dir, checkpoint)
    _refuse_damaged_best(run_dir)
    return checkpoint


def _refuse_damaged_best(run_dir: Path) -> None:
    """A damaged `best` pointer (a copy cut short, an edit) names no checkpoint, so pruning cannot tell which
    one to keep: the resumed run trained to its first save, wrote it and stopped there, again at every resume.
    Refuse before anything is trained, saying how to mend it."""
    try:
        ckpt.read_pointer_name(run_dir, "best")
    except ckpt.CheckpointError as error:
        pointer = shlex.quote(str(Path(run_dir) / "best"))
        raise RunDirectoryError(
            f"cannot resume {run_dir}: {error}, so its first save could not tell which checkpoint to keep as the "
            f"best; write the best checkpoint's name into it (echo step-NNNNNNNN > {pointer}) or remove it (rm "
            f"{pointer}: commands that read the best then read latest, until a better validation writes it again)"
        ) from None


def _refuse_untrained(run_dir: Path, checkpoint: Path) -> None:
    """A run that `tformer import-hf` wrote names no training text and holds no optimizer state: there is
    nothing to continue, so say so in one line rather than fail on the missing data paths."""
    experiment, _ = checkpoint_load.read_experiment(checkpoint)
    if experiment.data.train_src is None or experiment.data.train_tgt is None:
        raise RunDirectoryError(
            f"nothing to resume in {run_dir}: it was not trained by tformer train (an import-hf model: no "
            "training data, no optimizer state); translate, evaluate, serve or export it as it is"
        )


@contextlib.contextmanager
def _earlier_checkpoint_advised(run_dir: Path) -> Iterator[None]:
    """A checkpoint that `latest` names but that cannot be read (a copy cut short, a disk error) stops the
    resume in one line naming the file; add the newest earlier checkpoint that reads whole and the commands
    that resume from it. Never resume from it unasked: that trains the steps after it again."""
    try:
        yield
    except (ckpt.CheckpointError, TokenizerError) as error:
        try:
            latest = ckpt.read_pointer_name(run_dir, "latest")
        except ckpt.CheckpointError:  # the pointer itself is damaged
            latest = None
        # an average (tformer average) holds weights only: any training checkpoint may follow it
        of_training = latest is not None and ckpt.is_step_name(latest)
        earlier = _newest_complete_checkpoint(run_dir, before=latest if of_training else None)
        if earlier is None:
            raise
        pointer, out = shlex.quote(str(Path(run_dir) / "latest")), shlex.quote(str(run_dir))
        if latest is not None and not of_training:
            why = f"latest names {latest}, not a checkpoint of training steps (an average holds weights only)"
            found = f"{why}; the newest training checkpoint that reads whole is {earlier.name}"
        else:
            found = f"the newest {'earlier ' if latest else ''}checkpoint that reads whole is {earlier.name}"
        raise ckpt.CheckpointError(
            f"{error}; {found}: to resume from it, run: echo {earlier.name} > {pointer} && "
            f"tformer train --out {out} --resume"
        ) from None


def _newest_complete_checkpoint(run_dir: Path, *, before: str | None) -> Path | None:
    """The newest step checkpoint older than the one named `before` (any, for None) whose files all read
    as a resume reads them; None where there is none."""
    for checkpoint in reversed(ckpt.step_checkpoints(run_dir)):
        if before is not None and checkpoint.name >= before:
            continue
        try:
            experiment, _ = checkpoint_load.read_experiment(checkpoint)
            checkpoint_load.load_tokenizer(checkpoint)
            checkpoint_load.load_weights(Transformer(experiment.model), checkpoint)
            checkpoint_load.load_trainer_state(checkpoint)
        except (ckpt.CheckpointError, TokenizerError):
            continue
        return checkpoint
    return None


def _check_same_run(stored: ExperimentConfig, given: ExperimentConfig) -> None:
    """Refuse to resume with a different model or data than the run was started with."""
    filled = dataclasses.replace(given.model, **{key: getattr(stored.model, key) for key in FROM_TOKENIZER})
    pairs = [("model", stored.model, filled), ("data", stored.data, absolute_data_paths(given.data))]
    changed = [
        (f"{section}.{key}", getattr(new, key), value)
        for section, old, new in pairs
        for key, value in dataclasses.asdict(old).items()
        if getattr(new, key) != value
    ]
    if not changed:
        return
    (first, value, stored_value), others = changed[0], [name for name, _, _ in changed[1:]]
    also = f" (and {', '.join(others)} differ{'s' if len(others) == 1 else ''})" if others else ""
    raise ConfigError(
        f"--resume: {_presets_named(stored.model, filled) if first.startswith('model.') else ''}"
        f"{first} is {value!r} but the run has {stored_value!r}{also}; a resumed run keeps its model and data "
        "(only train.* and decode.* may change): leave model and data settings out of the command (and out of "
        "its --config file) to keep the run's, or train with the changed ones into another --out"
    )


def _presets_named(stored: ModelConfig, given: ModelConfig) -> str:
    """The presets behind two models of different shapes, since the user chose a preset, not a d_model:
    "the command asks for preset small's shape but the run has preset tiny's: " (or one side of it);
    empty where neither has a preset's shape or both have the same one."""
    asked, run = preset_of(given), preset_of(stored)
    if asked == run:
        return ""
    if run is None:
        return f"the command asks for preset {asked}'s shape but the run's is no preset's: "
    if asked is None:
        return f"the run has preset {run}'s shape: "
    return f"the command asks for preset {asked}'s shape but the run has preset {run}'s: "


def _resume_overrides(experiment: ExperimentConfig, overrides: Sequence[str]) -> ExperimentConfig:
    overrides = override_list(overrides)  # once: an iterator checked here would reach apply_overrides empty
    for text in overrides:
        if not text.strip().startswith(("train.", "decode.")):
            raise ConfigError(f"--resume keeps the run's model and data; only train.* and decode.* may change: {text}")
    return experiment_from_dict(apply_overrides(experiment_to_dict(experiment), overrides))
