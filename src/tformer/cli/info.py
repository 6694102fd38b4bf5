"""Show a preset's, a config file's or a trained run's model shape and parameter count.

RUN_DIR (a run directory or one of its checkpoints) shows the model the run trained, with the step of the
checkpoint read (--which: best or last) and the run's checkpoints. The files of the checkpoint read are
checked as translate checks them (the weights by their header only, so it takes no longer for a large
model), and a damaged one is named; the other checkpoints listed are not read.

--config FILE reads the [model] section of an experiment TOML file (as `tformer train --config` does);
the vocabulary size comes from --vocab-size (which replaces the file's data.vocab_size before the file is
checked, as train's does), else the file's data.vocab_size (the size of the tokenizer a run trains: an
upper bound, since a small corpus may give fewer pieces); where the file names a tokenizer (data.tokenizer),
which a run uses as it is, that tokenizer's sizes."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from tformer.cli.argument_types import path_argument
from tformer.cli.output_paths import check_stdout
from tformer.config import (
    PRESETS,
    ConfigError,
    DataConfig,
    ModelConfig,
    apply_overrides,
    config_to_dict,
    experiment_from_dict,
    load_toml,
    preset,
)
from tformer.recipes import recipe_path

HELP = "show the shape and parameter count of a model preset, a config file's [model] or a trained run"

DEFAULT_PRESET = "base"
DEFAULT_VOCAB_SIZE = 37000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dir",
        nargs="?",
        type=path_argument,
        metavar="RUN_DIR",
        help="a run directory or checkpoint: show its model",
    )
    parser.add_argument(
        "--which", choices=["best", "last"], default="best", help="checkpoint of a run directory (default: best)"
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=list(PRESETS), help=f"model preset (default: {DEFAULT_PRESET})")
    source.add_argument(
        "--config",
        type=path_argument,
        metavar="FILE",
        help="experiment TOML file (or a shipped recipe's name): show its [model]",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        help="joint vocabulary size, one train accepts (at least 8; more with data.byte_fallback; default: the "
        f"config's data.vocab_size, else {DEFAULT_VOCAB_SIZE})",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from tformer.model import Transformer, count_parameters

    check_stdout("info")  # the description is printed
    if args.run_dir is not None:
        if args.preset or args.config or args.vocab_size is not None:
            raise ConfigError("give a RUN_DIR, or --preset / --config (with --vocab-size), not both")
        _refuse_a_config_file(args.run_dir)
        config, described = _run_model(args.run_dir, args.which)
    elif args.config is not None:
        config, described = _config_file_model(args.config, args.vocab_size), {"config": str(args.config)}
    else:
        name = args.preset or DEFAULT_PRESET
        vocab_size = DEFAULT_VOCAB_SIZE if args.vocab_size is None else _trainable(args.vocab_size, DataConfig())
        config, described = preset(name, src_vocab_size=vocab_size, tgt_vocab_size=vocab_size), {"preset": name}
    try:
        with torch.device("meta"):  # shapes only: counting needs no memory and no random numbers
            model = Transformer(config)
    # e.g. an embedding of 10^11 rows: refused for its size (the config itself is valid) or by the allocator
    except (ConfigError, RuntimeError, MemoryError) as error:
        reason = str(error).splitlines()[0]
        raise ValueError(f"cannot build this model here to count its parameters: {reason}") from None
    print(json.dumps({**described, "parameters": count_parameters(model), **config_to_dict(config)}))
    return 0


def _refuse_a_config_file(path: Path) -> None:
    """`tformer info tiny_copy` or `tformer info run.toml` means a config file: say how to show one,
    instead of that it is no run directory."""
    if (path.is_file() and path.suffix == ".toml") or (not path.exists() and recipe_path(path) is not None):
        raise ConfigError(f"{path} is a config file, not a run: show its model with tformer info --config {path}")


def _config_file_model(path: Path, vocab_size: int | None) -> ModelConfig:
    """The [model] of an experiment file, with the vocabulary a run of it would get (training sets the
    vocabulary sizes and pad_id from its tokenizer, and refuses a file that sets them, as this does).
    --vocab-size replaces the file's data.vocab_size before the file is checked, as `tformer train` does."""
    from tformer.training.run import check_no_tokenizer_keys

    values = load_toml(path)
    check_no_tokenizer_keys(values)
    if vocab_size is not None:
        values = _with_vocab_size(values, vocab_size)
    try:
        experiment = experiment_from_dict(values)
    except ConfigError as error:
        if vocab_size is not None and str(error).startswith("data.vocab_size "):
            raise ConfigError(f"--vocab-size {vocab_size} is one tformer train refuses: {error}") from None
        raise
    if experiment.data.tokenizer is not None:
        return _with_tokenizer_sizes(experiment.model, experiment.data)
    size = experiment.data.vocab_size  # --vocab-size's, where it is given
    return dataclasses.replace(experiment.model, src_vocab_size=size, tgt_vocab_size=size)


