"""Decoding flags shared by the commands that decode a trained run (translate, evaluate)."""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from tformer.cli.ensemble_option import model_with_ensemble
from tformer.cli.typed_names import errors_named_as_typed, flag_option, typed_flags
from tformer.config import ConfigError, DecodeConfig, config_from_dict, config_to_dict, parse_override

if TYPE_CHECKING:
    from tformer.decoding.pipeline import Translator
    from tformer.training.checkpoint_load import LoadedRun

# the decoding flags that set a [decode] key (argparse dest -> (section, key)), where a command has them
DECODE_FLAG_KEYS = {
    "beam": ("decode", "beam_size"),
    "nbest": ("decode", "nbest"),
    "length_penalty": ("decode", "length_penalty"),
}

# --dtype's choices (tformer.runtime.DECODE_DTYPES, named here without importing torch)
DTYPE_NAMES = ("float32", "bfloat16")

# the [decode] keys that only sampling reads: a search (greedy or beam) ignores them
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "seed")

# a config check's advice to set a [decode] key -> the flag of `add_decode_arguments` that sets it
ADVICE_FLAGS = {"set decode.static_step=true": "give --static-step"}


def add_decode_settings_argument(
    parser: argparse.ArgumentParser, *, then: str = "the other decoding flags apply after it"
) -> None:
    """--set decode.KEY=VALUE (repeatable), read by `decode_settings`; `then` says what applies after it."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        dest="decode_settings",
        metavar="decode.KEY=VALUE",
        help="change one of the run's [decode] settings for this command (any key, docs/decoding.md), e.g. "
        f"--set decode.sampling=true --set decode.top_k=10; repeatable; {then}",
    )


def add_decode_arguments(parser: argparse.ArgumentParser) -> None:
    add_decode_settings_argument(parser)
    parser.add_argument(
        "--length-penalty",
        type=float,
        default=None,
        metavar="ALPHA",
        help="beam search's length penalty (default: the run's decode.length_penalty; docs/decoding.md)",
    )
    parser.add_argument(
        "--static-step",
        action="store_true",
        help="fixed-shape decoding step, replayed as a CUDA graph on a GPU (decode.static_step; same output)",
    )
    parser.add_argument(
        "--compile-step",
        action="store_true",
        help="--static-step, compiled with torch.compile before it is recorded (decode.compile_step; batches "
        "wait for the compiler: on a GPU the first of each shape, on the CPU the first few)",
    )
    parser.add_argument(
        "--truncate",
        action="store_true",
        help="cut a line longer than the model accepts (model.max_positions pieces) to its first pieces, with a "
        "warning, instead of stopping with an error",
    )


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default="float32",
        help="the weights' and arithmetic's dtype (default: float32, with the exactness guarantees of "
        "docs/decoding.md); bfloat16 holds half the memory and is what the GPU speeds of docs/performance.md "
        "were measured in, but it keeps 2-3 significant digits: scores move, near ties may fall the other way, "
        "and a sentence's output may then depend on the batch it shares (docs/decoding.md, Precision)",
    )


def decode_settings(settings: Sequence[str]) -> dict[str, object]:
    """The `decode.KEY=VALUE` settings of --set by key (their values checked against the run's later)."""
    values = {}
    for text in settings:
        keys, value = parse_override(text)
        if len(keys) != 2 or keys[0] != "decode" or not keys[1]:
            raise ConfigError(
                f"--set takes decoding settings, decode.KEY=VALUE (the model and its training are fixed); got {text!r}"
            )
        values[keys[1]] = value
    return values


def apply_decode_settings(config: DecodeConfig, settings: dict[str, object]) -> DecodeConfig:
    """The run's decode settings with those of --set (`decode_settings`) in their place."""
    return config_from_dict(DecodeConfig, {**config_to_dict(config), **settings}, section="decode")


def decode_argument_changes(args: argparse.Namespace) -> dict[str, object]:
    """The [decode] keys that the flags of `add_decode_arguments` set, by key (--static-step: static_step)."""
    changes: dict[str, object] = {}
    if args.static_step or args.compile_step:
        changes["static_step"] = True
    if args.compile_step:
        changes["compile_step"] = True
    if args.length_penalty is not None:
        changes["length_penalty"] = args.length_penalty
    return changes


def merged_decode_config(
    run: DecodeConfig, settings: dict[str, object], changes: dict[str, object], args: argparse.Namespace
) -> DecodeConfig:
    """The run's decode settings with --set's `settings`, then the command's own flags (`changes`, by key:
    --beam's beam_size) and those of `add_decode_arguments` in their place, checked once, merged: a value
    that a flag replaced is never checked. An error names a key that a flag set by that flag, a --set's by
    its key (decode.length_penalty)."""
    values = {**config_to_dict(run), **settings, **changes, **decode_argument_changes(args)}
    with errors_named_as_typed(args, DECODE_FLAG_KEYS):
        try:
            config = config_from_dict(DecodeConfig, values, section="decode")
        except ConfigError as error:
            raise ConfigError(advice_as_flags(str(error))) from None
    warn_unused_sampling_settings(config, settings)
    return config


def warn_unused_sampling_settings(config: DecodeConfig, settings: dict[str, object]) -> None:
    """One warning line when the command's --set gives a sampling setting (decode.top_k=10) but the command
    searches: `--set decode.top_k=10` alone decoded with beam search as if it had not been given."""
    unused = [f"--set decode.{key}" for key in SAMPLING_KEYS if key in settings]
    if unused and not config.sampling:
        search = "greedy search" if config.beam_size == 1 else f"beam search (beam {config.beam_size})"
        named = unused[0] if len(unused) == 1 else f"{', '.join(unused[:-1])} and {unused[-1]}"
        kind = "is a sampling setting" if len(unused) == 1 else "are sampling settings"
        warnings.warn(
            f"{named} {kind}, which {search} ignores: add --set decode.sampling=true to sample",
            UserWarning,
            stacklevel=2,
        )


def command_translator(loaded: LoadedRun, config: DecodeConfig, args: argparse.Namespace, device: Any) -> Translator:
    """What translate and evaluate decode with: RUN_DIR's model (and --ensemble's), `config`, their
    --max-batch-tokens and --truncate, naming once the input characters the tokenizer reads as <unk>."""
    from tformer.decoding.pipeline import Translator

    return Translator(
        model_with_ensemble(loaded, args, device),
        loaded.tokenizer,
        config,
        device=device,
        max_batch_tokens=args.max_batch_tokens,
        truncate=args.truncate,
        warn_unknown=True,
    )


def advice_as_flags(message: str) -> str:
    """A config check's advice to set a key ("set decode.static_step=true") given as the flag of
    `add_decode_arguments` that sets it ("give --static-step"), for the commands that have those flags."""
    for advice, flag in ADVICE_FLAGS.items():
        message = message.replace(advice, flag)
    return message


@contextmanager
def decode_flags_named(args: argparse.Namespace) -> Iterator[None]:
    """Around the applying of the decoding flags (after --set): a ConfigError names each key that a flag
    set by that flag (--length-penalty nan: "--length-penalty must be a finite number"), not as
    decode.KEY, which the user never typed."""
    with errors_named_as_typed(args, DECODE_FLAG_KEYS):
        yield


def error_line(error: BaseException, args: argparse.Namespace) -> str:
    """The first line of an error's message as the command line prints it. A search too large for the memory
    (a SearchTooLargeError, known by its `setting` and `named`: this module imports no torch) names the flag
    or --set that set it (--beam), not the DecodeConfig field its own message names."""
    if hasattr(error, "setting") and hasattr(error, "named"):
        return error.named(decode_setting_name(args, error.setting))
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def decode_setting_name(args: argparse.Namespace, field: str) -> str:
    """How the command line sets DecodeConfig.`field`, for an error about its value: the flag that set
    it (--beam), else the --set that did (--set decode.beam_size), else (the run's own value) the
    command's flag for it if it has one, else --set decode.FIELD."""
    key = f"decode.{field}"
    typed = typed_flags(args, DECODE_FLAG_KEYS).get(key)
    if typed is not None:
        return typed
    if field in decode_settings(getattr(args, "decode_settings", [])):
        return f"--set {key}"
    dest = next((dest for dest, (_, name) in DECODE_FLAG_KEYS.items() if name == field), None)
    return flag_option(dest) if dest is not None and hasattr(args, dest) else f"--set {key}"
