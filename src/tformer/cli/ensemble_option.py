"""`--ensemble RUN_DIR ...` for the commands that decode (translate, evaluate): decode with the average of
several models' log-probabilities (decoding/ensemble.py), like fairseq's `--path a.pt:b.pt` and Marian's
`--models a.npz b.npz`. The members must have been trained with the same tokenizer."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from tformer.training.checkpoint import LoadedRun


def add_ensemble_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ensemble",
        nargs="+",
        type=Path,
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
    from tformer.training.checkpoint import load_run

    which = getattr(args, "which", "best")
    members = [loaded.model]
    for path in args.ensemble:
        member = load_run(path, which=which, device=device)
        if member.tokenizer.fingerprint() != loaded.tokenizer.fingerprint():
            raise ValueError(
                f"--ensemble {path} was trained with a different tokenizer than {loaded.checkpoint_dir}; "
                "ensemble members must share one (train them with --tokenizer DIR)"
            )
        members.append(member.model)
    return EnsembleModel(members)
