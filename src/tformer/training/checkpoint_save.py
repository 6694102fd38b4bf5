"""Writing checkpoints and pointers atomically, and pruning old checkpoints (the layout: checkpoint.py).

A checkpoint is written into a hidden sibling (`checkpoints/.tmp-NAME-PID`), every file fsynced, then
renamed into place; a pointer file is replaced with `os.replace`. So a crash at any moment leaves the
old checkpoint or the new one, never a half-written one under a real name, and `prune_checkpoints`
clears what a crashed writer left behind.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_model

from tformer import __version__
from tformer.atomic_file import NAME_KEPT, abandoned, fsync_dir, fsync_file, fsync_tree, name_the_file
from tformer.config import ExperimentConfig, experiment_to_dict
from tformer.data.tokenizer import Tokenizer
from tformer.interop.marian_tokenizer import VocabTokenizer
from tformer.model import Transformer
from tformer.training.checkpoint import (
    CHECKPOINTS_DIR,
    EXPERIMENT_FILE,
    FORMAT_VERSION,
    POINTERS,
    STATE_FILE,
    TOKENIZER_DIR,
    TOKENIZER_FINGERPRINT,
    WEIGHTS_FILE,
    read_pointer_name,
    step_checkpoints,
)


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
    tokenizer: Tokenizer | VocabTokenizer,
    model: Transformer,
    step: int,
    trainer_state: dict[str, Any] | None,
    extra: dict[str, Any] | None = None,
    replace: bool = True,
) -> Path:
    """Write a checkpoint directory at `final` via a fsynced temporary sibling and a rename. Without `replace`,
    a `final` that another process wrote meanwhile is kept: FileExistsError, and nothing written."""
    parent, name = final.parent, final.name
    remove_abandoned_writes(final)
    temporary = parent / f".tmp-{name[:NAME_KEPT]}-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        temporary.mkdir()
        recorded = {TOKENIZER_FINGERPRINT: tokenizer.fingerprint(), **(extra or {})}  # see load_tokenizer
        write_experiment(temporary / EXPERIMENT_FILE, experiment, step=step, extra=recorded)
        tokenizer.to_files(temporary / TOKENIZER_DIR)
        with failed_write_as_os_error(final / WEIGHTS_FILE):
            save_model(model, str(temporary / WEIGHTS_FILE), metadata={"format_version": str(FORMAT_VERSION)})
        give_plain_mode(temporary / WEIGHTS_FILE, like=temporary / EXPERIMENT_FILE)
        if trainer_state is not None:  # into a file of ours, so that torch's error of a failed write holds its OSError
            with open(temporary / STATE_FILE, "wb") as handle, failed_write_as_os_error(final / STATE_FILE):
                torch.save(trainer_state, handle)
        fsync_tree(temporary)
        if replace:
            _rename_into_place(temporary, final)
        else:
            _rename_new(temporary, final)
        fsync_dir(parent)
    except BaseException as error:  # a full disk, say: the copy would only take space (outside a run, for good)
        shutil.rmtree(temporary, ignore_errors=True)
        name_the_file(error, final, staging=temporary)  # a failed fsync names no file, nor the user the temporary
        raise
    return final


def _rename_into_place(temporary: Path, final: Path) -> None:
    """Rename the complete checkpoint `temporary` to `final`. An existing `final` is moved aside first and
    removed after, or moved back where the rename fails: left under its hidden name, pruning would delete it."""
    if not final.exists():
        os.replace(temporary, final)
        return
    trash = _hidden(final)
    try:
        os.replace(temporary, final)
    except BaseException:
        os.replace(trash, final)
        raise
    remove_checkpoint_dir(trash)


def _rename_new(temporary: Path, final: Path) -> None:
    """Rename the complete checkpoint `temporary` to `final`, which must not exist: a directory is renamed onto
    another only where that one is empty, so a checkpoint written there meanwhile stays (FileExistsError)."""
    try:
        os.rename(temporary, final)
    except OSError as error:
        if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(final)) from None
        raise


def remove_abandoned_writes(final: Path) -> None:
    """Remove the temporary siblings (`.tmp-NAME-PID`) that writers of `final` killed outright (SIGKILL, the
    memory killer) left: inside a run pruning removes them, but beside an `average --out` nothing did."""
    name = final.name[:NAME_KEPT]  # as write_checkpoint names its temporary
    for temporary in final.parent.glob(f".tmp-{glob.escape(name)}-*"):
        pid = temporary.name.rsplit("-", 1)[-1]
        if temporary.name == f".tmp-{name}-{pid}" and temporary.is_dir() and abandoned(temporary):
            remove_abandoned(temporary)


def remove_abandoned(path: Path) -> None:
    """Delete what a writer now gone left. Another process may find it at the same moment (a run's pruning
    and an `average` into its checkpoints, two averages into one --out): two deletions of one tree stopped
    the one that met a file the other had removed (FileNotFoundError; a run's pruning stopped the run). The
    rename to a name of this process gives it to one of them; the others find it gone, as they wanted."""
    try:
        claimed = _hidden(path)
    except FileNotFoundError:
        return
    remove_checkpoint_dir(claimed)


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
    """Point RUN_DIR/<which> at checkpoint `name`, atomically. A temporary file left there (by a crash, or a
    received run's link to a file elsewhere) is removed, never written through: only the run changes."""
    assert which in POINTERS, which
    run_dir = Path(run_dir)
    temporary = run_dir / f".{which}.tmp"
    temporary.unlink(missing_ok=True)
    try:
        with open(temporary, "x", encoding="utf-8") as file:
            file.write(name + "\n")
        fsync_file(temporary)
        os.replace(temporary, run_dir / which)
    except BaseException:  # a full disk: the pointer keeps its name, and no stray copy stays beside it
        temporary.unlink(missing_ok=True)
        raise
    fsync_dir(run_dir)


def prune_checkpoints(run_dir: Path, *, keep_last: int) -> list[Path]:
    """Delete step checkpoints beyond the newest `keep_last` (0 keeps all), never one a pointer names,
    and any temporary directory a crashed writer left behind (not one that a live process, such as a
    `tformer average` run meanwhile, is writing). Returns what was deleted."""
    parent = Path(run_dir) / CHECKPOINTS_DIR
    if not parent.is_dir():
        return []
    protected = {read_pointer_name(run_dir, which) for which in POINTERS} - {None}
    left = [path for path in parent.iterdir() if path.name.startswith((".tmp-", ".old-")) and abandoned(path)]
    for path in left:
        remove_abandoned(path)
    steps = step_checkpoints(run_dir)
    old = [path for path in steps[:-keep_last] if path.name not in protected] if keep_last > 0 else []
    for path in old:
        remove_out_of_sight(path)
    return left + old


def remove_out_of_sight(path: Path) -> None:
    """Delete a checkpoint directory after renaming it to a hidden name, so that it vanishes at once: a command
    reading the run meanwhile (`average`, `info`) never lists a half-deleted checkpoint, and one reading its
    files sees it go and reads again (checkpoint_load.read_unchanged). A kill during the deletion leaves the
    hidden directory, which the next pruning removes."""
    remove_checkpoint_dir(_hidden(path))


def _hidden(path: Path) -> Path:
    """Rename `path` to a hidden name of this process, `.old-NAME-PID` (which pruning removes where a kill
    leaves it), and return that."""
    hidden = path.parent / f".old-{path.name[:NAME_KEPT]}-{os.getpid()}"
    os.replace(path, hidden)
    return hidden


def remove_checkpoint_dir(path: Path) -> None:
    """Delete a checkpoint directory. One that is a symbolic link (a checkpoint kept on another disk, or a
    received run's) loses only the link: what it names lies outside the run, and tformer deletes nothing
    there (shutil.rmtree refused the link, which stopped the run at its next pruning)."""
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path)


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
