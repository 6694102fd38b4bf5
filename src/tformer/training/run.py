"""Setting up a new training run: read the text, get a tokenizer, encode, build the model and Trainer.
(Rebuilding all of that from a run's last checkpoint to resume it is resume.py's job.) The run's
directory is checked, created and locked by `run_directory`; its text is read and encoded by
`training_text`.

A new run seeds python's, numpy's and torch's generators from `train.seed`, so the same
configuration and data give the same run; a resumed run restores the generators from its checkpoint.
With several processes (torchrun) every process builds the same tokenizer, model and batch plan from
the same seed; torch's generator (dropout) is then offset by the rank so the processes' masks differ.
"""

from __future__ import annotations

import dataclasses
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tformer.config import (
    CompileMode,
    ConfigError,
    DataConfig,
    ExperimentConfig,
    TrainConfig,
)
from tformer.config.pieces import smallest_vocab_size
from tformer.data.tokenizer import JOINT_FILE, SRC_FILE, TGT_FILE, Tokenizer, sample_pairs, unknown_characters
from tformer.input_paths import check_input_dir
from tformer.model import Transformer, count_parameters
from tformer.model.size import check_fits_in_memory
from tformer.runtime import Distributed, resolve_device
from tformer.training.agreement import check_same_experiment, check_shared_run_dir
from tformer.training.loop import Trainer
from tformer.training.progress import shown
from tformer.training.run_directory import (
    check_new_run_dir,
    create_run_dir,
    lock_new_run_dir,
    new_run_advice,
    remove_unused,
)
from tformer.training.run_lock import RunLock
from tformer.training.schedule import unused_schedule_setting, warmup_advice
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
        check_new_run_dir(run_dir, **new_run_advice(processes=distributed.world_size))
    distributed.barrier()  # every process has checked before rank 0 creates anything
    run_dir = Path(run_dir)
    created = create_run_dir(run_dir) if distributed.is_main else []
    lock = lock_new_run_dir(run_dir, checked=checked, processes=distributed.world_size) if distributed.is_main else None
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
    say = sayer(quiet=quiet, main_process=distributed.is_main)
    data = absolute_data_paths(experiment.data)
    check_tokenizer_dir(data.tokenizer)
    device = resolve_device(experiment.train.device, distributed)
    check_same_experiment(dataclasses.replace(experiment, data=data), distributed, device)
    check_shared_run_dir(run_dir, distributed, device)  # rank 0 created it before the check's collectives
    if data.train_src is None or data.train_tgt is None:
        raise ConfigError("no training data: set data.train_src and data.train_tgt (or --train-src/--train-tgt)")
    if experiment.train.patience > 0 and data.valid_src is None:
        raise ConfigError("train.patience > 0 needs a validation set (data.valid_src and data.valid_tgt)")
    if data.tokenizer is None:
        check_embedding_sharing(experiment.model.share_embeddings, joint=data.joint_vocab)
    # a given tokenizer is loaded and checked before the text is read
    given = _given_tokenizer(data, share_embeddings=experiment.model.share_embeddings)
    # the smallest vocabulary a tokenizer can have: a model too large even with it is refused before the data is read
    smallest = smallest_vocab_size(byte_fallback=data.byte_fallback)
    check_fits_in_memory(dataclasses.replace(experiment.model, src_vocab_size=smallest, tgt_vocab_size=smallest))
    warn_about_schedule(experiment.train, say)  # once the settings are known to be ones it trains with
    valid_text = read_validation_text(data)  # small: its errors come before the training text is even read
    corpus = read_training_text(data)
    say(f"training data: {corpus.summary}")
    tokenizer = _run_tokenizer(data, corpus, given, seed=experiment.train.seed, say=say)
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


def check_tokenizer_dir(directory: str | None) -> None:
    """data.tokenizer names a directory holding a tokenizer, said before anything starts: it was found out
    only once the training text was read, a missing directory as 'no tokenizer in X'."""
    if directory is None:
        return
    path = check_input_dir(directory, f"data.tokenizer {directory}", holding="tokenizer", error=ConfigError)
    if not (path / JOINT_FILE).exists() and not ((path / SRC_FILE).exists() and (path / TGT_FILE).exists()):
        raise ConfigError(
            f"data.tokenizer {directory}: no tokenizer in it (expected {JOINT_FILE}, or {SRC_FILE} and {TGT_FILE})"
            f"{_rename_advice(path)}"
        )


def _rename_advice(path: Path) -> str:
    """What to rename, where the directory holds sentencepiece models under other names (en-de.model,
    source.spm, sentencepiece.bpe.model, as other toolkits write them), or the side whose model is missing."""
    halves = [name for name in (SRC_FILE, TGT_FILE) if (path / name).is_file()]
    if len(halves) == 1:  # the other name's advice would tell to copy a model to the name it already has
        missing = TGT_FILE if halves == [SRC_FILE] else SRC_FILE
        return f"; it holds {halves[0]} without {missing}: add the other side's model as {missing}"
    try:
        models = sorted(item.name for item in path.iterdir() if item.suffix in (".model", ".spm") and item.is_file())
    except OSError:  # unreadable: the names cannot help
        return ""
    if not models:
        return ""
    shown = ", ".join(models[:3]) + (", ..." if len(models) > 3 else "")
    both, each = JOINT_FILE, f"{SRC_FILE} and {TGT_FILE}"
    return f"; it holds {shown}: copy a model of both languages to {both}, or one per side to {each}"