def _with_tokenizer_sizes(model: ModelConfig, data: DataConfig) -> ModelConfig:
    """The model with the vocabulary of the tokenizer data.tokenizer names (found as train finds it,
    under data.data_dir), which a run uses as it is: its data.vocab_size (and --vocab-size) play no part."""
    from tformer.data.tokenizer import Tokenizer
    from tformer.training.run import check_tokenizer_dir
    from tformer.training.training_text import absolute_data_paths

    directory = absolute_data_paths(data).tokenizer
    check_tokenizer_dir(directory)
    tokenizer = Tokenizer.from_files(directory)
    return dataclasses.replace(
        model, src_vocab_size=tokenizer.src_vocab_size, tgt_vocab_size=tokenizer.tgt_vocab_size, pad_id=tokenizer.pad_id
    )


def _with_vocab_size(values: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """A config file's tables with data.vocab_size replaced by --vocab-size (a [data] that is no table is
    left for the check to name)."""
    values = apply_overrides(values, [])  # a copy with every table as a dict
    data = values.setdefault("data", {})
    if isinstance(data, dict):
        data["vocab_size"] = vocab_size
    return values


def _trainable(vocab_size: int, data: DataConfig) -> int:
    """--vocab-size, refused as `tformer train` refuses it as data.vocab_size with the `data` settings (at
    least 8 pieces; more with data.byte_fallback): no run has a model of that vocabulary to show."""
    try:
        dataclasses.replace(data, vocab_size=vocab_size)
    except ConfigError as error:
        raise ConfigError(f"--vocab-size {vocab_size} is one tformer train refuses: {error}") from None
    return vocab_size


def _run_model(path: Path, which: str) -> tuple[ModelConfig, dict[str, Any]]:
    """The model a run trained (its vocabulary sizes are the tokenizer's), and where it was read from."""
    from tformer.training.checkpoint import POINTERS, read_pointer_name, step_checkpoints
    from tformer.training.checkpoint_load import load_tokenizer, read_experiment, read_resolved
    from tformer.training.checkpoint_weights import check_weights

    def read(checkpoint: Path, run_dir: Path | None) -> tuple[ModelConfig, dict[str, Any]]:
        experiment, step = read_experiment(checkpoint)
        load_tokenizer(checkpoint)  # the files translate reads, checked: a damaged checkpoint is named, not shown
        check_weights(checkpoint, experiment.model)  # names and shapes too, as translate would find them
        described: dict[str, Any] = {"checkpoint": str(checkpoint), "step": step}
        if run_dir is not None:
            described["run"] = str(run_dir)
            described["checkpoints"] = [directory.name for directory in step_checkpoints(run_dir)]
            described.update({pointer: read_pointer_name(run_dir, pointer) for pointer in POINTERS})
        return experiment.model, described

    # read again where a training run pruned the checkpoint, or `train --overwrite` replaced the run, meanwhile
    return read_resolved(path, which=which, read=read)
