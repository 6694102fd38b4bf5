"""Strict loading: a config dataclass from a dict (unknown keys and values of the wrong type refused
with a message that lists the valid keys), TOML files with one-line errors, and `--set` overrides."""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from tformer.config.checks import ConfigError
from tformer.recipes import RECIPES_DIR, recipe_names, recipe_path

ConfigT = TypeVar("ConfigT")


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def config_from_dict(
    cls: type[ConfigT],
    values: dict[str, Any],
    *,
    section: str = "",
    also_valid: Sequence[str] = (),
    other_sections: Mapping[str, Sequence[str]] | None = None,
) -> ConfigT:
    """Build a config dataclass, refusing unknown keys and values of the wrong type.

    `also_valid` names keys the caller has already taken out of `values` (such as [model] preset), so
    that the list of valid keys in the error is every key a user may write. `other_sections` (section
    name -> its keys) lets the error say where a key written in the wrong section belongs."""
    valid = [*also_valid, *field_names(cls)]
    where = f" in [{section}]" if section else ""
    unknown = sorted(set(values) - set(valid))
    if unknown:
        hint = did_you_mean(unknown, valid, other_sections or {})
        raise ConfigError(f"unknown key(s) {', '.join(unknown)}{where}; valid keys: {', '.join(valid)}{hint}")
    hints = typing.get_type_hints(cls)
    checked = {key: _check_type(key, value, hints[key], section) for key, value in values.items()}
    try:
        return cls(**checked)
    except ConfigError as error:
        raise ConfigError(named_in_section(str(error), section, field_names(cls))) from None


def named_in_section(message: str, section: str, keys: Sequence[str]) -> str:
    """A config class's own check names a key alone ("seed must be in ..."), as its Python users write it;
    read from a file or --set, which key it is depends on the section (train.seed and decode.seed both
    exist), so the message that starts with a key gets its section: "decode.seed must be in ...", and
    its advice to set a key ("set static_step = true") names it as --set takes it: "set
    decode.static_step=true"."""
    if not section:
        return message
    message = re.sub(
        r"\bset (\w+) = (\S+)",
        lambda advice: f"set {section}.{advice[1]}={advice[2]}" if advice[1] in keys else advice[0],
        message,
    )
    first_word = re.match(r"\w+", message)
    if first_word is None or first_word.group() not in keys:
        return message
    return f"{section}.{message}"


def did_you_mean(unknown: Sequence[str], valid: Sequence[str], other_sections: Mapping[str, Sequence[str]] = {}) -> str:
    """ "; did you mean d_model?" for a misspelt key or section, and "; beam_size belongs in [decode]" for
    a key of another section; empty when nothing is close. It ends the error, after the list of valid
    names, so that the list stays where it always was."""
    moved, guesses = [], []
    for name in unknown:
        elsewhere = [section for section, keys in other_sections.items() if name in keys]
        if elsewhere:
            moved.append(f"; {name} belongs in {' or '.join(f'[{section}]' for section in elsewhere)}")
        elif close := _close_names(name, valid):
            guesses.append(" or ".join(close) + (f" (for {name})" if len(unknown) > 1 else ""))
    return "".join(moved) + (f"; did you mean {', '.join(guesses)}?" if guesses else "")


def _close_names(name: str, valid: Sequence[str]) -> list[str]:
    """The valid names that `name` may have meant: the same in another case; else those it begins or
    ends as a whole word (warmup: warmup_steps, warmup_ramp), at most three; else the closest spelling."""
    lower = name.lower()
    same = [option for option in valid if option.lower() == lower]
    if same:
        return same
    words = [option for option in valid if option.startswith(f"{lower}_") or option.endswith(f"_{lower}")]
    if 1 <= len(words) <= 3:
        return words
    return difflib.get_close_matches(lower, valid, n=1, cutoff=0.7)


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, turning syntax errors into one-line ConfigErrors. A path that does not exist
    but names one of the recipes shipped with tformer (`multi30k_en_de`, `configs/tiny_copy.toml`) reads
    that recipe."""
    path = Path(path)
    if not path.exists():
        path = recipe_path(path) or path
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        recipes = ", ".join(recipe_names())
        raise ConfigError(
            f"config file not found: {path}; or give one of tformer's own recipes by name: {recipes}"
            f" (files in {RECIPES_DIR})"
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory; give a TOML file") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: invalid UTF-8 at byte {error.start + 1}; re-encode the file as UTF-8") from None
    try:  # a byte-order mark (as Windows editors write) is an encoding artefact, dropped as corpus.py drops it
        return tomllib.loads(text.removeprefix("\ufeff"))
    except tomllib.TOMLDecodeError as error:
        if path.suffix == ".json":  # a run's experiment.json or config.json, given as a config file
            raise ConfigError(
                f"{path} is JSON, not a TOML config file; for the run that holds it, give its directory "
                "(tformer info RUN_DIR, tformer train --resume RUN_DIR)"
            ) from None
        raise ConfigError(f"{path}: invalid TOML: {error}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse one `--set section.key=value` into (["section", "key"], value); the value is TOML."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    dotted_key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as relu or pre is taken as a string
    return dotted_key.strip().split("."), value


def _check_type(key: str, value: Any, hint: Any, section: str) -> Any:
    where = f" in [{section}]" if section else ""
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{key}{where} must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        inner = [option for option in options if option is not type(None)]
        return _check_type(key, value, inner[0], section)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}{where} must be true or false; got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}{where} must be an integer; got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}{where} must be a number; got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}{where} must be a string; got {value!r}{_quoting_advice(key, value, section)}")
        return value
    return value


def _quoting_advice(key: str, value: Any, section: str) -> str:
    """How to write a name TOML reads as a number (a file called 2016) or a date (2016-01-01) as a string: in
    quotes, and on the command line inside shell quotes too, which the shell would otherwise take away."""
    if isinstance(value, datetime.date | datetime.time):
        value = value.isoformat()  # as TOML writes it (str() puts a space for the T of a date-time)
    elif isinstance(value, bool) or not isinstance(value, int | float):
        return ""
    dotted = f"{section}.{key}" if section else key
    return f'; write it in quotes: {key} = "{value}" in a file, --set \'{dotted}="{value}"\' on the command line'
