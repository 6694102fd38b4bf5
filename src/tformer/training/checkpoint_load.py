"""Loading a run or one checkpoint: finding it, then reading its experiment, tokenizer, weights and
trainer state, each checked so that a damaged or foreign file is named rather than half-used.

`load_run` is what translating needs (model, tokenizer, experiment); resuming a run also reads the
trainer state (`load_trainer_state`). Nothing here unpickles a file a user may receive from someone
else: weights are safetensors, the trainer state is read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model

from tformer import __version__
from tformer.caller_warnings import warn_caller
from tformer.config import ConfigError, ExperimentConfig, experiment_from_dict, preset_of
from tformer.data.tokenizer import Tokenizer
from tformer.input_paths import read_at_most, readable_name
from tformer.interop.marian_tokenizer import MARKER_FILE as VOCAB_TOKENIZER_MARKER
from tformer.interop.marian_tokenizer import VocabTokenizer
from tformer.model import Transformer, count_parameters
from tformer.model.size import check_fits_in_memory
from tformer.runtime import one_thread_after_fork
from tformer.training.checkpoint import (
    CHECKPOINTS_DIR,
    EXPERIMENT_FILE,
    FORMAT_VERSION,
    STATE_FILE,
    TOKENIZER_DIR,
    TOKENIZER_FINGERPRINT,
    WEIGHTS_FILE,
    CheckpointError,
    directory_identity,
    is_run_dir,
    read_pointer_name,
)
from tformer.training.checkpoint_weights import not_floating_point, weights_disagreement


@dataclass
class LoadedRun:
    """What `load_run` gives: the model (in eval mode), its tokenizer, and the experiment it was trained with."""

    model: Transformer
    tokenizer: Tokenizer | VocabTokenizer
    experiment: ExperimentConfig
    step: int
    run_dir: Path | None
    checkpoint_dir: Path

    def __repr__(self) -> str:
        """One line: the default listed every layer of the model and every setting of the experiment."""
        weights = next(self.model.parameters())
        return (
            f"LoadedRun({str(self.checkpoint_dir)!r}, step={self.step}, model=Transformer("
            f"{preset_of(self.model.config) or 'custom'}, {count_parameters(self.model):,} parameters, "
            f"{weights.dtype} on {weights.device}), tokenizer={self.tokenizer!r})"
        )


def checkpoint_given_for_run(path: Path) -> str | None:
    """Where a command wants a run directory but `path` is one checkpoint (`translate` and `evaluate` take
    either): the line that says so and names the run that holds it; None for anything else."""
    path = Path(path)
    if not (path / EXPERIMENT_FILE).is_file():
        return None
    run = path.parent.parent
    if path.parent.name == CHECKPOINTS_DIR and is_run_dir(run):
        return f"{path} is one checkpoint of the run {run}, not a run directory; give {run}"
    return f"{path} is one checkpoint, not a run directory"


def resolve_checkpoint(path: str | Path, *, which: str = "best") -> tuple[Path, Path | None]:
    """(checkpoint dir, run dir or None) for a run dir (via its `which` pointer) or a checkpoint dir.

    A run without a `best` checkpoint (no validation set, or none measured yet when it stopped: the best is
    chosen at validation) resolves "best" to its last checkpoint."""
    if which not in ("best", "last"):
        raise CheckpointError(f"which must be 'best' or 'last', got {which!r}")
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such run or checkpoint directory: {path}")
    if (path / EXPERIMENT_FILE).exists():
        run_dir = path.parent.parent if path.parent.name == CHECKPOINTS_DIR else None
        return path, run_dir
    if not is_run_dir(path):
        raise CheckpointError(f"{path} is neither a run directory nor a checkpoint (no {EXPERIMENT_FILE})")
    name = _pointed(path, which)
    if name is None:
        raise CheckpointError(f"{path} holds no finished checkpoint yet (no 'latest' pointer)")
    checkpoint = path / CHECKPOINTS_DIR / name
    if not (checkpoint / EXPERIMENT_FILE).exists() and (moved := _pointed(path, which)) not in (None, name):
        name, checkpoint = moved, path / CHECKPOINTS_DIR / moved  # training moved it on, then pruned what it named
    if not (checkpoint / EXPERIMENT_FILE).exists():
        raise CheckpointError(f"{path}: pointer names {name}, but {checkpoint / EXPERIMENT_FILE} is missing")
    return checkpoint, path


def _pointed(run_dir: Path, which: str) -> str | None:
    """The checkpoint name that `which` ("best", or else "last") finds in the run's pointers."""
    name = read_pointer_name(run_dir, "best") if which == "best" else None
    return name or read_pointer_name(run_dir, "latest")


