"""The text a training run learns from: the training and validation pairs read, encoded and batched
for the Trainer, the training pairs taken from the run's encoded cache when it matches (see
`tformer.training.encoded_cache`). Data paths are stored absolute, so a run can be resumed from any
working directory."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tformer.config import ConfigError, DataConfig, ExperimentConfig
from tformer.data.batching import BatchStream, filter_overlong, sorted_batches
from tformer.data.corpus import CorpusError, ParallelCorpus, file_digest, read_parallel
from tformer.data.encoded import EncodedPairs, encode_rows
from tformer.data.tokenizer import Tokenizer
from tformer.runtime import Distributed
from tformer.training import encoded_cache
from tformer.training.loop import TrainingData

Say = Callable[[str], None]


def prepare_data(
    experiment: ExperimentConfig,
    tokenizer: Tokenizer,
    *,
    say: Say,
    run_dir: Path | None = None,
    train_text: TrainingText | None = None,
    valid_text: ParallelCorpus | None = None,
    distributed: Distributed | None = None,
    encoded_from: Path | None = None,
) -> TrainingData:
    """Encode the training pairs into a BatchStream (this process's share of the batches) and the
    validation pairs into fixed batches (all of them, on every process). With `run_dir` the training
    pairs come from its encoded cache when it matches (see `tformer.training.encoded_cache`), or from
    the matching cache of the run `encoded_from` (linked into `run_dir`), and the main process caches
    them there when neither matches; `train_text` and `valid_text` are the text already read."""
    distributed = distributed or Distributed()
    data, train = experiment.data, experiment.train
    valid = valid_text if valid_text is not None else read_validation_text(data)  # first: a bad file fails early
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
    if valid is None:
        return TrainingData(stream=stream)
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
    valid_batches = sorted_batches(valid_pairs, max_tokens=train.max_tokens, drop_overlong=True, **special)
    if len(valid_batches) > train.valid_every:  # each batch's forward pass costs about a third of a training step
        say(
            f"warning: the validation set makes {len(valid_batches):,} batches, more than the train.valid_every="
            f"{train.valid_every} training steps between validations, so the run spends much of its time on the "
            "validation loss; validate on fewer pairs (a few thousand), or raise train.valid_every"
        )
    return TrainingData(
        stream=stream,
        valid_batches=valid_batches,
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
        _say_changed_files(run_dir, digests, data, say)
    if train_text is None:
        train_text = read_training_text(data)
        say(f"training data: {train_text.summary}")
    say(f"train: encoding {len(train_text.sources):,} pairs")  # minutes on millions of pairs: say what it is doing
    pairs, kept = _encode(
        tokenizer, train_text.sources, train_text.targets, max_positions=max_positions, say=say, name="train"
    )
    if run_dir is not None and write_cache:
        cached = encoded_cache.CachedCorpus(pairs, skipped_overlong=len(train_text.sources) - len(kept))
        problem = encoded_cache.save(run_dir, _corpus_key(experiment, tokenizer, train_text.digests), cached)
        if problem is not None:
            say(f"warning: the encoded training data could not be saved ({problem}); a resume will encode it again")
    return pairs


def _say_changed_files(run_dir: Path, digests: tuple[str, str], data: DataConfig, say: Say) -> None:
    """A resume goes on with the text the training files hold now; say so when they are not what the run
    encoded before (its cache tells), since the epoch under way is then cut from other pairs."""
    earlier = encoded_cache.stored_digests(run_dir)
    if not earlier or digests in earlier:
        return
    paths = (data.train_src, data.train_tgt)
    # a file given as both source and target is named once
    changed = " and ".join(
        dict.fromkeys(str(path) for path, now, then in zip(paths, digests, earlier[0], strict=True) if now != then)
    )
    say(
        f"warning: {changed} changed since this run encoded the training data; it goes on with the text there "
        "now (the rest of this epoch is cut from it, so it repeats some pairs and skips others)"
    )


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
    _check_found(data, "train_src", "train_tgt")
    digests = _digests(data)
    corpus = read_parallel(data.train_src, data.train_tgt, max_chars=data.max_chars, strict=data.strict)
    if digests is None:  # read after all: the file appeared after its digest was tried
        digests = (file_digest(data.train_src), file_digest(data.train_tgt))
    return TrainingText(corpus.sources, corpus.targets, digests, corpus.report.summary())


def read_validation_text(data: DataConfig) -> ParallelCorpus | None:
    """The validation pairs, or None without a validation set. A run reads them before its slow steps
    (training a tokenizer, encoding the corpus), so that a missing, undecodable or misaligned file fails
    at once, not minutes later."""
    if data.valid_src is None or data.valid_tgt is None:
        return None
    _check_found(data, "valid_src", "valid_tgt")
    return read_parallel(data.valid_src, data.valid_tgt, max_chars=data.max_chars, strict=data.strict)


def _check_found(data: DataConfig, *names: str) -> None:
    """A data file that does not exist is named with its setting and flag (`file not found: PATH` alone
    left the user to guess which of four paths, given where)."""
    for name in names:
        path = getattr(data, name)
        if not os.path.exists(path):
            flag = "--" + name.replace("_", "-")
            raise CorpusError(
                f"data.{name} not found: {path} (set by {flag} or data.{name} in the config; a relative path is "
                "read from data.data_dir, or else the working directory)"
            )


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
    fits_R = encoded.lengths_R2.max(axis=1) + 1 <= max_positions
    kept_R = np.flatnonzero(fits_R)
    if len(kept_R) == len(encoded):
        return encoded, kept_R
    say(_skipped_over_max_positions(name, len(encoded) - len(kept_R), max_positions))
    if len(kept_R) == 0:
        raise ConfigError(f"{name}: no pair fits model.max_positions={max_positions}; raise it")
    return encoded.keep(fits_R), kept_R


def _skipped_over_max_positions(name: str, skipped: int, max_positions: int) -> str:
    """One line whether the pairs were just encoded or their count comes from the encoded cache."""
    return f"{name}: skipped {skipped} pairs longer than model.max_positions={max_positions}"


def absolute_data_paths(data: DataConfig) -> DataConfig:
    """Resolve relative paths against data.data_dir (or the working directory), once, at the start; a
    pipe is refused, since a run reads its text more than once (a digest, the text, and a resume). A leading
    ~ is the home directory (a config file's "~/data/train.de" was read as a directory named ~ here)."""
    data = dataclasses.replace(data, **_home_expanded(data))
    base = Path(data.data_dir) if data.data_dir is not None else Path.cwd()
    for name in ("train_src", "train_tgt", "valid_src", "valid_tgt"):
        if getattr(data, name) == "-":  # read as a file named - in the working directory: "not found"
            raise ConfigError(
                f"data.{name} is - (standard input), which cannot be a run's data: a run reads its text more "
                "than once, and a --resume again; write it to a file first"
            )
        path = None if getattr(data, name) is None else base / getattr(data, name)
        # (a directory is named as such where it is read)
        if path is not None and path.exists() and not path.is_file() and not path.is_dir():
            raise ConfigError(
                f"data.{name} {getattr(data, name)} is a pipe or a device, not a file (as <(...) gives): a run "
                "reads its text more than once, and a --resume again; write it to a file first"
            )
    absolute = {} if data.data_dir is None else {"data_dir": _resolved(base, f"data.data_dir {data.data_dir}")}
    for name in ("train_src", "train_tgt", "valid_src", "valid_tgt", "tokenizer"):
        if getattr(data, name) is not None:
            absolute[name] = _resolved(base / getattr(data, name), f"data.{name} {getattr(data, name)}")
    return dataclasses.replace(data, **absolute)


def _home_expanded(data: DataConfig) -> dict[str, str]:
    """The data paths that begin with ~, the home directory put in its place (where it is known)."""
    names = ("data_dir", "train_src", "train_tgt", "valid_src", "valid_tgt", "tokenizer")
    return {name: os.path.expanduser(value) for name in names if str(value := getattr(data, name)).startswith("~")}


def _resolved(path: Path, named: str) -> str:
    """`path` made absolute, its links followed; a loop of symbolic links (a link to itself) is refused
    naming the setting, where Path.resolve raised RuntimeError (OSError from Python 3.13 on)."""
    try:
        return str(path.resolve())
    except (OSError, RuntimeError) as error:
        raise ConfigError(
            f"{named} cannot be followed: it is a loop of symbolic links (a link that leads back to itself); "
            "point it at the file or directory meant"
        ) from error
