"""Self-describing checkpoints, written atomically, and loading a run for inference or resumption.

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
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

from tformer import __version__
from tformer.config import ExperimentConfig, ModelConfig, experiment_from_dict, experiment_to_dict, preset_of
from tformer.data.tokenizer import Tokenizer
from tformer.interop.marian_tokenizer import MARKER_FILE as VOCAB_TOKENIZER_MARKER
from tformer.interop.marian_tokenizer import VocabTokenizer
from tformer.model import Transformer, count_parameters

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


# ---------------------------------------------------------------------------------------------- saving
def save_checkpoint(
    run_dir: Path,
    name: str,
    *,
    experiment: ExperimentConfig,
    tokenizer: Tokenizer,
    model: Transformer,
    step: int,
    trainer_state: dict[str, Any] | None,
) -> Path:
    """Write checkpoint `name` under RUN_DIR/checkpoints atomically; an existing one of that name
    (left by a run that crashed before moving its pointer) is replaced only once the new one is complete."""
    parent = Path(run_dir) / CHECKPOINTS_DIR
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / name
    return write_checkpoint(
        final, experiment=experiment, tokenizer=tokenizer, model=model, step=step, trainer_state=trainer_state
    )


def write_checkpoint(
    final: Path,
    *,
    experiment: ExperimentConfig,
    tokenizer: Tokenizer,
    model: Transformer,
    step: int,
    trainer_state: dict[str, Any] | None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory at `final` via a fsynced temporary sibling and a rename."""
    parent, name = final.parent, final.name
    temporary = parent / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        recorded = {TOKENIZER_FINGERPRINT: tokenizer.fingerprint(), **(extra or {})}  # see load_tokenizer
        write_experiment(temporary / EXPERIMENT_FILE, experiment, step=step, extra=recorded)
        tokenizer.to_files(temporary / TOKENIZER_DIR)
        with failed_write_as_os_error(final / WEIGHTS_FILE):
            save_model(model, str(temporary / WEIGHTS_FILE), metadata={"format_version": str(FORMAT_VERSION)})
        give_plain_mode(temporary / WEIGHTS_FILE, like=temporary / EXPERIMENT_FILE)
        if trainer_state is not None:  # into a file of ours, so that torch's error of a failed write holds its OSError
            with open(temporary / STATE_FILE, "wb") as handle, failed_write_as_os_error(final / STATE_FILE):
                torch.save(trainer_state, handle)
        for path in temporary.rglob("*"):
            if path.is_file():
                _fsync_file(path)
        _fsync_dir(temporary / TOKENIZER_DIR)
        _fsync_dir(temporary)
    except BaseException:  # a full disk, say: the half-written copy would only take space (outside a run, for good)
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if final.exists():
        trash = parent / f".old-{name}-{os.getpid()}"
        os.replace(final, trash)
        os.replace(temporary, final)
        shutil.rmtree(trash)
    else:
        os.replace(temporary, final)
    _fsync_dir(parent)
    return final


def write_experiment(
    path: Path, experiment: ExperimentConfig, *, step: int, extra: dict[str, Any] | None = None
) -> None:
    document = {
        "format_version": FORMAT_VERSION,
        "tformer_version": __version__,
        "step": step,
        **(extra or {}),
        "experiment": experiment_to_dict(experiment),
    }
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def write_pointer(run_dir: Path, which: str, name: str) -> None:
    """Point RUN_DIR/<which> at checkpoint `name`, atomically."""
    assert which in POINTERS, which
    run_dir = Path(run_dir)
    temporary = run_dir / f".{which}.tmp"
    temporary.write_text(name + "\n", encoding="utf-8")
    _fsync_file(temporary)
    os.replace(temporary, run_dir / which)
    _fsync_dir(run_dir)


