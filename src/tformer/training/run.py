"""Setting up a training run: read the text, get a tokenizer, encode, build the model and Trainer;
or rebuild all of that from a run's last checkpoint to resume it.

A new run seeds python's, numpy's and torch's generators from `train.seed`, so the same
configuration and data give the same run; a resumed run restores the generators from its checkpoint.
With several processes (torchrun) every process builds the same tokenizer, model and batch plan from
the same seed; torch's generator (dropout) is then offset by the rank so the processes' masks differ.
Data paths are stored absolute, so a run can be resumed from any working directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tformer.config import (
    CompileMode,
    ConfigError,
    DataConfig,
    ExperimentConfig,
    apply_overrides,
    expand_preset,
    experiment_from_dict,
    experiment_to_dict,
)
from tformer.data.batching import BatchStream, filter_overlong, sorted_batches
from tformer.data.corpus import file_digest, read_parallel
from tformer.data.encoded import EncodedPairs, encode_rows
from tformer.data.tokenizer import Tokenizer, sample_pairs
from tformer.model import Transformer, count_parameters
from tformer.runtime import Distributed, resolve_device
from tformer.training import checkpoint as ckpt
from tformer.training import encoded_cache
from tformer.training.agreement import check_same_experiment, check_shared_run_dir
from tformer.training.loop import Trainer, TrainingData
from tformer.training.run_lock import LOCK_FILE, RunLock

Say = Callable[[str], None]


class RunDirectoryError(ValueError):
    """The output directory cannot be used as asked (it holds a run, or holds nothing to resume)."""


NEW_RUN_ADVICE = "pass --resume to continue it or --overwrite to replace it"
NEW_RUN_FILES_ADVICE = "no checkpoint to resume: pass --overwrite to replace them, or choose another --out"
NEW_RUN_OTHERS_ADVICE = "no run is there to resume or replace: choose another --out, or remove the files yourself"

# What a run directory holds before its first checkpoint (or after a crash in its first save): what
# --overwrite replaces although the directory holds no run to resume.
RUN_LEFTOVERS = frozenset(
    {
        ckpt.METRICS_FILE,
        LOCK_FILE,
        ckpt.CHECKPOINTS_DIR,
        encoded_cache.CACHE_DIR,
        ".latest.tmp",
        ".best.tmp",
        "metrics.jsonl.tmp",
    }
)


def foreign_files(run_dir: Path) -> list[str]:
    """The names in the directory `run_dir` that no run leaves there, sorted."""
    return sorted(path.name for path in Path(run_dir).iterdir() if path.name not in RUN_LEFTOVERS)


def replaceable(run_dir: Path) -> bool:
    """Whether `tformer train --overwrite` replaces the directory `run_dir`: it holds a run, or only what
    a run killed before its first checkpoint leaves (a data or home directory given by mistake is not)."""
    return ckpt.is_run_dir(run_dir) or not foreign_files(run_dir)


def check_new_run_dir(
    run_dir: Path,
    *,
    advice: str = NEW_RUN_ADVICE,
    files_advice: str = NEW_RUN_FILES_ADVICE,
    others_advice: str = NEW_RUN_OTHERS_ADVICE,
) -> None:
    """Refuse to start a run in a directory that already holds anything, or at a path that is a file.

    `advice` ends the message about a run that can be resumed, `files_advice` the one about what a run
    killed before its first checkpoint leaves (nothing to resume, but --overwrite replaces it), and
    `others_advice` the one about files of no run (which --overwrite refuses to delete). The defaults name
    `tformer train`'s flags, which a command without them (such as `tformer demo`) replaces with its own
    way out."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirectoryError(f"{run_dir} is a file, not a directory; choose another --out")
    if run_dir.exists() and any(path.name != LOCK_FILE for path in run_dir.iterdir()):
        if (run_dir / "latest").is_file():
            raise RunDirectoryError(f"{run_dir} already holds a run; {advice}")
        raise RunDirectoryError(
            f"{run_dir} already holds files; {files_advice if replaceable(run_dir) else others_advice}"
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
    takes, hard-linked into its own directory, when its files, tokenizer and settings are the same."""
    distributed = distributed or Distributed()
    if not checked:
        check_new_run_dir(run_dir)
    distributed.barrier()  # every process has checked before rank 0 creates anything
    run_dir = Path(run_dir)
    created = _create_run_dir(run_dir) if distributed.is_main else []
    lock = _lock_new_run_dir(run_dir, checked=checked) if distributed.is_main else None
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
            _remove_unused(run_dir, lock, created=created)
        raise


def _create_run_dir(run_dir: Path) -> list[Path]:
    """Create the run directory before any long setup (reading the data, training the tokenizer), so
    that an unusable --out (read-only, under a file) fails at once. Returns the directories it created:
    the run directory and any missing parents, deepest first."""
    missing = []
    for path in (run_dir, *run_dir.parents):
        if path.exists():
            break
        missing.append(path)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunDirectoryError(f"cannot create the run directory {run_dir}: {error.strerror or error}") from None
    return missing


def _lock_new_run_dir(run_dir: Path, *, checked: bool) -> RunLock:
    """Lock the new run's directory, so that a second process given the same --out is refused; then
    check again that it is empty, since another run may have filled it between the first check and the
    lock. On failure the directory is another run's: nothing in it is touched."""
    lock = RunLock(run_dir)
    if not checked:
        try:
            check_new_run_dir(run_dir)
        except RunDirectoryError:
            lock.release()
            raise
    return lock


def _remove_unused(run_dir: Path, lock: RunLock, *, created: list[Path]) -> None:
    """After a failed setup: remove the encoded training data this run saved (the directory held no
    cache when the run started: it was empty), the lock file (while still holding it) and release it,
    then the directories this run created, parents of --out included (a failed setup leaves no
    directory behind, so the same command can be run again); one that is not empty, something else
    put there, stays."""
    shutil.rmtree(run_dir / encoded_cache.CACHE_DIR, ignore_errors=True)
    (run_dir / LOCK_FILE).unlink(missing_ok=True)
    lock.release()
    for directory in created:
        with contextlib.suppress(OSError):
            directory.rmdir()


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
    say = _sayer(quiet or not distributed.is_main)
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
        return tokenizer
    sources, targets = sample_pairs(corpus.sources, corpus.targets, max_pairs=data.tokenizer_max_pairs, seed=seed)
    if len(sources) < len(corpus.sources):
        say(f"tokenizer: trained on {len(sources):,} of {len(corpus.sources):,} pairs (data.tokenizer_max_pairs)")
    return Tokenizer.train(
        sources,
        targets,
        vocab_size=data.vocab_size,
        model_type=data.tokenizer_model,
        joint=data.joint_vocab,
        character_coverage=data.character_coverage,
        byte_fallback=data.byte_fallback,
        seed=seed,
    )


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
    say = _sayer(quiet or not distributed.is_main)
    experiment, step = ckpt.read_experiment(checkpoint)
    if expected is not None:
        _check_same_run(experiment, expected)
        experiment = dataclasses.replace(experiment, train=expected.train, decode=expected.decode)
    experiment = _resume_overrides(experiment, overrides)
    device = resolve_device(experiment.train.device, distributed)
    check_same_experiment(experiment, distributed, device, extra={"the checkpoint resumed from": checkpoint.name})
    tokenizer = ckpt.load_tokenizer(checkpoint)
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


def resumed_experiment(run_dir: Path, given: dict[str, Any]) -> ExperimentConfig:
    """The experiment that a `--resume` command describes: the run's own, with the command's settings
    (nested tables from its config file, flags and --set) laid over it.

    A command that gives only what changes, or repeats the one that started the run, thus describes
    the run without the defaults of keys it leaves out. A [model] preset stands for its values, so a
    different preset is a changed model. Pass the result to `resume_run(expected=...)`, which refuses
    a model or data that differ from the run's and takes the train and decode sections."""
    stored, _ = ckpt.read_experiment(_last_checkpoint(run_dir))
    values = experiment_to_dict(stored)
    for section, table in given.items():
        if section not in values or not isinstance(table, dict):
            values[section] = table  # experiment_from_dict names what is wrong with it
            continue
        values[section] = {**values[section], **(expand_preset(table) if section == "model" else table)}
    return experiment_from_dict(values)


def _last_checkpoint(run_dir: Path) -> Path:
    """The checkpoint a resumed run continues from, or a one-line error saying why there is none."""
    if Path(run_dir).exists() and not Path(run_dir).is_dir():
        raise RunDirectoryError(f"nothing to resume: {run_dir} is a file, not a run directory")
    if not Path(run_dir).is_dir():
        raise RunDirectoryError(f"nothing to resume: {run_dir} does not exist")
    if not ckpt.is_run_dir(run_dir) or ckpt.read_pointer_name(run_dir, "latest") is None:
        way_out = "; start afresh with --overwrite" if replaceable(run_dir) else ", nor anything of a run: check --out"
        raise RunDirectoryError(f"nothing to resume in {run_dir}: it holds no finished checkpoint{way_out}")
    checkpoint, _ = ckpt.resolve_checkpoint(run_dir, which="last")
    return checkpoint


def _check_same_run(stored: ExperimentConfig, given: ExperimentConfig) -> None:
    """Refuse to resume with a different model or data than the run was started with."""
    filled = dataclasses.replace(
        given.model,
        src_vocab_size=stored.model.src_vocab_size,
        tgt_vocab_size=stored.model.tgt_vocab_size,
        pad_id=stored.model.pad_id,
    )
    pairs = [("model", stored.model, filled), ("data", stored.data, absolute_data_paths(given.data))]
    for section, old, new in pairs:
        for key, value in dataclasses.asdict(old).items():
            if getattr(new, key) != value:
                raise ConfigError(
                    f"--resume: {section}.{key} is {getattr(new, key)!r} but the run has {value!r}; "
                    "a resumed run keeps its model and data (only train.* and decode.* may change)"
                )


def prepare_data(
    experiment: ExperimentConfig,
    tokenizer: Tokenizer,
    *,
    say: Say,
    run_dir: Path | None = None,
    train_text: TrainingText | None = None,
    distributed: Distributed | None = None,
    encoded_from: Path | None = None,
) -> TrainingData:
    """Encode the training pairs into a BatchStream (this process's share of the batches) and the
    validation pairs into fixed batches (all of them, on every process). With `run_dir` the training
    pairs come from its encoded cache when it matches (see `tformer.training.encoded_cache`), or from
    the matching cache of the run `encoded_from` (linked into `run_dir`), and the main process caches
    them there when neither matches; `train_text` is the training text already read."""
    distributed = distributed or Distributed()
    data, train = experiment.data, experiment.train
    special = dict(pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    pairs = _training_pairs(
        experiment,
        tokenizer,
        say=say,
        run_dir=run_dir,
        train_text=train_text,
        write_cache=distributed.is_main,
        encoded_from=encoded_from,
    )
    _fitting_pairs(pairs, train.max_tokens, what="training")
    stream = BatchStream(
        pairs,
        max_tokens=train.max_tokens,
        seed=train.seed,
        drop_overlong=True,
        rank=distributed.rank,
        world_size=distributed.world_size,
        **special,
    )
    if stream.dropped:
        say(f"train: skipped {len(stream.dropped)} pairs longer than train.max_tokens={train.max_tokens}")
    if data.valid_src is None or data.valid_tgt is None:
        return TrainingData(stream=stream)
    valid = read_parallel(data.valid_src, data.valid_tgt, max_chars=data.max_chars, strict=data.strict)
    if valid.report.kept < valid.report.total_lines:  # pairs skipped here are neither validated nor scored
        say(f"validation data: {valid.report.summary()}")
    valid_pairs, kept = _encode(
        tokenizer, valid.sources, valid.targets, max_positions=experiment.model.max_positions, say=say, name="valid"
    )
    nothing_validated = ", so nothing would be validated"
    _, overlong = _fitting_pairs(valid_pairs, train.max_tokens, what="validation", then=nothing_validated)
    if overlong:
        say(
            f"valid: skipped {len(overlong)} pairs longer than train.max_tokens={train.max_tokens} "
            "in the validation loss (BLEU/chrF still translate them)"
        )
    return TrainingData(
        stream=stream,
        valid_batches=sorted_batches(valid_pairs, max_tokens=train.max_tokens, drop_overlong=True, **special),
        valid_sources=[valid.sources[i] for i in kept],
        valid_references=[valid.targets[i] for i in kept],
    )


def _training_pairs(
    experiment: ExperimentConfig,
    tokenizer: Tokenizer,
    *,
    say: Say,
    run_dir: Path | None,
    train_text: TrainingText | None,
    write_cache: bool,
    encoded_from: Path | None = None,
) -> EncodedPairs:
    """The encoded training pairs: from `run_dir`'s cache (or `encoded_from`'s, linked into `run_dir` by
    the main process) when the corpus files, the tokenizer and the settings are those it was made from;
    else read (unless given), encoded, and cached if `write_cache`."""
    data, max_positions = experiment.data, experiment.model.max_positions
    assert data.train_src is not None and data.train_tgt is not None
    digests = None
    if run_dir is not None:
        digests = _digests(data) if train_text is None else train_text.digests
    if digests is not None:
        key = _corpus_key(experiment, tokenizer, digests)
        if encoded_from is not None and write_cache:
            encoded_cache.adopt(encoded_from, run_dir, key)
        cached = encoded_cache.load(run_dir, key)
        if cached is not None:
            if cached.skipped_overlong:
                say(_skipped_over_max_positions("train", cached.skipped_overlong, max_positions))
            return cached.pairs
    if train_text is None:
        train_text = read_training_text(data)
    pairs, kept = _encode(
        tokenizer, train_text.sources, train_text.targets, max_positions=max_positions, say=say, name="train"
    )
    if run_dir is not None and write_cache:
        cached = encoded_cache.CachedCorpus(pairs, skipped_overlong=len(train_text.sources) - len(kept))
        problem = encoded_cache.save(run_dir, _corpus_key(experiment, tokenizer, train_text.digests), cached)
        if problem is not None:
            say(f"warning: the encoded training data could not be saved ({problem}); a resume will encode it again")
    return pairs


def _corpus_key(
    experiment: ExperimentConfig, tokenizer: Tokenizer, digests: tuple[str, str]
) -> encoded_cache.CorpusKey:
    return encoded_cache.CorpusKey(
        source_digest=digests[0],
        target_digest=digests[1],
        tokenizer=tokenizer.fingerprint(),
        max_chars=experiment.data.max_chars,
        strict=experiment.data.strict,
        max_positions=experiment.model.max_positions,
    )


@dataclasses.dataclass(frozen=True)
class TrainingText:
    """The training corpus as read, with its files' digests taken before reading them: an encoded cache
    is then keyed by the bytes that were read, even if a file changes while the tokenizer trains."""

    sources: list[str]
    targets: list[str]
    digests: tuple[str, str]
    summary: str  # what reading kept and skipped


def read_training_text(data: DataConfig) -> TrainingText:
    assert data.train_src is not None and data.train_tgt is not None
    digests = _digests(data)
    corpus = read_parallel(data.train_src, data.train_tgt, max_chars=data.max_chars, strict=data.strict)
    if digests is None:  # read after all: the file appeared after its digest was tried
        digests = (file_digest(data.train_src), file_digest(data.train_tgt))
    return TrainingText(corpus.sources, corpus.targets, digests, corpus.report.summary())


def _digests(data: DataConfig) -> tuple[str, str] | None:
    """The digests of the two training files, or None when one cannot be read (reading it says why)."""
    assert data.train_src is not None and data.train_tgt is not None
    try:
        return file_digest(data.train_src), file_digest(data.train_tgt)
    except OSError:
        return None


def _fitting_pairs(pairs: EncodedPairs, max_tokens: int, *, what: str, then: str = "") -> tuple[list[int], list[int]]:
    """Indices of the pairs that fit a batch of max_tokens token slots, and of those that do not; refused
    in one line when none fits."""
    if len(pairs) == 0:
        raise ConfigError(f"no {what} pair is left: every one is longer than model.max_positions allows")
    lengths_R2 = pairs.lengths_R2
    fitting, overlong = filter_overlong(lengths_R2, max_tokens)
    if not fitting:
        shortest = int(lengths_R2.max(axis=1).min()) + 1
        raise ConfigError(
            f"every {what} pair needs more than train.max_tokens={max_tokens} token slots "
            f"(the shortest needs {shortest}){then}; raise train.max_tokens"
        )
    return fitting, overlong


def _encode(
    tokenizer: Tokenizer, sources: list[str], targets: list[str], *, max_positions: int, say: Say, name: str
) -> tuple[EncodedPairs, np.ndarray]:
    """Token pairs that fit the model (with eos/bos added, at most max_positions), and their indices."""
    encoded = EncodedPairs(
        encode_rows(tokenizer.encode_sources, sources), encode_rows(tokenizer.encode_targets, targets)
    )
    kept_R = np.flatnonzero(encoded.lengths_R2.max(axis=1) + 1 <= max_positions)
    if len(kept_R) == len(encoded):
        return encoded, kept_R
    say(_skipped_over_max_positions(name, len(encoded) - len(kept_R), max_positions))
    if len(kept_R) == 0:
        raise ConfigError(f"{name}: no pair fits model.max_positions={max_positions}; raise it")
    return encoded.take(kept_R), kept_R


def _skipped_over_max_positions(name: str, skipped: int, max_positions: int) -> str:
    """One line whether the pairs were just encoded or their count comes from the encoded cache."""
    return f"{name}: skipped {skipped} pairs longer than model.max_positions={max_positions}"


def _resume_overrides(experiment: ExperimentConfig, overrides: Sequence[str]) -> ExperimentConfig:
    for text in overrides:
        if not text.strip().startswith(("train.", "decode.")):
            raise ConfigError(f"--resume keeps the run's model and data; only train.* and decode.* may change: {text}")
    return experiment_from_dict(apply_overrides(experiment_to_dict(experiment), overrides))


def absolute_data_paths(data: DataConfig) -> DataConfig:
    """Resolve relative paths against data.data_dir (or the working directory), once, at the start."""
    base = Path(data.data_dir) if data.data_dir is not None else Path.cwd()
    fields = ("train_src", "train_tgt", "valid_src", "valid_tgt", "tokenizer")
    absolute = {name: str((base / getattr(data, name)).resolve()) for name in fields if getattr(data, name) is not None}
    if data.data_dir is not None:
        absolute["data_dir"] = str(base.resolve())
    return dataclasses.replace(data, **absolute)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _sayer(quiet: bool) -> Say:
    def say(text: str) -> None:
        if not quiet:
            print(text, file=sys.stderr, flush=True)

    return say