def read_experiment(checkpoint_dir: Path) -> tuple[ExperimentConfig, int]:
    """The ExperimentConfig and step recorded in a checkpoint, after checking its format version."""
    path = Path(checkpoint_dir) / EXPERIMENT_FILE
    try:
        document = json.loads(_experiment_text(path))
    except FileNotFoundError:
        raise CheckpointError(f"missing checkpoint file: {path}") from None
    except CheckpointError:  # one over the size a description reaches
        raise
    except (OSError, ValueError, RecursionError) as error:  # ValueError: not UTF-8, not JSON, an int of 5,000 digits
        raise CheckpointError(f"{path}: unreadable or corrupt ({type(error).__name__})") from None
    if not isinstance(document, dict) or "format_version" not in document:
        raise CheckpointError(f"{path}: not a tformer checkpoint description (no format_version)")
    version = document["format_version"]
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format_version {version} (written by tformer {document.get('tformer_version')}) "
            f"is not supported; this tformer {__version__} reads format_version {FORMAT_VERSION}"
        )
    if not isinstance(document.get("experiment"), dict):
        raise CheckpointError(f"{path}: invalid experiment description: 'experiment' must be a table of sections")
    try:
        experiment, step = experiment_from_dict(document["experiment"]), _step(document["step"])
    except (KeyError, TypeError, ValueError) as error:
        writer = document.get("tformer_version")
        if writer is not None and writer != __version__:  # e.g. a key that a newer tformer added
            raise CheckpointError(
                f"{path}: written by tformer {writer}, which this tformer {__version__} cannot read: {error}"
            ) from None
        raise CheckpointError(f"{path}: invalid experiment description: {error}") from None
    try:  # here, to name the file: a received one may describe a model no memory holds
        check_fits_in_memory(experiment.model)
    except ConfigError as error:
        raise CheckpointError(f"{path}: {error}") from None
    return experiment, step


def _step(value: Any) -> int:
    """The recorded step, which tformer writes as a JSON integer: int() of any other value raised
    OverflowError for infinity (a traceback) and read 1e300 or 2.5 as a step."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"step must be an integer >= 0, got {value!r:.40}")
    return value


EXPERIMENT_MAX_BYTES = 1 << 20  # a few kilobytes as written; a received one may be huge, or a link to /dev/zero


def _experiment_text(path: Path) -> str:
    """experiment.json's text, read no further than a description can reach (whole, it filled the memory)."""
    if path.is_fifo():  # opening one waits for a writer: the command hung, without a word
        raise CheckpointError(f"{path}: a named pipe (FIFO), not a checkpoint description")
    raw = read_at_most(path, EXPERIMENT_MAX_BYTES)
    if raw is None:
        raise CheckpointError(
            f"{path}: over {EXPERIMENT_MAX_BYTES:,} bytes, not a checkpoint description (tformer writes kilobytes)"
        )
    return raw.decode("utf-8")


def load_tokenizer(checkpoint_dir: Path) -> Tokenizer | VocabTokenizer:
    directory = Path(checkpoint_dir) / TOKENIZER_DIR
    if not directory.is_dir():
        raise CheckpointError(f"missing checkpoint directory: {directory}")
    if (directory / VOCAB_TOKENIZER_MARKER).is_file():  # an imported Marian tokenizer (tformer.interop)
        tokenizer: Tokenizer | VocabTokenizer = VocabTokenizer.from_files(directory)
    else:
        tokenizer = Tokenizer.from_files(directory)
    # sentencepiece reads a model file cut short between two of its fields as a smaller model (fewer pieces,
    # or no normalisation rules) that splits text differently: compare with the fingerprint saved beside it
    recorded = _recorded(Path(checkpoint_dir), TOKENIZER_FINGERPRINT)
    if recorded is not None and recorded != tokenizer.fingerprint():
        raise CheckpointError(
            f"{directory}: the tokenizer files are not those this checkpoint was saved with (damaged or replaced: "
            f"their fingerprint differs from {EXPERIMENT_FILE}'s)"
        )
    return tokenizer


