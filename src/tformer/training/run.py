"""Setting up a training run: read the text, get a tokenizer, encode, build the model and Trainer;
or rebuild all of that from a run's last checkpoint to resume it. The run's directory is checked,
created and locked by `run_directory`; its text is read and encoded by `training_text`.

A new run seeds python's, numpy's and torch's generators from `train.seed`, so the same
configuration and data give the same run; a resumed run restores the generators from its checkpoint.
With several processes (torchrun) every process builds the same tokenizer, model and batch plan from
the same seed; torch's generator (dropout) is then offset by the rank so the processes' masks differ.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import shlex
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tformer.config import (
    CompileMode,
    ConfigError,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    expand_preset,
    experiment_from_dict,
    experiment_to_dict,
    preset_of,
)
from tformer.config.pieces import smallest_vocab_size
from tformer.data.tokenizer import Tokenizer, TokenizerError, sample_pairs
from tformer.model import Transformer, count_parameters
from tformer.model.size import check_fits_in_memory
from tformer.runtime import Distributed, resolve_device
from tformer.training import checkpoint as ckpt
from tformer.training import checkpoint_load
from tformer.training.agreement import check_same_experiment, check_shared_run_dir
from tformer.training.loop import Trainer
from tformer.training.progress import shown
from tformer.training.run_directory import (
    RunDirectoryError,
    check_new_run_dir,
    create_run_dir,
    lock_new_run_dir,
    remove_unused,
    replaceable,
)
from tformer.training.run_lock import RunLock
from tformer.training.schedule import warmup_advice
from tformer.training.training_text import (
    Say,
    TrainingText,
    absolute_data_paths,
    prepare_data,
    read_training_text,
    read_validation_text,
)


def start_run(
    experiment: ExperimentConfig,
    run_dir: Path,
    *,
    quiet: bool = False,
    checked: bool = False,
    distributed: Distributed | None = None,
    compile_mode: CompileMode = "none",
    loss_chunk: int = 0,
    encoded_from: Path | None = None,
) -> Trainer:
    """A Trainer for a new run in `run_dir`, which must be empty or absent (`checked=True`: the caller
    has already checked that, and may have put files there since, such as the demo's generated data).

    `distributed`, `compile_mode` and `loss_chunk` are how it runs, not what it computes (see Trainer).
    `encoded_from`: another run (the one an --overwrite replaces) whose encoded training data this run
    takes, hard-linked into its own directory, when its files, tokenizer and settings are the same.

    It seeds Python's, numpy's and torch's global random generators with train.seed (dropout draws from
    torch's), so a notebook's own random draws after it follow from that seed too."""
    distributed = distributed or Distributed()
    if not checked:
        check_new_run_dir(run_dir)
    distributed.barrier()  # every process has checked before rank 0 creates anything
    run_dir = Path(run_dir)
    created = create_run_dir(run_dir) if distributed.is_main else []
    lock = lock_new_run_dir(run_dir, checked=checked) if distributed.is_main else None
    try:
        return _new_trainer(
            experiment,
            run_dir,
            lock=lock,
            quiet=quiet,
            distributed=distributed,
            compile_mode=compile_mode,
            loss_chunk=loss_chunk,
            encoded_from=encoded_from,
        )
    except BaseException:
        if lock is not None:
            remove_unused(run_dir, lock, created=created)
        raise


def _new_trainer(
    experiment: ExperimentConfig,
    run_dir: Path,
    *,
    lock: RunLock | None,
    quiet: bool,
    distributed: Distributed,
    compile_mode: CompileMode,
    loss_chunk: int,
    encoded_from: Path | None,
) -> Trainer:
    say = _sayer(quiet=quiet, main_process=distributed.is_main)
    data = absolute_data_paths(experiment.data)
    device = resolve_device(experiment.train.device, distributed)
    check_same_experiment(dataclasses.replace(experiment, data=data), distributed, device)
    check_shared_run_dir(run_dir, distributed, device)  # rank 0 created it before the check's collectives
    if data.train_src is None or data.train_tgt is None:
        raise ConfigError("no training data: set data.train_src and data.train_tgt (or --train-src/--train-tgt)")
    if experiment.train.patience > 0 and data.valid_src is None:
        raise ConfigError("train.patience > 0 needs a validation set (data.valid_src and data.valid_tgt)")
    if data.tokenizer is None:
        check_embedding_sharing(experiment.model.share_embeddings, joint=data.joint_vocab)
    # the smallest vocabulary a tokenizer can have: a model too large even with it is refused before the data is read
    smallest = smallest_vocab_size(byte_fallback=data.byte_fallback)
    check_fits_in_memory(dataclasses.replace(experiment.model, src_vocab_size=smallest, tgt_vocab_size=smallest))
    _warn_about_warmup(experiment.train, say)  # once the settings are known to be ones it trains with
    valid_text = read_validation_text(data)  # small: its errors come before the training text is even read
    corpus = read_training_text(data)
    say(f"training data: {corpus.summary}")
    tokenizer = _run_tokenizer(
        data, corpus, share_embeddings=experiment.model.share_embeddings, seed=experiment.train.seed, say=say
    )
    say(f"tokenizer: {tokenizer!r}")
    check_same_tokenizer(tokenizer, distributed, device)
    model_config = dataclasses.replace(
        experiment.model,
        src_vocab_size=tokenizer.src_vocab_size,
        tgt_vocab_size=tokenizer.tgt_vocab_size,
        pad_id=tokenizer.pad_id,
    )
    experiment = dataclasses.replace(experiment, model=model_config, data=data)
    _seed_everything(experiment.train.seed)
    model = Transformer(model_config, seed=experiment.train.seed)  # its own generator: the same on every rank
    if distributed.rank > 0:
        torch.manual_seed(experiment.train.seed + distributed.rank)
    say(f"model: {count_parameters(model):,} parameters")
    training_data = prepare_data(
        experiment,
        tokenizer,
        say=say,
        run_dir=run_dir,
        train_text=corpus,
        valid_text=valid_text,
        distributed=distributed,
        encoded_from=encoded_from,
    )
    return Trainer(
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


def _run_tokenizer(data: DataConfig, corpus: TrainingText, *, share_embeddings: bool, seed: int, say: Say) -> Tokenizer:
    """The tokenizer named by data.tokenizer, or one trained on (a sample of) the training text."""
    if data.tokenizer is not None:
        tokenizer = Tokenizer.from_files(data.tokenizer)
        if data.byte_fallback and not tokenizer.byte_fallback:
            raise ConfigError(
                f"data.byte_fallback = true, but the tokenizer in {data.tokenizer} has no byte pieces: retrain it "
                "with --byte_fallback=true, or leave out data.tokenizer and let tformer train one"
            )
        check_embedding_sharing(share_embeddings, joint=tokenizer.joint, tokenizer_dir=data.tokenizer)
        defaults = {item.name: item.default for item in dataclasses.fields(DataConfig)}
        unused = [
            f"data.{key}={getattr(data, key)}" for key in TOKENIZER_TRAINING_KEYS if getattr(data, key) != defaults[key]
        ]
        if unused:  # set (by a recipe or by hand), but a given tokenizer has its own
            verb = "plays" if len(unused) == 1 else "play"
            say(f"tokenizer: {data.tokenizer} is used as it is, so {', '.join(unused)} {verb} no part")
        return tokenizer
    sources, targets = sample_pairs(corpus.sources, corpus.targets, max_pairs=data.tokenizer_max_pairs, seed=seed)
    if len(sources) < len(corpus.sources):
        say(f"tokenizer: trained on {len(sources):,} of {len(corpus.sources):,} pairs (data.tokenizer_max_pairs)")
    tokenizer = Tokenizer.train(
        sources,
        targets,
        vocab_size=data.vocab_size,
        model_type=data.tokenizer_model,
        joint=data.joint_vocab,
        character_coverage=data.character_coverage,
        byte_fallback=data.byte_fallback,
        seed=seed,
    )
    largest = max(tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    if largest < data.vocab_size:  # vocab_size is an upper bound: a small text has fewer pieces to offer
        say(f"tokenizer: the training text yields {largest:,} pieces, fewer than data.vocab_size={data.vocab_size:,}")
    return tokenizer


# the [data] keys that only shape a tokenizer tformer trains itself
TOKENIZER_TRAINING_KEYS = ("vocab_size", "tokenizer_model", "joint_vocab", "tokenizer_max_pairs", "character_coverage")


def check_embedding_sharing(share_embeddings: bool, *, joint: bool, tokenizer_dir: str | None = None) -> None:
    """Refuse one embedding matrix for separate vocabularies: source id i and target id i name unrelated
    pieces, yet would train the same row (equal sizes pass ModelConfig's own check)."""
    if not share_embeddings or joint:
        return
    if tokenizer_dir is None:
        raise ConfigError(
            "data.joint_vocab=false trains separate source and target vocabularies, but model.share_embeddings=true "
            "would give both one embedding matrix; set model.share_embeddings=false, or data.joint_vocab=true"
        )
    raise ConfigError(
        f"the tokenizer in {tokenizer_dir} has separate source and target vocabularies, but "
        "model.share_embeddings=true would give both one embedding matrix; set model.share_embeddings=false, "
        "or use a joint tokenizer"
    )


def check_same_tokenizer(tokenizer: Tokenizer, distributed: Distributed, device: torch.device) -> None:
    """Each process trains its own tokenizer (deterministic: one thread, the run's seed); refuse to go on
    if any of them differs from rank 0's, since its ids would then name other pieces."""
    if not distributed.enabled:
        return
    if distributed.differs_from_main([float(tokenizer.fingerprint())], device)[0]:  # < 2**32: exact in float64
        raise ConfigError(
            "the processes built different tokenizers from the training data; train one first "
            "(e.g. a one-process run) and give it to every process with --tokenizer DIR"
        )


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
        checkpoint = _last_checkpoint(run_dir)
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
    say = _sayer(quiet=quiet, main_process=distributed.is_main)
    experiment, step = checkpoint_load.read_experiment(checkpoint)
    if expected is not None:
        _check_same_run(experiment, expected)
        experiment = dataclasses.replace(experiment, train=expected.train, decode=expected.decode)
    experiment = _resume_overrides(experiment, overrides)
    device = resolve_device(experiment.train.device, distributed)
    check_same_experiment(experiment, distributed, device, extra={"the checkpoint resumed from": checkpoint.name})
    _warn_about_warmup(experiment.train, say)
    tokenizer = checkpoint_load.load_tokenizer(checkpoint)
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


# the [model] keys a run takes from its tokenizer, whatever a command or config file says
FROM_TOKENIZER = ("src_vocab_size", "tgt_vocab_size", "pad_id")


def check_no_tokenizer_keys(given: dict[str, Any]) -> None:
    """Refuse model.src_vocab_size, tgt_vocab_size and pad_id in the settings of a new run (nested tables
    from its config file, flags and --set): the run replaces them with its tokenizer's, so a value given
    would play no part, silently."""
    model = given.get("model")
    keys = [key for key in FROM_TOKENIZER if isinstance(model, dict) and key in model]
    if keys:
        names = ", ".join(f"model.{key}" for key in keys)
        raise ConfigError(
            f"{names} cannot be set: a run takes its vocabulary sizes and pad_id from its tokenizer; leave "
            f"{'it' if len(keys) == 1 else 'them'} out of the command and its --config file (data.vocab_size sets "
            "the size of the tokenizer tformer trains)"
        )


def resumed_experiment(run_dir: Path, given: dict[str, Any]) -> ExperimentConfig:
    """The experiment that a `--resume` command describes: the run's own, with the command's settings
    (nested tables from its config file, flags and --set) laid over it.

    A command that gives only what changes, or repeats the one that started the run, thus describes
    the run without the defaults of keys it leaves out. A [model] preset stands for its values, so a
    different preset is a changed model. Pass the result to `resume_run(expected=...)`, which refuses
    a model or data that differ from the run's and takes the train and decode sections."""
    with _earlier_checkpoint_advised(run_dir):
        stored, _ = checkpoint_load.read_experiment(_last_checkpoint(run_dir))
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


def _last_checkpoint(run_dir: Path) -> Path:
    """The checkpoint a resumed run continues from, or a one-line error saying why there is none."""
    if Path(run_dir).exists() and not Path(run_dir).is_dir():
        raise RunDirectoryError(f"nothing to resume: {run_dir} is a file, not a run directory")
    if not Path(run_dir).is_dir():
        raise RunDirectoryError(f"nothing to resume: {run_dir} does not exist")
    if not ckpt.is_run_dir(run_dir) or ckpt.read_pointer_name(run_dir, "latest") is None:
        if given_checkpoint := checkpoint_load.checkpoint_given_for_run(run_dir):
            raise RunDirectoryError(f"nothing to resume: {given_checkpoint}")
        way_out = "; start afresh with --overwrite" if replaceable(run_dir) else ", nor anything of a run: check --out"
        raise RunDirectoryError(f"nothing to resume in {run_dir}: it holds no finished checkpoint{way_out}")
    checkpoint, _ = checkpoint_load.resolve_checkpoint(run_dir, which="last")
    return checkpoint


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
        earlier = _newest_complete_checkpoint(run_dir, before=latest)
        if earlier is None:
            raise
        pointer, out = shlex.quote(str(Path(run_dir) / "latest")), shlex.quote(str(run_dir))
        raise ckpt.CheckpointError(
            f"{error}; the newest {'earlier ' if latest else ''}checkpoint that reads whole is {earlier.name}: "
            f"to resume from it, run: echo {earlier.name} > {pointer} && tformer train --out {out} --resume"
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
    for text in overrides:
        if not text.strip().startswith(("train.", "decode.")):
            raise ConfigError(f"--resume keeps the run's model and data; only train.* and decode.* may change: {text}")
    return experiment_from_dict(apply_overrides(experiment_to_dict(experiment), overrides))


def _warn_about_warmup(train: TrainConfig, say: Say) -> None:
    advice = warmup_advice(train)
    if advice is not None:
        say(advice)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _sayer(*, quiet: bool, main_process: bool) -> Say:
    """Setup's lines on stderr (see `progress.shown`: --quiet keeps only the warnings)."""

    def say(text: str) -> None:
        if shown(text, quiet=quiet, main_process=main_process):
            print(text, file=sys.stderr, flush=True)

    return say
