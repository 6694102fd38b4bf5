"""A training run's directory: what `tformer train --overwrite` may replace, checking that a
new run's directory is free, creating and locking it, and removing what a failed setup created there
(so that the same command can be run again)."""

from __future__ import annotations

import shutil
from pathlib import Path

from tformer.atomic_file import missing_directories, remove_empty_directories
from tformer.training import checkpoint as ckpt
from tformer.training import encoded_cache
from tformer.training.run_lock import LOCK_FILE, RunLock


class RunDirectoryError(ValueError):
    """The output directory cannot be used as asked (it holds a run, or holds nothing to resume)."""


NEW_RUN_ADVICE = "pass --resume to continue it or --overwrite to replace it"
NEW_RUN_FILES_ADVICE = "no checkpoint to resume: pass --overwrite to replace them, or choose another --out"
NEW_RUN_OTHERS_ADVICE = "no run is there to resume or replace: choose another --out, or remove the files yourself"
ONE_PROCESS = "(--overwrite runs in one process)"  # why a torchrun job is told to remove RUN_DIR instead


def start_afresh(run_dir: Path, *, processes: int) -> str:
    """How to start a run afresh in `run_dir`: with --overwrite, which every process of a torchrun job
    refuses, so a job of several `processes` is told to remove the directory first."""
    return "with --overwrite" if processes == 1 else f"after removing {run_dir} {ONE_PROCESS}"


def new_run_advice(*, processes: int) -> dict[str, str]:
    """`check_new_run_dir`'s ways out for `tformer train` run in `processes` processes (without --overwrite,
    where there are several)."""
    if processes == 1:
        return {}
    return {
        "advice": f"pass --resume to continue it, or remove it to start afresh {ONE_PROCESS}",
        "files_advice": f"no checkpoint to resume: remove them {ONE_PROCESS}, or choose another --out",
    }


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


def create_run_dir(run_dir: Path) -> list[Path]:
    """Create the run directory before any long setup (reading the data, training the tokenizer), so
    that an unusable --out (read-only, under a file) fails at once. Returns the directories it created:
    the run directory and any missing parents, deepest first."""
    missing = missing_directories(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # also a working directory that access() calls writable but is not (`cd /proc`)
        remove_empty_directories(missing)  # those of its parents made before the failure
        why = error.strerror or error
        raise RunDirectoryError(f"cannot create the run directory {run_dir}: {why}; choose another --out") from None
    return missing


def lock_new_run_dir(run_dir: Path, *, checked: bool, processes: int = 1) -> RunLock:
    """Lock the new run's directory, so that a second process given the same --out is refused; then
    check again that it is empty, since another run may have filled it between the first check and the
    lock. On failure the directory is another run's: nothing in it is touched."""
    lock = RunLock(run_dir)
    if not checked:
        try:
            check_new_run_dir(run_dir, **new_run_advice(processes=processes))
        except RunDirectoryError:
            lock.release()
            raise
    return lock


def remove_unused(run_dir: Path, lock: RunLock, *, created: list[Path]) -> None:
    """After a failed setup: remove the encoded training data this run saved (the directory held no
    cache when the run started: it was empty), the lock file (while still holding it) and release it,
    then the directories this run created, parents of --out included (a failed setup leaves no
    directory behind, so the same command can be run again); one that is not empty, something else
    put there, stays."""
    shutil.rmtree(run_dir / encoded_cache.CACHE_DIR, ignore_errors=True)
    (run_dir / LOCK_FILE).unlink(missing_ok=True)
    lock.release()
    remove_empty_directories(created)
