"""What the processes of a torchrun job must agree on before they train, compared in one exchange.

Each machine starts its processes with its own command and reads its own copy of the files. A
difference would not fail but hang or mislead: a process given another train.max_steps stops alone
while the others wait for it in a collective, and one that reads other data runs epochs of another
length and validates on other sentences. So every process takes a fingerprint (crc32) of each setting
of the experiment and of each data file (its size and digest), compares them with rank 0's, and any
difference stops every process with a one-line error naming the first setting or file that differs.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch

from tformer.config import ConfigError, ExperimentConfig, experiment_to_dict
from tformer.data.corpus import file_digest
from tformer.runtime import Distributed
from tformer.training.run_lock import LOCK_FILE

DATA_FILES = ("train_src", "train_tgt", "valid_src", "valid_tgt")
ADVICE = "give every machine the same command, and the same files at the same paths"


def check_same_experiment(
    experiment: ExperimentConfig, distributed: Distributed, device: torch.device, *, extra: dict[str, str] | None = None
) -> None:
    """Refuse to train when any process has other settings or data files than rank 0 (nothing to do for
    one process). `extra` adds named values that must agree too, such as the checkpoint a run resumes from."""
    if not distributed.enabled:
        return
    entries = _setting_entries(experiment) | _file_entries(experiment) | (extra or {})
    names = "\n".join(entries)
    if any(distributed.differs_from_main([float(len(entries)), float(zlib.crc32(names.encode()))], device)):
        raise ConfigError(f"the processes of this run use different versions of tformer; {ADVICE}")
    fingerprints = [float(zlib.crc32(text.encode())) for text in entries.values()]  # < 2**32: exact
    differs = distributed.differs_from_main(fingerprints, device)
    for (name, text), different in zip(entries.items(), differs, strict=True):
        if different:
            raise ConfigError(
                f"process {distributed.rank}: {name} differs between the processes of this run "
                f"(here {_shown(text)}); {ADVICE}"
            )


def check_shared_run_dir(run_dir: Path, distributed: Distributed, device: torch.device) -> None:
    """Refuse a run directory that some process cannot see: rank 0 alone writes it, but a resume reads
    its checkpoint on every process, so on several machines it must be on a filesystem they all share.
    Checked when a run starts (not after days of training, at its first resume), once rank 0 has created
    RUN_DIR and its lock file: call it after a collective that follows their creation."""
    if not distributed.enabled:
        return
    run_dir = Path(run_dir)
    here = run_dir.is_dir() and (run_dir / LOCK_FILE).exists()  # an empty directory made on each machine is not it
    if distributed.differs_from_main([float(here)], device)[0]:
        who = "it is not there on this machine" if not here else "another process cannot see it"
        raise ConfigError(
            f"process {distributed.rank}: {run_dir} is where process 0 writes the run, but {who}: with "
            "several machines, --out must be on a filesystem they all share"
        )


def _setting_entries(experiment: ExperimentConfig) -> dict[str, str]:
    return {
        f"{section}.{key}": json.dumps(value, sort_keys=True)
        for section, table in experiment_to_dict(experiment).items()
        for key, value in table.items()
    }


def _file_entries(experiment: ExperimentConfig) -> dict[str, str]:
    """Path, size and digest of each data file (or "missing"), named without the path: a path that
    differs is named as the setting it is."""
    entries = {}
    for key in DATA_FILES:
        path = getattr(experiment.data, key)
        if path is not None:
            entries[f"the file of data.{key}"] = f"{path}: {_file_fingerprint(Path(path))}"
    return entries


def _file_fingerprint(path: Path) -> str:
    if not path.is_file():
        return "missing"
    return f"{path.stat().st_size:,} bytes, BLAKE2b {file_digest(path)[:16]}"


def _shown(text: str) -> str:
    """The value as the message shows it: whole, unless it is very long (such as decode.banned_ids)."""
    return text if len(text) <= 300 else text[:297] + "..."