def prune_checkpoints(run_dir: Path, *, keep_last: int) -> list[Path]:
    """Delete step checkpoints beyond the newest `keep_last` (0 keeps all), never one a pointer names,
    and any temporary directory a crashed writer left behind (not one that a live process, such as a
    `tformer average` run meanwhile, is writing). Returns what was deleted."""
    parent = Path(run_dir) / CHECKPOINTS_DIR
    if not parent.is_dir():
        return []
    protected = {read_pointer_name(run_dir, which) for which in POINTERS} - {None}
    removed = [path for path in parent.iterdir() if path.name.startswith((".tmp-", ".old-")) and abandoned(path)]
    steps = step_checkpoints(run_dir)
    if keep_last > 0:
        removed += [path for path in steps[:-keep_last] if path.name not in protected]
    for path in removed:
        shutil.rmtree(path)
    return removed


def abandoned(temporary: Path) -> bool:
    """Whether the writer of a `.tmp-NAME-PID` or `.old-NAME-PID` directory is gone (or is this process,
    which is writing nothing now)."""
    pid = temporary.name.rsplit("-", 1)[-1]
    if not pid.isdigit() or int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except PermissionError:
        return False  # it exists, under another user
    except (ProcessLookupError, OverflowError):
        return True
    return False


def step_checkpoints(run_dir: Path) -> list[Path]:
    """RUN_DIR/checkpoints/step-* directories, oldest first."""
    parent = Path(run_dir) / CHECKPOINTS_DIR
    if not parent.is_dir():
        return []
    return sorted(path for path in parent.iterdir() if path.is_dir() and path.name.startswith("step-"))


def step_name(step: int) -> str:
    return f"step-{step:08d}"


# ---------------------------------------------------------------------------------------------- loading
def is_run_dir(path: Path) -> bool:
    return (Path(path) / "latest").is_file() or (Path(path) / CHECKPOINTS_DIR).is_dir()


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


def read_pointer_name(run_dir: Path, which: str) -> str | None:
    path = Path(run_dir) / which
    if not path.is_file():
        return None
    try:
        name = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        name = ""
    if not name or "/" in name or name.startswith("."):
        raise CheckpointError(f"{path}: corrupt pointer file (expected a checkpoint directory name)")
    return name


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
    name = read_pointer_name(path, "best") if which == "best" else None
    name = name or read_pointer_name(path, "latest")
    if name is None:
        raise CheckpointError(f"{path} holds no finished checkpoint yet (no 'latest' pointer)")
    checkpoint = path / CHECKPOINTS_DIR / name
    if not (checkpoint / EXPERIMENT_FILE).exists():
        raise CheckpointError(f"{path}: pointer names {name}, but {checkpoint / EXPERIMENT_FILE} is missing")
    return checkpoint, path