def _given_tokenizer(data: DataConfig, *, share_embeddings: bool) -> Tokenizer | None:
    """The tokenizer data.tokenizer names (None: the run trains one), loaded and checked before the text is
    read: a corrupt file or a model without a pad piece was refused only once a large corpus had been read."""
    if data.tokenizer is None:
        return None
    tokenizer = Tokenizer.from_files(data.tokenizer)
    if data.byte_fallback and not tokenizer.byte_fallback:
        raise ConfigError(
            f"data.byte_fallback = true, but the tokenizer in {data.tokenizer} has no byte pieces: retrain it "
            "with --byte_fallback=true, or leave out data.tokenizer and let tformer train one"
        )
    check_embedding_sharing(share_embeddings, joint=tokenizer.joint, tokenizer_dir=data.tokenizer)
    return tokenizer


def _run_tokenizer(
    data: DataConfig, corpus: TrainingText, given: Tokenizer | None, *, seed: int, say: Say
) -> Tokenizer:
    """The tokenizer named by data.tokenizer (`given`), or one trained on (a sample of) the training text."""
    if given is not None and data.tokenizer is not None:
        tokenizer = given
        defaults = {item.name: item.default for item in dataclasses.fields(DataConfig)}
        unused = [
            f"data.{key}={getattr(data, key)}" for key in TOKENIZER_TRAINING_KEYS if getattr(data, key) != defaults[key]
        ]
        if unused:  # set (by a recipe or by hand), but a given tokenizer has its own
            verb = "plays" if len(unused) == 1 else "play"
            say(f"tokenizer: {data.tokenizer} is used as it is, so {', '.join(unused)} {verb} no part")
        _warn_unknown_share(tokenizer, corpus, data.tokenizer, seed=seed, say=say)
        return tokenizer
    sources, targets = sample_pairs(corpus.sources, corpus.targets, max_pairs=data.tokenizer_max_pairs, seed=seed)
    # said before it starts: on a large corpus the minute or so of sentencepiece's training is otherwise silent
    if len(sources) < len(corpus.sources):
        say(f"tokenizer: training on {len(sources):,} of {len(corpus.sources):,} pairs (data.tokenizer_max_pairs)")
    else:
        say(f"tokenizer: training on {len(sources):,} pairs")
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


UNKNOWN_SAMPLE_PAIRS = 1000  # pairs encoded to measure a given tokenizer's <unk> share: a moment on any corpus
UNKNOWN_SHARE_WARNED = 0.01  # of a side's pieces: well above the rare characters a coverage below 1.0 leaves out


def _warn_unknown_share(tokenizer: Tokenizer, corpus: TrainingText, directory: str, *, seed: int, say: Say) -> None:
    """A given tokenizer made for other text (another script, another language) reads much of this text as
    <unk>, and the model then learns to read and write <unk>, without a word: said before the run encodes it."""
    sources, targets = sample_pairs(corpus.sources, corpus.targets, max_pairs=UNKNOWN_SAMPLE_PAIRS, seed=seed)
    sides = (
        ("source", sources, tokenizer.source_pieces, tokenizer.encode_source),
        ("target", targets, tokenizer.target_pieces, tokenizer.encode_target),
    )
    for side, texts, pieces_of, encode in sides:
        pieces = [(piece, i) for text in texts for piece, i in zip(pieces_of(text), encode(text), strict=True)]
        unknown = [piece for piece, i in pieces if i == tokenizer.unk_id]
        if pieces and len(unknown) / len(pieces) > UNKNOWN_SHARE_WARNED:
            characters = unknown_characters(unknown)
            shown = " ".join(c for c, _ in characters.most_common(10))
            say(
                f"warning: {len(unknown) / len(pieces):.0%} of the {side} pieces of the training text are <unk>: the "
                f"tokenizer in {directory} has no piece for {len(characters)} of its characters ({shown}), which the "
                "model cannot learn to read or write; give a tokenizer trained on text in this language (or with "
                "--byte_fallback=true), or leave out data.tokenizer and let tformer train one"
            )


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


def warn_about_schedule(train: TrainConfig, say: Say) -> None:
    """The learning-rate settings that will not do what they seem to: a warm-up the run never finishes, a
    rate setting of the schedule not in use."""
    for advice in (warmup_advice(train), unused_schedule_setting(train)):
        if advice is not None:
            say(advice)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sayer(*, quiet: bool, main_process: bool) -> Say:
    """Setup's lines on stderr (see `progress.shown`: --quiet keeps only the warnings)."""

    def say(text: str) -> None:
        if shown(text, quiet=quiet, main_process=main_process):
            print(text, file=sys.stderr, flush=True)

    return say