def _recorded(checkpoint_dir: Path, key: str) -> Any:
    """A value that `write_checkpoint` recorded in experiment.json (None in checkpoints written before it
    did, or where the file cannot be read: read_experiment says why)."""
    try:
        document = json.loads(_experiment_text(checkpoint_dir / EXPERIMENT_FILE))
    except (OSError, ValueError, RecursionError):  # CheckpointError is a ValueError
        return None
    return document.get(key) if isinstance(document, dict) else None


def load_weights(model: Transformer, checkpoint_dir: Path) -> None:
    """Fill `model` from model.safetensors; every key must match (shared tensors stored once). A model
    built on the meta device (`load_run`'s) is given the file's tensors instead of copying into its own."""
    path = Path(checkpoint_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file: {path}")
    try:
        if (wrong := not_floating_point(path)) is not None:
            raise CheckpointError(f"{path}: the tensor {wrong} holds no floating-point numbers: not a model's weights")
        with readable_name(path) as name:
            if any(parameter.is_meta for parameter in model.parameters()):
                _assign_weights(model, name)
            else:
                load_model(model, name, strict=True)
    except SafetensorError as error:
        raise CheckpointError(f"{path}: corrupt or truncated weights ({error})") from None
    except RuntimeError as error:  # torch's message lists every tensor, over many lines: summarise it in one
        disagreement = weights_disagreement(model, path)
        reason = disagreement or " ".join(str(error).split())
        raise CheckpointError(f"{path}: weights do not match the model in {EXPERIMENT_FILE}: {reason}") from None


def refuse_non_finite(model: Transformer, checkpoint_dir: Path, *, advice: str) -> None:
    """Refuse weights holding NaN or infinities (saved as a run diverged, or damaged): a model that
    translates nothing (beam search returned no translation at all, and translate failed with an IndexError)
    and passes them on to an average (a NaN summed is NaN). `advice` ends the line."""
    state = model.state_dict()
    spoilt = [name for name, tensor in state.items() if not bool(torch.isfinite(tensor).all())]
    if spoilt:
        raise CheckpointError(
            f"{Path(checkpoint_dir) / WEIGHTS_FILE}: {len(spoilt)} of {len(state)} tensors hold NaN or infinite "
            f"values (first {spoilt[0]}), as after a run diverged; {advice}"
        )


def _assign_weights(model: Transformer, path: str) -> None:
    """Give a model built on the meta device the tensors of the file `path` names, in the model's dtypes,
    copied out of the file's memory map (so that nothing depends on the file afterwards). Keys and shapes
    are compared first: a tensor that does not fit is never copied."""
    file_state = load_file(path)
    expected = model.state_dict()
    if file_state.keys() != expected.keys() or any(file_state[k].shape != v.shape for k, v in expected.items()):
        raise RuntimeError("the file's tensors are not the model's")  # load_weights names the difference
    owned = {name: tensor.to(expected[name].dtype, copy=True) for name, tensor in file_state.items()}
    model.load_state_dict(owned, strict=True, assign=True)


def load_trainer_state(checkpoint_dir: Path) -> dict[str, Any]:
    path = Path(checkpoint_dir) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged file; all mean the same here
        raise CheckpointError(f"{path}: corrupt or truncated trainer state ({type(error).__name__})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a trainer state of format_version {FORMAT_VERSION}")
    return state


def load_run(
    path: str | Path, *, which: str = "best", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> LoadedRun:
    """Model (in eval mode, its weights in `dtype` on `device`), tokenizer and experiment of a run dir (its
    best or last checkpoint) or of one checkpoint dir; everything needed to translate, nothing else.

    A run dir's decoding and training settings are its latest checkpoint's, whichever checkpoint gives the
    weights: a resume may change them (`train --resume --set decode.beam_size=1`, `--set
    train.bleu_tokenize=zh`, which `evaluate` scores with), and its best checkpoint, older, still holds the
    settings it was saved with. One checkpoint dir keeps its own."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:  # else nn.Module.to's, after the reading
        raise TypeError(f"dtype must be a floating-point torch.dtype such as torch.bfloat16, got {dtype!r}")

    def read(checkpoint: Path, run_dir: Path | None) -> LoadedRun:
        experiment, step = read_experiment(checkpoint)
        if Path(path) == run_dir:
            experiment = latest_settings(run_dir, checkpoint, experiment)
        tokenizer = load_tokenizer(checkpoint)
        with torch.device("meta"):  # no memory and no random numbers for weights that the checkpoint's replace
            model = Transformer(experiment.model)
        load_weights(model, checkpoint)
        refuse_non_finite(model, checkpoint, advice="use a checkpoint saved before it (give its directory)")
        return LoadedRun(model, tokenizer, experiment, step, run_dir, checkpoint)

    one_thread_after_fork()  # reading uses torch's thread pool, which a forked child cannot use
    loaded = read_resolved(path, which=which, read=read)
    loaded.model = loaded.model.to(device=device, dtype=dtype).eval()
    return loaded


Chosen = TypeVar("Chosen")
Read = TypeVar("Read")


def read_resolved(path: str | Path, *, which: str, read: Callable[[Path, Path | None], Read]) -> Read:
    """`read(checkpoint, run_dir)` of what `resolve_checkpoint` finds, chosen and read again where it changed
    meanwhile (read_unchanged)."""

    def choose() -> tuple[tuple[Path, Path | None], list[Path]]:
        checkpoint, run_dir = resolve_checkpoint(path, which=which)
        return (checkpoint, run_dir), [checkpoint] if run_dir is None else [checkpoint, run_dir]

    return read_unchanged(Path(path), choose, lambda chosen: read(*chosen))


READ_ATTEMPTS = 3  # a run pruned or replaced that often while it is read is a run to read later


def read_unchanged(what: Path, choose: Callable[[], tuple[Chosen, list[Path]]], read: Callable[[Chosen], Read]) -> Read:
    """`read(chosen)` of what `choose` picks, checking that the directories it names are the same before and
    after: files are read one by one, and meanwhile a training run may prune the checkpoint read, or `train
    --overwrite` rename a new run into its place, with checkpoints of the same names (its experiment, weights
    and tokenizer then came from two runs). What changed is chosen and read again; an error raised while
    nothing changed is the files' own."""
    for _ in range(READ_ATTEMPTS):
        chosen, directories = choose()
        before = [directory_identity(directory) for directory in directories]
        try:
            result = read(chosen)
        except (ValueError, OSError):
            if _unchanged(directories, before):
                raise
            continue
        if _unchanged(directories, before):
            return result
    raise CheckpointError(
        f"{what} changed while it was read, {READ_ATTEMPTS} times (a training run pruning its checkpoints, or "
        "`train --overwrite` replacing the run); run the command again"
    )


def _unchanged(directories: list[Path], before: list[tuple[int, int] | None]) -> bool:
    return None not in before and [directory_identity(directory) for directory in directories] == before


def latest_settings(run_dir: Path, loaded: Path, experiment: ExperimentConfig) -> ExperimentConfig:
    """`experiment` (the `loaded` checkpoint's) with the [train] and [decode] settings of the run's latest
    checkpoint (what its last train command set); as it is when `loaded` is the latest, or, with a warning,
    when the latest cannot be read."""
    try:
        latest = read_pointer_name(run_dir, "latest")
        if latest is None or latest == loaded.name:
            return experiment
        newest = read_experiment(run_dir / CHECKPOINTS_DIR / latest)[0]
    except CheckpointError as error:
        warn_caller(f"using {loaded.name}'s [decode] and [train] settings, not the latest checkpoint's: {error}")
        return experiment
    return replace(experiment, train=newest.train, decode=newest.decode)