def read_experiment(checkpoint_dir: Path) -> tuple[ExperimentConfig, int]:
    """The ExperimentConfig and step recorded in a checkpoint, after checking its format version."""
    path = Path(checkpoint_dir) / EXPERIMENT_FILE
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"missing checkpoint file: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
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
        return experiment_from_dict(document["experiment"]), int(document["step"])
    except (KeyError, TypeError, ValueError) as error:
        writer = document.get("tformer_version")
        if writer is not None and writer != __version__:  # e.g. a key that a newer tformer added
            raise CheckpointError(
                f"{path}: written by tformer {writer}, which this tformer {__version__} cannot read: {error}"
            ) from None
        raise CheckpointError(f"{path}: invalid experiment description: {error}") from None


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
        document = json.loads((checkpoint_dir / EXPERIMENT_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return document.get(key) if isinstance(document, dict) else None


def load_weights(model: Transformer, checkpoint_dir: Path) -> None:
    """Fill `model` from model.safetensors; every key must match (shared tensors stored once)."""
    path = Path(checkpoint_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file: {path}")
    try:
        load_model(model, path, strict=True)
    except SafetensorError as error:
        raise CheckpointError(f"{path}: corrupt or truncated weights ({error})") from None
    except RuntimeError as error:  # torch's message lists every tensor, over many lines: summarise it in one
        disagreement = weights_disagreement(model, path)
        reason = disagreement or " ".join(str(error).split())
        raise CheckpointError(f"{path}: weights do not match the model in {EXPERIMENT_FILE}: {reason}") from None


def check_weights(checkpoint_dir: Path, model_config: ModelConfig | None = None) -> None:
    """Refuse a model.safetensors that load_weights would refuse as missing, corrupt or cut short, or (given
    the model's config) as holding tensors of other names or shapes, reading only its header (which must
    describe the whole file): as fast for a large model as for a small one."""
    path = Path(checkpoint_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file: {path}")
    try:
        with safe_open(path, "pt"):
            pass
    except SafetensorError as error:
        raise CheckpointError(f"{path}: corrupt or truncated weights ({error})") from None
    if model_config is not None:
        with torch.device("meta"):  # shapes only: no memory, however large the model
            model = Transformer(model_config)
        disagreement = weights_disagreement(model, path)
        if disagreement is not None:
            raise CheckpointError(f"{path}: weights do not match the model in {EXPERIMENT_FILE}: {disagreement}")


def weights_disagreement(model: torch.nn.Module, path: Path) -> str | None:
    """How the tensors named in a safetensors header differ from `model`'s, in one line that ends with what
    to do; None where names and shapes all agree. A tensor the model shares under several names (tied
    embeddings) is stored under one of them."""
    with safe_open(path, "pt") as weights:
        stored = {name: list(weights.get_slice(name).get_shape()) for name in weights.keys()}  # noqa: SIM118 (not iterable)
    expected = model.state_dict(keep_vars=True)
    aliases: dict[int, list[str]] = {}
    for name, tensor in expected.items():
        aliases.setdefault(id(tensor), []).append(name)
    missing = [names[0] for names in aliases.values() if not any(name in stored for name in names)]
    unexpected = [name for name in stored if name not in expected]  # in the header's (sorted) order
    reshaped = [name for name in expected if name in stored and stored[name] != list(expected[name].shape)]
    if not (missing or unexpected or reshaped):
        return None
    parts = []
    if reshaped:
        first = reshaped[0]
        parts.append(
            f"{len(reshaped)} of {len(stored)} tensors differ in shape (first {first}: {stored[first]} in the "
            f"weights, {list(expected[first].shape)} in the model)"
        )
    if missing:
        parts.append(f"{len(missing)} tensors the model needs are missing (first {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} stored tensors are not in the model (first {unexpected[0]})")
    return (
        f"{'; '.join(parts)}; the run's files disagree: put back the {EXPERIMENT_FILE} saved with these weights "
        f"(or the weights saved with it)"
    )


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


def load_run(path: str | Path, *, which: str = "best", device: str | torch.device = "cpu") -> LoadedRun:
    """Model (in eval mode), tokenizer and experiment of a run dir (its best or last checkpoint) or of
    one checkpoint dir; everything needed to translate, nothing else."""
    checkpoint, run_dir = resolve_checkpoint(path, which=which)
    experiment, step = read_experiment(checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    model = Transformer(experiment.model)
    load_weights(model, checkpoint)
    return LoadedRun(model.to(device).eval(), tokenizer, experiment, step, run_dir, checkpoint)


# ---------------------------------------------------------------------------------------------- files
def give_plain_mode(path: Path, *, like: Path) -> None:
    """Give `path` the permission bits of `like`, a file written by a plain open() in the same directory.

    safetensors writes a private temporary file (mode 0600) and renames it into place, so without this
    the weights alone would be unreadable to the group and others that can read the rest of the run.
    Copying a sibling's mode gives exactly what open() gives (umask and any default ACL) without
    changing the process's umask, which other threads may rely on at the same moment."""
    os.chmod(path, like.stat().st_mode & 0o777)


@contextlib.contextmanager
def failed_write_as_os_error(path: Path) -> Iterator[None]:
    """A write that fails (a full disk, a file-size limit) is an OSError, which the callers report in one
    line (saving.py with the checkpoint the run keeps); safetensors raises its own error instead, whose
    message ends "(os error 28)", and torch.save a RuntimeError raised while handling the OSError of the
    file object's write. Raise that OSError, naming `path`; any other error goes on as it is."""
    try:
        yield
    except SafetensorError as error:
        code = re.search(r"\(os error (\d+)\)", str(error))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None
    except RuntimeError as error:
        cause = error.__context__
        if not isinstance(cause, OSError):
            raise
        raise OSError(cause.errno, cause.strerror, str(path)) from None


# ---------------------------------------------------------------------------------------------- fsync
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
