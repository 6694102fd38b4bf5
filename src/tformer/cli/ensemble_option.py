"""`--ensemble RUN_DIR ...` for the commands that decode (translate, evaluate): decode with the average of
several models' log-probabilities (decoding/ensemble.py), like fairseq's `--path a.pt:b.pt` and Marian's
`--models a.npz b.npz`. The members must have been trained with the same tokenizer, and not from the
other run's target files to its source files."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tformer.cli.argument_types import path_argument

if TYPE_CHECKING:
    import torch

    from tformer.training.checkpoint_load import LoadedRun


def add_ensemble_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ensemble",
        nargs="+",
        type=path_argument,
        default=[],
        metavar="RUN_DIR",
        help="more runs (or checkpoint directories) decoded together with RUN_DIR: the average of their "
        "log-probabilities; they must share RUN_DIR's tokenizer (docs/decoding.md)",
    )


def model_with_ensemble(loaded: LoadedRun, args: argparse.Namespace, device: str | torch.device) -> Any:
    """`loaded.model` alone, or with --ensemble an EnsembleModel of it and the named runs' checkpoints
    (the same --which as RUN_DIR where the command has it)."""
    if not args.ensemble:
        return loaded.model
    from tformer.decoding.ensemble import EnsembleModel
    from tformer.training.checkpoint_load import load_run

    which = getattr(args, "which", "best")
    dtype = next(loaded.model.parameters()).dtype  # every member computes as RUN_DIR does (--dtype)
    members = [loaded.model]
    for path in args.ensemble:
        member = load_run(path, which=which, device=device, dtype=dtype)
        if member.tokenizer.fingerprint() != loaded.tokenizer.fingerprint():
            raise ValueError(
                f"--ensemble {path} was trained with a different tokenizer than {loaded.checkpoint_dir}; "
                "ensemble members must share one (train them with --tokenizer DIR)"
            )
        reversed_files = _training_files(member.experiment)
        if reversed_files is not None and reversed_files[::-1] == _training_files(loaded.experiment):
            raise ValueError(
                f"--ensemble {path} was trained from {reversed_files[0]} to {reversed_files[1]}, the opposite "
                f"direction of {loaded.checkpoint_dir}; ensemble members must translate the same way"
            )
        members.append(member.model)
    return EnsembleModel(members)


def _training_files(experiment: Any) -> tuple[str, str] | None:
    """The run's (source, target) training files as its config names them, or None when it has none (an
    imported model) or both are one file. A shared (joint) tokenizer cannot tell a run trained the other
    way round from one trained this way; the files can, when both runs name the same two."""
    data = experiment.data
    if data.train_src is None or data.train_tgt is None:
        return None
    base = Path(data.data_dir or "")
    files = (os.path.normpath(base / data.train_src), os.path.normpath(base / data.train_tgt))
    return None if files[0] == files[1] else files
